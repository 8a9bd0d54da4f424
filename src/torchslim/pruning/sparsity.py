"""One-shot sparsity for linear layers: masks (unstructured, N:M), Wanda and SparseGPT.

Every function works on a weight as an ``(out, in)`` matrix (see `torchslim.core.modules.weight_matrix`) and
returns boolean keep-masks of the same shape. Patterns are "unstructured" or "N:M": keep the N largest of every
M consecutive inputs of each output row ("2:4" is the 50% pattern sparse tensor cores run).

- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"): score
  ``|W_ij| · ‖X_j‖₂`` and prune the lowest scores of each output row; no weight update.
- SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot"): optimal-brain-surgeon pruning column by column through the Cholesky factor of ``H⁻¹``; the mask is
  chosen per block of columns by ``w² / [H⁻¹]_jj²`` (per M columns for N:M), and the error of every pruned
  column is compensated on the columns not yet visited.

Example:
    >>> w = torch.randn(8, 16)
    >>> mask = nm_mask(w.abs(), 2, 4)
    >>> int(mask.view(8, 4, 4).sum(-1).min()), int(mask.view(8, 4, 4).sum(-1).max())
    (2, 2)
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from torchslim._config import check

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured" -> None``; ``"N:M" -> (N, M)`` (keep N of every M, 0 < N < M).

    Raises:
        ValueError: anything else.
    """
    if pattern == "unstructured":
        return None
    match = _PATTERN.match(pattern)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
    return int(match[1]), int(match[2])


