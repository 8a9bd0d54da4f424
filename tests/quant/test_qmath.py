"""Quantization math and observers: error floors for every observer and scheme, exactness properties."""

from __future__ import annotations

import math

import pytest
import torch

from torchslim.quant.observers import HistogramObserver, make_observer
from torchslim.quant.qmath import QScheme, dequantize, fake_quantize, qparams, quantize, sqnr_db

SCHEMES = {"int8 symmetric": QScheme(), "uint8 asymmetric": QScheme(signed=False, symmetric=False),
           "int8 asymmetric": QScheme(symmetric=False), "uint8 symmetric": QScheme(signed=False)}
OBSERVERS = ["minmax", "moving_average", "percentile", "mse", "entropy"]


def gaussian(n=100_000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def observed(kind, scheme, data, batches=8):
    observer = make_observer(kind, scheme)
    for chunk in data.chunk(batches):
        observer.observe(chunk)
    return observer


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
@pytest.mark.parametrize("kind", OBSERVERS)
def test_every_observer_and_scheme_meets_an_sqnr_floor_on_gaussian_data(kind, scheme):
    data = gaussian()
    scale, zero_point = observed(kind, scheme, data).qparams()
    # 8 bits over ~8 standard deviations: ideal uniform noise gives ~40 dB; clipping methods trade a little.
    assert sqnr_db(data, fake_quantize(data, scale, zero_point, scheme)) >= 37.0


def test_fewer_bits_cost_about_six_db_each():
    data = gaussian()
    figures = []
    for bits in (8, 6, 4):
        scheme = QScheme(bits=bits)
        scale, zero_point = observed("minmax", scheme, data).qparams()
        figures.append(sqnr_db(data, fake_quantize(data, scale, zero_point, scheme)))
    assert 10.0 <= figures[0] - figures[1] <= 14.0 and 10.0 <= figures[1] - figures[2] <= 14.0


def test_per_channel_scales_beat_per_tensor_on_weights_with_uneven_channels():
    weight = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(1))
    weight = weight * torch.logspace(-2, 0, 64).reshape(-1, 1, 1, 1)
    results = {}
    for axis in (None, 0):
        scheme = QScheme(axis=axis)
        scale, zero_point = observed("minmax", scheme, weight, batches=1).qparams()
        results[axis] = sqnr_db(weight, fake_quantize(weight, scale, zero_point, scheme))
    assert results[0] >= results[None] + 8.0 and results[0] >= 40.0


def test_clipping_observers_beat_minmax_where_outliers_are_rare():
    data = torch.relu(gaussian(200_000))
    data[:5] = 60.0  # five outliers in 200k values stretch a min-max range tenfold
    scheme = QScheme(signed=False, symmetric=False)
    bulk = data[5:]

    def bulk_sqnr(kind):
        scale, zero_point = observed(kind, scheme, data).qparams()
        return sqnr_db(bulk, fake_quantize(bulk, scale, zero_point, scheme))

    minmax = bulk_sqnr("minmax")
    for kind in ("percentile", "entropy"):
        assert bulk_sqnr(kind) >= minmax + 10.0, kind
    # MSE over everything (the outliers included) is never worse than min-max, which it includes as a candidate.
    scale, zero_point = observed("mse", scheme, data).qparams()
    mse_all = sqnr_db(data, fake_quantize(data, scale, zero_point, scheme))
    scale, zero_point = observed("minmax", scheme, data).qparams()
    assert mse_all >= sqnr_db(data, fake_quantize(data, scale, zero_point, scheme)) - 0.05


def test_zero_is_exact_and_codes_round_trip_within_half_a_step():
    data = torch.cat([gaussian(1000) * 3 + 1, torch.zeros(10)])
    for scheme in SCHEMES.values():
        scale, zero_point = qparams(data.min(), data.max(), scheme)
        codes = quantize(data, scale, zero_point, scheme)
        assert codes.dtype == scheme.dtype and int(codes.min()) >= scheme.qmin and int(codes.max()) <= scheme.qmax
        restored = dequantize(codes, scale, zero_point, scheme)
        assert torch.equal(restored[-10:], torch.zeros(10))
        inside = (data >= (scheme.qmin - zero_point) * scale) & (data <= (scheme.qmax - zero_point) * scale)
        assert inside.float().mean() > 0.999
        assert float((restored - data)[inside].abs().max()) <= float(scale) / 2 + 1e-6
        assert torch.equal(fake_quantize(data, scale, zero_point, scheme), restored)


def test_reduce_range_drops_one_bit():
    assert (QScheme(reduce_range=True).qmin, QScheme(reduce_range=True).qmax) == (-64, 64)  # ONNX Runtime's
    assert (QScheme(reduce_range=True, symmetric=False).qmin, QScheme(reduce_range=True, symmetric=False).qmax) == (-64, 63)
    assert (QScheme(signed=False, reduce_range=True).qmin, QScheme(signed=False, reduce_range=True).qmax) == (0, 127)


def test_fake_quantize_passes_gradients_straight_through_inside_the_range_only():
    scheme = QScheme(signed=False, symmetric=False)
    scale, zero_point = qparams(0.0, 1.0, scheme)
    x = torch.tensor([-0.5, 0.25, 0.5, 2.0], requires_grad=True)
    fake_quantize(x, scale, zero_point, scheme).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_histogram_rebinning_keeps_every_count_and_tracks_the_range():
    observer = HistogramObserver(QScheme())
    observer.observe(torch.linspace(-1, 1, 1000))
    observer.observe(torch.linspace(-5, 3, 1000))
    assert math.isclose(observer.counts.sum(), 2000.0)
    assert (float(observer.lo), float(observer.hi)) == (-5.0, 3.0)
    with pytest.raises(ValueError, match="per tensor"):
        HistogramObserver(QScheme(axis=0))
    with pytest.raises(ValueError, match="no data"):
        make_observer("mse", QScheme()).range()
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("median", QScheme())
