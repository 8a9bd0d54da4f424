"""Validation shared by pruning configs with a sparsity ``pattern`` ("unstructured" or "N:M")."""

from __future__ import annotations

from torchslim._config import check
from torchslim.llm.sparsity import pattern_sparsity


def resolve_sparsity(sparsity: float | None, pattern: str) -> float:
    """The sparsity a config prunes to: ``sparsity`` checked against ``pattern``, or the default when left out.

    Args:
        sparsity: the configured value, or None (0.5 for "unstructured", 1 - N/M for an N:M pattern).
        pattern: "unstructured" or "N:M".

    Returns:
        The sparsity, in [0, 1).

    Raises:
        FieldError: a malformed pattern (field ``pattern``), a value outside [0, 1) or one that contradicts
            the pattern (field ``sparsity``).
    """
    try:
        implied = pattern_sparsity(pattern)
    except ValueError as error:
        check(False, "pattern", str(error))
    if sparsity is None:
        return 0.5 if implied is None else implied
    check(0.0 <= sparsity < 1.0, "sparsity", f"must be in [0, 1), got {sparsity}")
    if implied is not None:
        check(abs(sparsity - implied) < 1e-9, "sparsity",
              f"pattern {pattern} implies sparsity {implied:g}; leave sparsity out, got {sparsity}")
    return sparsity
