"""Integer quantization math: schemes, scales and zero points, (fake) quantization, and the error it causes.

A scheme maps a float range [lo, hi] onto the integers [qmin, qmax]: ``q = clamp(round(x / scale) + zero_point)``
and back ``x ~ (q - zero_point) * scale``. Symmetric schemes centre the range on zero (zero_point 0 for signed
integers, the middle code for unsigned ones); asymmetric ones spend every code on [lo, hi]. Ranges always
include 0, so that zero (padding, ReLU's output) is exact. Per-channel schemes keep one scale per index along
``axis`` (a weight's output channels). ``reduce_range`` drops one bit: on x86 CPUs without VNNI the u8 x s8 pair
sums of AVX2's ``vpmaddubsw`` saturate int16 otherwise. Reduced symmetric signed codes span [-64, 64] as in ONNX
Runtime (2 * 255 * 64 = 32640 still fits int16), so a weight simulated here lands on the grid the runtime uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 2.0 ** -24


@dataclass(frozen=True)
class QScheme:
    """How a tensor is quantized.

    Args:
        bits: integer width (2..8).
        signed: int8-style codes (else uint8-style).
        symmetric: range centred on zero.
        axis: per-channel along this dimension; None = one scale for the whole tensor.
        reduce_range: one bit fewer (see the module docstring).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - (1 if self.reduce_range else 0))

    @property
    def qmin(self) -> int:
        return -(self.levels // 2) if self.signed else 0

    @property
    def qmax(self) -> int:
        if self.signed:
            return self.levels // 2 if self.symmetric and self.reduce_range else self.levels // 2 - 1
        return self.levels - 1

    @property
    def half_range(self) -> int:
        """Codes on each side of the zero point a symmetric range is spread over."""
        return self.levels // 2 if self.signed and self.reduce_range else self.levels // 2 - 1

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8


def qparams(lo: torch.Tensor | float, hi: torch.Tensor | float, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) that map [lo, hi] (scalars or per-channel vectors) onto ``scheme``."""
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0.0)
    if scheme.symmetric:
        bound = torch.maximum(-lo, hi)
        # [-bound, bound] onto +-half_range codes around the zero point (int8: -127..127, leaving -128
        # unused so that both ends are exact; reduced int8: -64..64; uint8: 1..255 around 128).
        scale = bound / scheme.half_range
        zero_point = torch.full_like(scale, 0 if scheme.signed else (scheme.qmin + scheme.qmax + 1) // 2)
    else:
        scale = (hi - lo) / (scheme.qmax - scheme.qmin)
        scale = torch.clamp(scale, min=EPS)
        zero_point = torch.clamp(scheme.qmin - torch.round(lo / scale), scheme.qmin, scheme.qmax)
    return torch.clamp(scale, min=EPS).float(), zero_point.to(torch.int32)


def _shape_for(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or scale.ndim == 0:
        return scale
    shape = [1] * x.ndim
    shape[axis] = -1
    return scale.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Integer codes of ``x`` (rounding half to even, as the runtimes do), in the scheme's dtype."""
    s, z = _shape_for(scale, x, scheme.axis), _shape_for(zero_point, x, scheme.axis)
    return torch.clamp(torch.round(x / s) + z, scheme.qmin, scheme.qmax).to(scheme.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    s, z = _shape_for(scale, q, scheme.axis), _shape_for(zero_point, q, scheme.axis)
    return (q.to(torch.float32) - z) * s


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """quantize -> dequantize in float, differentiable with the straight-through estimator (gradient 1 inside
    the range, 0 where the value was clamped), using PyTorch's fake-quantize kernels."""
    if scheme.axis is None or scale.ndim == 0:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()).float(), zero_point.reshape(()).int(),
                                                     scheme.qmin, scheme.qmax)
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zero_point.int(), scheme.axis % x.ndim,
                                                  scheme.qmin, scheme.qmax)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - x_q|^2); +inf when exact."""
    reference, approximation = reference.double(), approximation.double()
    noise = (reference - approximation).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
