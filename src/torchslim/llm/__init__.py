"""Large-model tools: block-by-block calibration (`run_sequential`) and one-shot sparsity (Wanda, SparseGPT).

Light to import: only torch. The methods built on these (``prune: {method: wanda | sparsegpt}``) live in
`torchslim.pruning.oneshot`.
"""

from torchslim.llm.blocks import (
    LayerStats, SequentialRun, find_blocks, is_linear_like, linear_layers, run_sequential, set_weight_matrix_,
    tied_modules, weight_matrix,
)
from torchslim.llm.sparsity import (
    magnitude_mask, nm_mask, parse_pattern, pattern_sparsity, sparsegpt_prune, unstructured_mask, wanda_mask,
)

__all__ = [
    "LayerStats", "SequentialRun", "find_blocks", "is_linear_like", "linear_layers", "magnitude_mask", "nm_mask",
    "parse_pattern", "pattern_sparsity", "run_sequential", "set_weight_matrix_", "sparsegpt_prune", "tied_modules",
    "unstructured_mask", "wanda_mask", "weight_matrix",
]
