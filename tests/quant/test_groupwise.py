"""Group-wise weight quantization math: packing, round-to-nearest floors, exact zeros, HQQ, errors."""

from __future__ import annotations

import pytest
import torch

from torchslim.quant.groupwise import (QuantizedWeight, hqq_quantize, pack_int4, quantize_rtn, quantize_with_params,
                                       unpack_int4)
from torchslim.quant.qmath import sqnr_db


def gaussian(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(rows, cols)


def with_outliers(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """LLM-like weights: small Gaussian bulk, 0.5% of entries ten times larger."""
    w = gaussian(rows, cols, seed) * 0.02
    w[torch.rand_like(w) < 0.005] *= 10
    return w


def test_pack_unpack_is_bit_exact():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (7, 34), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 17) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)  # even column in the low nibble


def test_pack_rejects_odd_width_and_wide_codes():
    with pytest.raises(ValueError, match="even number of columns, got 3"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got \[16, 16\]"):
        pack_int4(torch.full((1, 2), 16, dtype=torch.uint8))


@pytest.mark.parametrize("bits, group_size, symmetric, floor_db", [
    (8, 0, True, 42.0), (8, 0, False, 42.5), (4, 32, False, 21.0), (4, 32, True, 19.5), (4, 128, False, 19.5),
    (4, 0, False, 18.5),
])
def test_rtn_sqnr_floor(bits, group_size, symmetric, floor_db):
    w = gaussian()
    qw = quantize_rtn(w, bits, group_size, symmetric)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2 ** bits - 1
    assert qw.scales.shape == (64, 256 // (group_size or 256)) == qw.zeros.shape
    assert sqnr_db(w, qw.dequantize()) > floor_db


def test_symmetric_zero_point_is_the_middle_code():
    qw = quantize_rtn(gaussian(), 4, 64, symmetric=True)
    assert torch.all(qw.zeros == 8) and int(qw.codes.min()) >= 1  # code 0 unused: both ends exact


@pytest.mark.parametrize("method", ["rtn", "rtn_sym", "hqq"])
def test_exact_zeros_stay_zero(method):
    w = with_outliers()
    w[:, ::3] = 0.0  # pruned
    w[5] = 0.0  # a whole row
    qw = {"rtn": lambda: quantize_rtn(w, 4, 32), "rtn_sym": lambda: quantize_rtn(w, 4, 32, symmetric=True),
          "hqq": lambda: hqq_quantize(w, 4, 32, iters=5)}[method]()
    w_hat = qw.dequantize()
    assert torch.count_nonzero(w_hat[w == 0]) == 0
    assert torch.equal(qw.zeros, torch.round(qw.zeros))


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="group_size 64 does not divide in_features 96"):
        quantize_rtn(torch.randn(4, 96), 4, 64)
    with pytest.raises(ValueError, match="group_size 64 does not divide in_features 96"):
        hqq_quantize(torch.randn(4, 96), 4, 64)


def test_quantize_with_params_reproduces_rtn():
    w = gaussian()
    rtn = quantize_rtn(w, 4, 32)
    again = quantize_with_params(w, rtn.scales, rtn.zeros, 4, 32)
    assert torch.equal(again.codes, rtn.codes)
    half = quantize_with_params(w, rtn.scales * 2, rtn.zeros, 4, 32)  # coarser steps: worse, still valid codes
    assert sqnr_db(w, half.dequantize()) < sqnr_db(w, rtn.dequantize()) - 3.0


@pytest.mark.parametrize("group_size", [32, 128, 0])
def test_hqq_beats_rtn_on_outlier_weights(group_size):
    w = with_outliers()
    rtn_mse = (w - quantize_rtn(w, 4, group_size).dequantize()).pow(2).mean()
    hqq = hqq_quantize(w, 4, group_size)
    floats = hqq_quantize(w, 4, group_size, integer_zeros=False)
    assert (w - hqq.dequantize()).pow(2).mean() < 0.97 * rtn_mse
    assert (w - floats.dequantize()).pow(2).mean() <= (w - hqq.dequantize()).pow(2).mean()
    lp = lambda approx: (w - approx).abs().pow(0.7).mean()  # the norm HQQ minimises
    assert lp(hqq.dequantize()) < lp(quantize_rtn(w, 4, group_size).dequantize())


def test_hqq_paper_variant_zero_point_only():
    """Scale fixed, float zero points: the paper's update; small but real gain."""
    w = with_outliers()
    rtn_mse = (w - quantize_rtn(w, 4, 64).dequantize()).pow(2).mean()
    paper = hqq_quantize(w, 4, 64, optimize_scale=False, integer_zeros=False)
    assert torch.equal(paper.scales, quantize_rtn(w, 4, 64).scales)
    assert (w - paper.dequantize()).pow(2).mean() < 0.99 * rtn_mse


def test_dequantize_shape_and_convention():
    qw = QuantizedWeight(codes=torch.tensor([[0, 3, 15, 8]], dtype=torch.uint8), scales=torch.tensor([[0.5, 2.0]]),
                         zeros=torch.tensor([[3.0, 8.0]]), bits=4, group_size=2)
    assert torch.equal(qw.dequantize(), torch.tensor([[-1.5, 0.0, 14.0, 0.0]]))
