"""Parameter counts: all parameters, and those that are not exactly zero (what unstructured pruning removes).

Weights held in a compact form (packed codes generated at run time, codebooks) are not ``nn.Parameter``s; the
module holding such a form reports the weights it stands for through ``logical_numel()`` and
``logical_nonzero()``, so counts stay comparable across stages.
"""

from __future__ import annotations

from torch import nn


def _unique_parameters(model: nn.Module):
    # Tied weights (e.g. shared embeddings) are counted once, as they are stored once.
    return {id(p): p for p in model.parameters()}.values()


def _compact_forms(model: nn.Module):
    return {id(m): m for m in model.modules() if callable(getattr(m, "logical_numel", None))}.values()


def count_params(model: nn.Module) -> int:
    """Number of parameters (tied parameters counted once), compact forms counted as the weights they hold."""
    return (sum(p.numel() for p in _unique_parameters(model))
            + sum(m.logical_numel() for m in _compact_forms(model)))


def count_nonzero_params(model: nn.Module) -> int:
    """Number of parameters that are not exactly zero."""
    return (sum(int(p.detach().count_nonzero()) for p in _unique_parameters(model))
            + sum(m.logical_nonzero() for m in _compact_forms(model)))
