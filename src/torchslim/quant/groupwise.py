"""Group-wise weight-only quantization of a (out, in) weight: codes, per-group scales and zero points.

Each output row is cut into groups of ``group_size`` consecutive input columns (``group_size=0``: the whole row
is one group, i.e. per-channel). A group maps onto the unsigned codes ``[0, 2**bits - 1]`` with
``w_hat = (q - z) * s``. The zero point ``z`` is an integer (stored as float32) and the range of every group
includes 0, so an exact 0 weight is the code ``z`` and comes back as exactly 0: pruned weights stay pruned.
Symmetric groups use ``z = 2**(bits-1)`` (8 for int4, 128 for int8) and spread ``[-max|w|, max|w|]`` over the
codes ``z +- (2**(bits-1) - 1)``, leaving code 0 unused so both ends are exact (as `torchslim.quant.qmath`
does for uint8).

Methods here need no data: `quantize_rtn` (round to nearest on the min-max grid) and `hqq_quantize`
(Half-Quadratic Quantization, Badri & Shaji 2023). `torchslim.quant.gptq` and `torchslim.quant.awq` build on
`quantize_with_params` and `quantize_rtn`.

Example:
    >>> qw = quantize_rtn(layer.weight, bits=4, group_size=64)
    >>> packed = pack_int4(qw.codes)          # (out, in / 2) uint8, what is stored
    >>> error = (layer.weight - qw.dequantize()).pow(2).mean()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchslim.quant.qmath import EPS


@dataclass
class QuantizedWeight:
    """A quantized (out, in) weight: ``dequantize() = (codes - zeros) * scales`` group by group.

    Args:
        codes: uint8 (out, in) codes in ``[0, 2**bits - 1]`` (unpacked; `pack_int4` packs 4-bit ones).
        scales: float32 (out, n_groups) step sizes.
        zeros: float32 (out, n_groups) zero points in code units. Integer-valued (so 0 is exact) for every
            method here except ``hqq_quantize(..., integer_zeros=False)``; symmetric ones are ``2**(bits-1)``.
        bits: code width, 2..8 (the execution modules take 4 and 8).
        group_size: input columns per group; 0 = one group per output row (per-channel).
        symmetric: whether the groups were fitted symmetric around 0 (informational; dequantization is the same).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def group_length(self) -> int:
        """Columns per group (``in_features`` when per-channel)."""
        return self.group_size or self.codes.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The float32 (out, in) weight the codes stand for."""
        rows, cols = self.codes.shape
        groups = self.codes.float().reshape(rows, -1, self.group_length)
        return ((groups - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)).reshape(rows, cols)


def check_group_size(in_features: int, group_size: int) -> int:
    """The group length for ``group_size`` (``in_features`` when 0).

    Raises:
        ValueError: ``group_size`` is negative or does not divide ``in_features`` (callers keep such layers in
            float and report them).
    """
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0 (0 = per-channel), got {group_size}")
    length = group_size or in_features
    if in_features % length:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    return length


def _check_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    return 2 ** bits - 1


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a (out, in) tensor as (out, n_groups, group length); see `check_group_size` for the errors."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    length = check_group_size(w.shape[1], group_size)
    return w.reshape(w.shape[0], -1, length)


def minmax_params(groups: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and integer zero points (float32, shape ``groups.shape[:-1]``) covering each group and 0.

    Args:
        groups: (..., group length) float values.
        bits: code width.
        symmetric: centre the grid on 0 (zero point ``2**(bits-1)``).

    Returns:
        (scales, zeros).
    """
    qmax = _check_bits(bits)
    groups = groups.float()
    lo = groups.amin(-1).clamp(max=0.0)
    hi = groups.amax(-1).clamp(min=0.0)
    if symmetric:
        half = 2 ** (bits - 1)
        scales = storable_scales((torch.maximum(-lo, hi) / (half - 1)).clamp(min=EPS))
        return scales, torch.full_like(scales, float(half))
    scales = storable_scales(((hi - lo) / qmax).clamp(min=EPS))
    return scales, torch.round(-lo / scales).clamp(0, qmax)


def storable_scales(scales: torch.Tensor) -> torch.Tensor:
    """``scales`` rounded to the nearest float16 values (as float32): packed layers store scales in float16, so
    codes are chosen against exactly the scales that will be stored and dequantization is reproduced exactly."""
    return scales.to(torch.float16).float().clamp(min=2.0 ** -24)  # the smallest float16 (subnormal)