def pattern_sparsity(pattern: str) -> float | None:
    """The sparsity an N:M pattern implies (1 - N/M), or None for "unstructured"."""
    nm = parse_pattern(pattern)
    return None if nm is None else 1.0 - nm[0] / nm[1]


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask with the ``n`` highest scores of every ``m`` consecutive inputs of each row.

    Args:
        scores: ``(out, in)`` importance; ``in`` must be a multiple of ``m``.
        n, m: keep ``n`` of every ``m``.

    Returns:
        Boolean ``(out, in)`` mask with exactly ``n`` True values in each group of ``m``.
    """
    rows, columns = scores.shape
    if columns % m:
        raise ValueError(f"{columns} inputs are not a multiple of {m} (the M of an N:M pattern)")
    groups = scores.reshape(rows, columns // m, m)
    keep = groups.topk(n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(rows, columns)


def unstructured_mask(scores: Tensor, sparsity: float, per_row: bool = True) -> Tensor:
    """Keep-mask that drops exactly the ``int(sparsity · count)`` lowest scores, per row or over the matrix.

    Args:
        scores: ``(out, in)`` importance.
        sparsity: fraction to drop, in [0, 1).
        per_row: rank each output row on its own (Wanda's comparison group) instead of the whole matrix.

    Returns:
        Boolean mask of ``scores``' shape.
    """
    flat = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)
    drop = int(sparsity * flat.shape[1])
    mask = torch.ones_like(flat, dtype=torch.bool)
    if drop > 0:
        mask.scatter_(1, flat.argsort(dim=1)[:, :drop], False)
    return mask.reshape(scores.shape)


def _mask(scores: Tensor, sparsity: float, pattern: str, per_row: bool) -> Tensor:
    nm = parse_pattern(pattern)
    return unstructured_mask(scores, sparsity, per_row) if nm is None else nm_mask(scores, *nm)


def magnitude_mask(w: Tensor, sparsity: float, pattern: str = "unstructured") -> Tensor:
    """Keep-mask by ``|W|``, per output row (unstructured) or per M inputs of a row (N:M)."""
    return _mask(w.detach().abs().float(), sparsity, pattern, per_row=True)


def wanda_mask(w: Tensor, sq_norm: Tensor, sparsity: float, pattern: str = "unstructured") -> Tensor:
    """Wanda's keep-mask: score ``|W_ij| · ‖X_j‖₂``, compared within each output row.

    Args:
        w: ``(out, in)`` weight.
        sq_norm: ``(in,)`` sum of squared inputs per channel (`LayerStats.sq_norm`).
        sparsity: fraction pruned per row for "unstructured" (ignored for N:M, whose sparsity is 1 - N/M).
        pattern: "unstructured" or "N:M".

    Returns:
        Boolean ``(out, in)`` keep-mask.
    """
    scores = w.detach().abs().float() * sq_norm.float().to(w.device).clamp_min(0).sqrt()[None, :]
    return _mask(scores, sparsity, pattern, per_row=True)


def _inverse_cholesky(hessian: Tensor, damping: float) -> Tensor:
    """Upper Cholesky factor U of ``(H + λI)⁻¹`` (``H⁻¹ = UᵀU``); λ = ``damping`` · mean diag(H), raised if needed."""
    h = hessian.clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights cost nothing either way
    h[dead, dead] = 1.0
    scale = float(h.diagonal().mean())
    for attempt in range(6):
        damped = h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (damping * 10 ** attempt * scale)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("the Hessian is not positive definite even with 10^5 times the damping")


def sparsegpt_prune(w: Tensor, hessian: Tensor, sparsity: float, pattern: str = "unstructured",
                    blocksize: int = 128, damping: float = 0.01) -> tuple[Tensor, Tensor]:
    """SparseGPT: prune ``w`` and update the kept weights to minimise ``tr((W - Ŵ) H (W - Ŵ)ᵀ)``.

    Columns are visited left to right in blocks of ``blocksize``. At the start of a block (or of every M
    columns for N:M) the weights with the lowest ``w² / [H⁻¹]_jj²`` (the OBS saliency, measured on the weights as
    updated so far) are chosen for pruning; each column's pruning error is then spread over the columns to its
    right along the matching row of the Cholesky factor of ``H⁻¹`` (inside the block at once, after the block
    as one matrix product).

    Args:
        w: ``(out, in)`` weight (any float dtype; computed in float32).
        hessian: ``(in, in)`` ``2/n Σ x xᵀ`` of the layer's inputs (`LayerStats.hessian`); not modified.
        sparsity: fraction pruned (exactly ``int(sparsity · out · in)`` weights) for "unstructured".
        pattern: "unstructured" or "N:M" (then the sparsity is 1 - N/M and ``sparsity`` is ignored).
        blocksize: columns per lazy-update block (rounded down to a multiple of M for N:M).
        damping: added to diag(H), as a fraction of its mean.

    Returns:
        ``(pruned weight in w's dtype, boolean keep-mask)``, both ``(out, in)``.
    """
    nm = parse_pattern(pattern)
    rows, columns = w.shape
    if nm is not None:
        if columns % nm[1]:
            raise ValueError(f"{columns} inputs are not a multiple of {nm[1]} (the M of an N:M pattern)")
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    weight = w.detach().float().clone(memory_format=torch.contiguous_format)  # Conv1D's view is transposed
    upper = _inverse_cholesky(hessian.detach().float().to(weight.device), damping)
    mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    pruned = 0
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block, factor = weight[:, start:end].clone(), upper[start:end, start:end]
        diagonal = factor.diagonal()
        keep = torch.ones(block.shape, dtype=torch.bool, device=block.device)
        if nm is None:
            # Cumulative rounding: the layer ends with exactly int(sparsity * numel) zeros.
            count = int(sparsity * rows * end) - pruned
            if count > 0:
                saliency = (block.square() / diagonal.square()[None, :]).flatten()
                keep.view(-1)[saliency.argsort()[:count]] = False
            pruned += max(count, 0)
        errors = torch.zeros_like(block)
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                keep[:, group] = nm_mask(block[:, group].square() / diagonal[group].square()[None, :], *nm)
            column = block[:, j]
            kept = column * keep[:, j]
            error = (column - kept) / diagonal[j]
            block[:, j:] -= error[:, None] * factor[j, j:][None, :]
            block[:, j] = kept  # exact zeros (the update above leaves rounding residue)
            errors[:, j] = error
        weight[:, start:end] = block
        weight[:, end:] -= errors @ upper[start:end, end:]
        mask[:, start:end] = keep
    return weight.to(w.dtype), mask


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
