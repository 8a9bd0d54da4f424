"""The core every other package builds on, and that imports none of them: calling a model, linear-layer views,
layer selection by pattern, tied modules, module replacement, failing-layer lookup (`torchslim.core.modules`),
calibration samples and layer statistics (`torchslim.core.calibration`), and the CPU's features
(`torchslim.core.cpu`). Light to import: torch only.
"""

from torchslim.core.calibration import (
    LayerStats, SequentialRun, calibration_batches, check_calibration, collect_stats, run_sequential,
)
from torchslim.core.cpu import cpu_flags
from torchslim.core.modules import (
    call_model, failing_layer, find_blocks, forward_shapes, is_linear_like, linear_layers, matches, named_tensors,
    output_head, output_tensors, replace_module, set_weight_matrix_, tied_modules, weight_matrix,
)

__all__ = [
    "LayerStats", "SequentialRun", "calibration_batches", "call_model", "check_calibration", "collect_stats",
    "cpu_flags", "failing_layer", "find_blocks", "forward_shapes", "is_linear_like", "linear_layers", "matches",
    "named_tensors", "output_head", "output_tensors", "replace_module", "run_sequential", "set_weight_matrix_", "tied_modules", "weight_matrix",
]