def _codes(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, qmax: int) -> torch.Tensor:
    # round(w / s + z), not round(w / s) + z: the same for integer z, and still a code for HQQ's float z.
    return torch.clamp(torch.round(groups / scales.unsqueeze(-1) + zeros.unsqueeze(-1)), 0, qmax)


def quantize_with_params(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                         symmetric: bool = False) -> QuantizedWeight:
    """Round ``w`` onto given per-group parameters (used by GPTQ, AWQ and HQQ).

    Args:
        w: (out, in) float weight.
        scales: (out, n_groups) step sizes.
        zeros: (out, n_groups) zero points (code units).
        bits: code width.
        group_size: input columns per group; 0 = per-channel.
        symmetric: recorded on the result.

    Returns:
        The `QuantizedWeight`.
    """
    qmax = _check_bits(bits)
    scales = storable_scales(scales)
    groups = grouped(w.detach().float(), group_size)
    scales, zeros = scales.float().reshape(groups.shape[:2]), zeros.float().reshape(groups.shape[:2])
    codes = _codes(groups, scales, zeros, qmax).reshape(w.shape).to(torch.uint8)
    return QuantizedWeight(codes, scales.contiguous(), zeros.contiguous(), bits, group_size, symmetric)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedWeight:
    """Round to nearest on each group's min-max grid (0 always inside it).

    Args:
        w: (out, in) float weight.
        bits: code width (4 and 8 are what `WeightOnlyLinear` executes).
        group_size: input columns per group; 0 = per-channel.
        symmetric: grid centred on 0.

    Returns:
        The `QuantizedWeight`.

    Raises:
        ValueError: ``group_size`` does not divide ``in_features``, or bad ``bits``.

    Example:
        >>> qw = quantize_rtn(torch.randn(8, 64), bits=4, group_size=32)
        >>> qw.codes.shape, qw.scales.shape
        (torch.Size([8, 64]), torch.Size([8, 2]))
    """
    scales, zeros = minmax_params(grouped(w.detach().float(), group_size), bits, symmetric)
    return quantize_with_params(w, scales, zeros, bits, group_size, symmetric)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding: the proximal step of ``|x|^p`` (p < 1) with weight ``beta``.

    Small errors go to 0 (treated as rounding noise), large ones are kept almost whole (treated as outliers
    the fit should ignore)."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp(min=1e-12).pow(p - 1) / beta)


def _group_mse(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, qmax: int) -> torch.Tensor:
    codes = _codes(groups, scales, zeros, qmax)
    return ((codes - zeros.unsqueeze(-1)) * scales.unsqueeze(-1) - groups).pow(2).mean(-1)


