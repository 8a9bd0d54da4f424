"""Calibrated weight quantization: GPTQ's quadratic objective and AWQ's output error beat round-to-nearest."""

from __future__ import annotations

import pytest
import torch

from torchslim.quant.awq import awq_quantize, awq_scales
from torchslim.quant.gptq import gptq_quantize, quadratic_error
from torchslim.quant.groupwise import quantize_rtn


def correlated_inputs(tokens: int = 1024, channels: int = 128, seed: int = 0) -> torch.Tensor:
    """Activations with correlated channels of unequal energy, as a layer's inputs have."""
    torch.manual_seed(seed)
    mixing = torch.randn(channels, channels) / channels ** 0.5
    return (torch.randn(tokens, channels) @ mixing) * torch.linspace(0.2, 3.0, channels)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T @ x


@pytest.mark.parametrize("group_size, act_order, ratio_ceiling", [
    (32, False, 0.85), (32, True, 0.6), (0, False, 0.85), (0, True, 0.6),
])
def test_gptq_objective_below_rtn(group_size, act_order, ratio_ceiling):
    x = correlated_inputs()
    h = hessian_of(x)
    w = torch.randn(48, 128)
    qw, w_hat = gptq_quantize(w, h, 4, group_size, act_order=act_order)
    assert torch.equal(w_hat, qw.dequantize())
    assert qw.codes.shape == (48, 128) and int(qw.codes.max()) <= 15
    rtn = quadratic_error(w, quantize_rtn(w, 4, group_size).dequantize(), h)
    assert quadratic_error(w, w_hat, h) < ratio_ceiling * rtn
    # the objective is twice the mean squared output error over the calibration tokens
    assert quadratic_error(w, w_hat, h) == pytest.approx(2 * (x @ (w - w_hat).T).pow(2).sum().item() / x.shape[0],
                                                         rel=1e-4)


def test_gptq_block_size_does_not_change_the_result():
    h = hessian_of(correlated_inputs())
    w = torch.randn(16, 128)
    reference, _ = gptq_quantize(w, h, 4, 32, blocksize=128)
    for blocksize in (16, 40):  # 40: groups straddle blocks
        other, _ = gptq_quantize(w, h, 4, 32, blocksize=blocksize)
        assert torch.equal(other.codes, reference.codes)


def test_gptq_keeps_pruned_weights_zero_and_handles_dead_inputs():
    h = hessian_of(correlated_inputs())
    h[7, :] = 0.0
    h[:, 7] = 0.0  # input 7 never fires
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    mask = torch.rand_like(w) > 0.5
    qw, w_hat = gptq_quantize(w * mask, h, 4, 32, mask=mask)
    assert torch.isfinite(w_hat).all()
    assert torch.count_nonzero(w_hat[~mask]) == 0
    assert torch.count_nonzero(w_hat[:, 7]) == 0
    sparse = w * mask
    assert quadratic_error(sparse, w_hat, h) < quadratic_error(sparse, quantize_rtn(sparse, 4, 32).dequantize(), h)


def test_gptq_rejects_bad_shapes():
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 128"):
        gptq_quantize(torch.randn(4, 128), torch.eye(128), 4, 48)
    with pytest.raises(ValueError, match=r"hessian must be \(128, 128\)"):
        gptq_quantize(torch.randn(4, 128), torch.eye(64), 4, 32)


def outlier_activations(tokens: int = 256, channels: int = 128) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(tokens, channels)
    x[:, [3, 40, 77, 100]] *= 30.0  # a few channels with large magnitude, as in LLM activations
    return x


@pytest.mark.parametrize("group_size, ratio_ceiling", [(32, 0.5), (0, 0.5)])
def test_awq_output_error_below_rtn(group_size, ratio_ceiling):
    x = outlier_activations()
    w = torch.randn(64, 128) * 0.05
    qw, input_scale = awq_quantize(w, x, 4, group_size)
    reference = x @ w.T
    awq_error = ((x * input_scale) @ qw.dequantize().T - reference).pow(2).mean()
    rtn_error = (x @ quantize_rtn(w, 4, group_size).dequantize().T - reference).pow(2).mean()
    assert awq_error < ratio_ceiling * rtn_error
    assert input_scale[[3, 40, 77, 100]].max() < input_scale.median()  # busy channels scaled up in the weight


def test_awq_is_rtn_on_uniform_activations():
    """With no channel standing out the search may keep alpha = 0, and is never worse than RTN."""
    torch.manual_seed(0)
    x, w = torch.randn(256, 64), torch.randn(32, 64)
    scales = awq_scales(w, x, 4, 32)
    w_hat = quantize_rtn(w * scales, 4, 32).dequantize()
    awq_error = ((x / scales) @ w_hat.T - x @ w.T).pow(2).mean()
    rtn_error = (x @ quantize_rtn(w, 4, 32).dequantize().T - x @ w.T).pow(2).mean()
    assert scales.shape == (64,) and awq_error <= rtn_error
