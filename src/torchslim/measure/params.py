"""Parameter counts: all parameters, and those that are not exactly zero (what unstructured pruning removes)."""

from __future__ import annotations

from torch import nn


def _unique_parameters(model: nn.Module):
    # Tied weights (e.g. shared embeddings) are counted once, as they are stored once.
    return {id(p): p for p in model.parameters()}.values()


def count_params(model: nn.Module) -> int:
    """Number of parameters (tied parameters counted once)."""
    return sum(p.numel() for p in _unique_parameters(model))


def count_nonzero_params(model: nn.Module) -> int:
    """Number of parameters that are not exactly zero."""
    return sum(int(p.detach().count_nonzero()) for p in _unique_parameters(model))