def _affine_fit(codes: torch.Tensor, target: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``target ~ s * (codes - z)`` per group (a line through the codes); groups whose codes are
    all equal or whose slope is not positive keep their old parameters."""
    code_mean, target_mean = codes.mean(-1), target.mean(-1)
    centred = codes - code_mean.unsqueeze(-1)
    variance = centred.pow(2).mean(-1)
    slope = (centred * (target - target_mean.unsqueeze(-1))).mean(-1) / variance.clamp(min=1e-12)
    ok = (variance > 0) & (slope > EPS)
    new_scales = torch.where(ok, slope, scales)
    new_zeros = torch.where(ok, code_mean - target_mean / new_scales, zeros)
    return new_scales, new_zeros


def _keep_best(best: list[torch.Tensor], scales: torch.Tensor, zeros: torch.Tensor, error: torch.Tensor) -> None:
    better = error < best[2]
    best[0] = torch.where(better, scales, best[0])
    best[1] = torch.where(better, zeros, best[1])
    best[2] = torch.where(better, error, best[2])


def hqq_quantize(w: torch.Tensor, bits: int, group_size: int, iters: int = 20, *, p: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, optimize_scale: bool = True,
                 integer_zeros: bool = True) -> QuantizedWeight:
    """Half-Quadratic Quantization (Badri & Shaji 2023): calibration-free, robust fit of each group's grid.

    The paper minimises ``|W - dequant(Q(W))|_p^p`` (p < 1, so a few large errors - outlier weights - cost little
    and the grid is placed for the bulk) by splitting off an auxiliary error ``W_e`` and alternating, from the
    min-max grid: (1) ``W_e = shrink_lp(W - dequant(Q(W)))``, generalized soft-thresholding; (2) the closed-form
    zero point ``z = mean(Q(W) - (W - W_e) / s)`` per group; (3) ``beta *= kappa``. Errors are measured in
    steps (divided by ``s``) so ``beta`` means the same for any weight scale. Two choices of ours:

    * ``optimize_scale`` (default): step (2) fits the scale as well, the least-squares line
      ``W - W_e ~ s (Q - z)``. On Gaussian weights with 0.5% ten-fold outliers, int4, groups of 32/64, squared
      error vs RTN: -6%/-5% as shipped, -14%/-9% with float zero points, -9%/-5% for the paper's update (scale
      fixed, float zero points).
    * ``integer_zeros`` (default): the fitted zero points are rounded at the end and the scales refitted by least
      squares with them fixed, so 0 stays exactly representable (pruned weights stay pruned, the convention of
      `QuantizedWeight`) at a small cost in error; ``False`` stores the paper's float zero points (exact zeros
      then come back as ``|z - round(z)| * s``, not 0).

    For every group the iterate with the lowest squared reconstruction error is kept, the min-max grid
    included, so the result is never worse than `quantize_rtn` by that measure.

    Args:
        w: (out, in) float weight.
        bits: code width.
        group_size: input columns per group; 0 = per-channel.
        iters: alternations.
        p: the lp norm's exponent (< 1).
        beta: initial weight of the quadratic coupling (in units of steps).
        kappa: growth of ``beta`` per iteration.
        optimize_scale: also fit the scale in step (2).
        integer_zeros: round zero points at the end (see above).

    Returns:
        The `QuantizedWeight` (``symmetric=False``).

    Example:
        >>> qw = hqq_quantize(layer.weight, bits=4, group_size=64)
    """
    qmax = _check_bits(bits)
    groups = grouped(w.detach().float(), group_size)
    scales, zeros = minmax_params(groups, bits)
    best = [scales, zeros, _group_mse(groups, scales, zeros, qmax)]
    for _ in range(iters):
        codes = _codes(groups, scales, zeros, qmax)
        steps_off = groups / scales.unsqueeze(-1) - (codes - zeros.unsqueeze(-1))
        target = groups - _shrink_lp(steps_off, beta, p) * scales.unsqueeze(-1)
        if optimize_scale:
            scales, zeros = _affine_fit(codes, target, scales, zeros)
        else:
            zeros = (codes - target / scales.unsqueeze(-1)).mean(-1)
        beta *= kappa
        _keep_best(best, scales, zeros, _group_mse(groups, scales, zeros, qmax))
    scales, zeros = best[0], best[1]
    if integer_zeros:
        scales, zeros = _refit_scales(groups, scales, torch.round(zeros).clamp(0, qmax), bits)
    return quantize_with_params(w, scales, zeros, bits, group_size)


def _refit_scales(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  iters: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """With integer zero points fixed, alternate rounding and the least-squares scale; keep each group's best
    (the min-max grid included, so rounding the zero points never loses to RTN)."""
    qmax = 2 ** bits - 1
    start_scales, start_zeros = minmax_params(groups, bits)
    best = [start_scales, start_zeros, _group_mse(groups, start_scales, start_zeros, qmax)]
    _keep_best(best, scales, zeros, _group_mse(groups, scales, zeros, qmax))
    for _ in range(iters):
        offsets = _codes(groups, scales, zeros, qmax) - zeros.unsqueeze(-1)
        energy = offsets.pow(2).sum(-1)
        fitted = (groups * offsets).sum(-1) / energy.clamp(min=1e-12)
        scales = torch.where((energy > 0) & (fitted > EPS), fitted, scales)
        _keep_best(best, scales, zeros, _group_mse(groups, scales, zeros, qmax))
    return best[0], best[1]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte along the last dimension, the even column in the low nibble.

    Args:
        codes: (..., in) integer codes in [0, 15], ``in`` even.

    Returns:
        uint8 (..., in / 2).
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {codes.shape[-1]}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError(f"pack_int4 takes codes in [0, 15], got [{int(codes.min())}, {int(codes.max())}]")
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 (..., n) -> uint8 codes (..., 2n)."""
    return unpack_int4_as(packed, torch.uint8)


def unpack_int4_as(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`unpack_int4` straight into ``dtype`` (no intermediate uint8 copy: this is on the dequantize path)."""
    packed = packed.to(torch.uint8)
    codes = torch.empty(*packed.shape, 2, dtype=dtype, device=packed.device)
    codes[..., 0] = packed & 0x0F  # strided writes into one buffer: several times faster than torch.stack
    codes[..., 1] = packed >> 4
    return codes.reshape(*packed.shape[:-1], -1)
