"""Moved: the block-by-block calibration is `torchslim.core.calibration`, the linear-layer helpers are
`torchslim.core.modules`, and the sparsity masks (Wanda, SparseGPT, N:M) are `torchslim.pruning.sparsity`.
Importing a name from here still works for one release, with a DeprecationWarning naming its new home."""

from __future__ import annotations

import importlib
import warnings

_MOVED = {
    **dict.fromkeys(("LayerStats", "SequentialRun", "run_sequential"), "torchslim.core.calibration"),
    **dict.fromkeys(("find_blocks", "is_linear_like", "linear_layers", "set_weight_matrix_", "tied_modules",
                     "weight_matrix"), "torchslim.core.modules"),
    **dict.fromkeys(("magnitude_mask", "nm_mask", "parse_pattern", "pattern_sparsity", "sparsegpt_prune",
                     "unstructured_mask", "wanda_mask"), "torchslim.pruning.sparsity"),
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module 'torchslim.llm' has no attribute {name!r}")
    warnings.warn(f"torchslim.llm.{name} moved to {_MOVED[name]}.{name}; the old name goes in the next release",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)


__all__ = sorted(_MOVED)
