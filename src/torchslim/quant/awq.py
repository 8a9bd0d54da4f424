"""AWQ, Activation-aware Weight Quantization (Lin et al. 2023): protect the weights that meet large activations.

A few input channels of a language model's layers carry activations far larger than the rest; their weights
matter most for the output, yet rounding treats every weight alike. AWQ scales input channel ``j`` of the
weight up by ``s_j`` before quantizing (so its rounding error shrinks relative to its value) and the input down
by the same factor, which leaves the float layer unchanged: ``x W^T = (x / s) (W diag(s))^T``. The scales are
``s = mean|x|^alpha`` per channel (normalised so that max and min are reciprocal), with ``alpha`` picked on a
grid in [0, 1) by the output error on sample activations. ``alpha = 0`` is plain round-to-nearest, so the search
never does worse than RTN on those samples. (The paper's second step, a search for clipped ranges, is not here.)

The ``input_scale`` returned is the factor inputs are *multiplied* by at run time, ``1 / s``; a runtime may
instead fold it into the previous operation (a norm's weight, the previous layer's output rows).

Example:
    >>> qw, input_scale = awq_quantize(layer.weight, x, bits=4, group_size=128)   # x: (tokens, in) samples
    >>> y = (x * input_scale) @ qw.dequantize().T + layer.bias
"""

from __future__ import annotations

import torch

from torchslim.quant.groupwise import QuantizedWeight, check_group_size, quantize_rtn


def _output_error(x: torch.Tensor, reference: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bits: int,
                  group_size: int, symmetric: bool) -> float:
    w_hat = quantize_rtn(w * scales, bits, group_size, symmetric).dequantize()
    return float(((x / scales) @ w_hat.T - reference).pow(2).mean())


def awq_scales(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, grid: int = 20, *,
               symmetric: bool = False, min_scale: float = 1e-4) -> torch.Tensor:
    """Per-input-channel scales ``s`` that minimise ``|x W^T - (x / s) Q(W diag(s))^T|^2`` over ``alpha``.

    Args:
        w: (out, in) float weight.
        x: (tokens, in) sample inputs of the layer (flatten batch and sequence first).
        bits: code width.
        group_size: input columns per group; 0 = per-channel.
        grid: number of ``alpha`` values tried, ``k / grid`` for ``k = 0..grid-1``.
        symmetric: grids centred on 0.
        min_scale: floor of ``mean|x|^alpha`` (channels that are never active).

    Returns:
        float32 (in,) scales ``s`` (all ones when RTN was best).

    Raises:
        ValueError: shapes disagree or ``group_size`` does not divide ``in_features``.
    """
    w, x = w.detach().float(), x.detach().float().reshape(-1, x.shape[-1])
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"activations have {x.shape[1]} channels, the weight has {w.shape[1]} inputs")
    check_group_size(w.shape[1], group_size)
    reference = x @ w.T
    activity = x.abs().mean(0)
    best_scales, best_error = torch.ones_like(activity), float("inf")
    for step in range(grid):
        scales = activity.pow(step / grid).clamp(min=min_scale)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = _output_error(x, reference, w, scales, bits, group_size, symmetric)
        if error < best_error:
            best_scales, best_error = scales, error
    return best_scales


def awq_quantize(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, grid: int = 20, *,
                 symmetric: bool = False) -> tuple[QuantizedWeight, torch.Tensor]:
    """AWQ: quantize ``W diag(s)`` with `awq_scales`' ``s``.

    Args:
        w: (out, in) float weight.
        x: (tokens, in) sample inputs of the layer.
        bits: code width.
        group_size: input columns per group; 0 = per-channel.
        grid: ``alpha`` values tried.
        symmetric: grids centred on 0.

    Returns:
        (the `QuantizedWeight` of ``W diag(s)``, ``input_scale = 1 / s``, float32 (in,)): the layer computes
        ``(x * input_scale) @ dequantize().T``.
    """
    scales = awq_scales(w, x, bits, group_size, grid, symmetric=symmetric)
    quantized = quantize_rtn(w.detach().float() * scales, bits, group_size, symmetric)
    return quantized, (1.0 / scales).float()
