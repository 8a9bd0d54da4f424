"""GPTQ (Frantar et al. 2022): quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized so that the layer's *outputs* on calibration data change least.

The objective is ``trace((W - W_hat) H (W - W_hat)^T)`` with ``H = 2/n sum x x^T`` over the calibration inputs
``x`` of the layer (`quadratic_error`). Quantizing column ``j`` leaves an error ``e``; the optimal correction of
the remaining columns is ``-e / [H^-1]_jj * [H^-1]_j,j+1:``, which the upper Cholesky factor of ``H^-1`` gives
row by row, so no inverse is ever updated. Corrections inside a block of ``blocksize`` columns are applied at
once (lazy batch updates) and the rest of the matrix is updated once per block.

Group parameters (scale, zero point) are computed when a group's first column comes up, from the group's
*current*, already corrected weights. With ``act_order`` (columns in order of decreasing ``H_jj``, the most
important first) groups would otherwise straddle the new order; there the groups stay the contiguous ones of the
stored format and their parameters are fixed up front from the original weights (AutoGPTQ's "static groups").

Example:
    >>> hessian = 2 / len(x) * x.T @ x            # x: (tokens, in) inputs of the layer
    >>> qw, w_hat = gptq_quantize(layer.weight, hessian, bits=4, group_size=128)
"""

from __future__ import annotations

import torch

from torchslim.quant.groupwise import QuantizedWeight, check_group_size, grouped, minmax_params


def quadratic_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """GPTQ's calibration objective ``trace((W - W_hat) H (W - W_hat)^T)`` (float64).

    With ``H = 2/n X^T X`` it equals ``2/n |X W^T - X W_hat^T|^2``: twice the mean squared output error."""
    delta = (w.detach().double() - w_hat.detach().double())
    return float(((delta @ hessian.double()) * delta).sum())


def _inverse_cholesky(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping * mean(diag H) I)^-1``."""
    h = hessian.clone()
    h.diagonal().add_(damping * h.diagonal().mean())
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Float64 copy with dead inputs (never active, ``H_jj = 0``) given a unit diagonal: their columns carry no
    signal, so they are zeroed and any code does; the unit keeps the factorization defined."""
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    return h


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, *, symmetric: bool = False,
                  blocksize: int = 128, damping: float = 0.01, act_order: bool = False,
                  mask: torch.Tensor | None = None) -> tuple[QuantizedWeight, torch.Tensor]:
    """Quantize ``w`` with GPTQ given the layer's input Hessian.

    Args:
        w: (out, in) float weight.
        hessian: (in, in) ``2/n sum x x^T`` of the layer's inputs.
        bits: code width.
        group_size: input columns per group; 0 = per-channel (one grid per row from the whole original row).
        symmetric: grids centred on 0.
        blocksize: columns per lazy block update.
        damping: fraction of the mean diagonal added to ``H`` (keeps the inverse well conditioned).
        act_order: quantize columns in order of decreasing ``H_jj`` (static groups, see the module docstring).
        mask: bool (out, in), False = pruned: those weights get the zero-point code (exactly 0) and their
            error is propagated like any other; ranges are fitted on the kept weights only.

    Returns:
        (the `QuantizedWeight`, its dequantized float32 weight).

    Raises:
        ValueError: ``group_size`` does not divide ``in_features`` or shapes disagree.
    """
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be ({cols}, {cols}) for a weight of shape {tuple(w.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if mask is not None and mask.shape != w.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from the weight's {tuple(w.shape)}")
    length = check_group_size(cols, group_size)
    qmax = 2 ** bits - 1
    weight = w.detach().double().clone()
    keep = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    weight[~keep] = 0.0
    h = _prepare_hessian(hessian.to(weight.device), weight)

    n_groups = cols // length
    scales = torch.zeros(rows, n_groups, dtype=torch.float64, device=weight.device)
    zeros = torch.zeros_like(scales)
    static = act_order or group_size == 0
    if static:  # parameters from the original weights, before any correction
        s, z = minmax_params(grouped(weight.float(), group_size), bits, symmetric)
        scales.copy_(s), zeros.copy_(z)

    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(cols, device=weight.device)
    weight, keep, h = weight[:, order], keep[:, order], h[order][:, order]
    group_of = order // length  # group (in the stored, unpermuted layout) of each permuted column
    upper = _inverse_cholesky(h, damping)
    codes = torch.zeros_like(weight)

    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        block = weight[:, start:stop].clone()
        errors = torch.zeros_like(block)
        inverse_block = upper[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            group = int(group_of[column])
            if not static and column % length == 0:
                current = _current_group(block, errors, weight, upper, start, i, length)
                _fit_group(scales, zeros, group, current, keep[:, column:column + length], bits, symmetric)
            s, z = scales[:, group], zeros[:, group]
            q = torch.clamp(torch.round(block[:, i] / s + z), 0, qmax)
            q = torch.where(keep[:, column], q, z)  # pruned: the zero-point code, exactly 0
            codes[:, column] = q
            error = (block[:, i] - (q - z) * s) / inverse_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * inverse_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        weight[:, stop:] -= errors @ upper[start:stop, stop:]

    codes = codes[:, torch.argsort(order)]
    quantized = QuantizedWeight(codes.to(torch.uint8), scales.float(), zeros.float(), bits, group_size, symmetric)
    return quantized, quantized.dequantize()


def _current_group(block: torch.Tensor, errors: torch.Tensor, weight: torch.Tensor, upper: torch.Tensor,
                   start: int, i: int, length: int) -> torch.Tensor:
    """The current weights of the group starting at block column ``i``. Columns inside the block are up to date
    in ``block``; columns past it (a group longer than what is left of the block) still lack this block's
    corrections so far, which are applied here to a copy."""
    stop = start + block.shape[1]
    group_stop = start + i + length
    if group_stop <= stop:
        return block[:, i:i + length]
    pending = errors[:, :i] @ upper[start:start + i, stop:group_stop]
    return torch.cat([block[:, i:], weight[:, stop:group_stop] - pending], dim=1)


def _fit_group(scales: torch.Tensor, zeros: torch.Tensor, group: int, values: torch.Tensor, keep: torch.Tensor,
               bits: int, symmetric: bool) -> None:
    """Min-max grid of one group from its kept weights (pruned ones count as 0, which every range holds)."""
    s, z = minmax_params(torch.where(keep, values, torch.zeros_like(values)).float(), bits, symmetric)
    scales[:, group], zeros[:, group] = s.double(), z.double()
