"""Cross-layer equalization: the float function is unchanged, per-channel weight ranges become alike, and a
model with badly-scaled channels quantizes better with it than without."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchslim.quant.equalize import _input_ranges, _output_ranges, equalize_, fold_and_equalize_
from torchslim.quant.fold import fold_batchnorms
from torchslim.quant.qmath import QScheme, fake_quantize, qparams, sqnr_db


def _inverted_residual(channels: int, expanded: int, activation) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), activation(),
                         nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False),
                         nn.BatchNorm2d(expanded), activation(),
                         nn.Conv2d(expanded, channels, 1, bias=False), nn.BatchNorm2d(channels))


def mobilenet_like(activation=nn.ReLU, spread: float = 2.0, seed: int = 0, in_channels: int = 3) -> nn.Module:
    """Stem, two inverted-residual blocks (pointwise -> depthwise -> pointwise) and a classifier, with
    BatchNorm scales spread over orders of magnitude (``exp(N(0, spread))``) as after training."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), activation(),
                          _inverted_residual(8, 32, activation), _inverted_residual(8, 24, activation),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.copy_(torch.exp(torch.randn_like(module.weight) * spread))
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _spread(values: torch.Tensor) -> float:
    return float(values.max() / values.min())


@torch.no_grad()
def test_equalized_model_computes_the_same_function_and_pairs_include_depthwise():
    model = mobilenet_like()
    inputs = torch.randn(8, 3, 16, 16)
    reference = model(inputs)
    result, folded, _ = fold_and_equalize_(model, inputs[:1])
    after = model(inputs)
    assert len(folded) == 7
    assert float((after - reference).abs().max() / reference.abs().max()) < 1e-4
    pairs = {(p.first, p.second) for p in result.pairs}
    # pointwise -> depthwise and depthwise -> pointwise in both blocks, the stem into the first block, and
    # block 1's projection into block 2's expansion (no residual here); the flatten before the classifier stops it.
    assert {("3.0", "3.3"), ("3.3", "3.6"), ("4.0", "4.3"), ("4.3", "4.6"), ("0", "3.0"), ("3.6", "4.0")} == pairs
    assert "7" in result.refused and 2 <= result.sweeps <= 20


@torch.no_grad()
def test_per_channel_ranges_become_uniform():
    model = mobilenet_like()
    inputs = torch.randn(1, 3, 16, 16)
    fold_batchnorms(model, inputs)
    depthwise = model[3][3]
    before = _spread(_output_ranges(depthwise))
    equalize_(model, inputs)
    after = _spread(_output_ranges(depthwise))
    # BatchNorm scales exp(N(0, 2)) over 32 channels spread the depthwise ranges by ~10^3; after equalization
    # the depthwise output ranges match the projection's input ranges channel by channel.
    assert before > 100 and after < before / 20
    ratio = _output_ranges(depthwise) / _input_ranges(model[3][6])
    assert float((ratio - 1).abs().max()) < 0.01


@torch.no_grad()
def test_relu6_pairs_are_left_alone_unless_replaced_by_relu():
    model = mobilenet_like(nn.ReLU6)
    inputs = torch.randn(4, 3, 16, 16)
    reference = model(inputs)
    kept = copy.deepcopy(model)
    result, _, _ = fold_and_equalize_(kept, inputs[:1])
    assert {(p.first, p.second) for p in result.pairs} == {("3.6", "4.0")}  # the one pair without an activation
    assert "ReLU6" in result.refused["3.3"] and not result.replaced_relu6
    assert torch.allclose(kept(inputs), reference, rtol=0, atol=1e-4 * float(reference.abs().max()))
    replaced = copy.deepcopy(model)
    result, _, _ = fold_and_equalize_(replaced, inputs[:1], relu6_as_relu=True)
    assert len(result.pairs) == 6 and len(result.replaced_relu6) == 5
    assert isinstance(replaced[3][2], nn.ReLU)


@torch.no_grad()
def test_high_bias_is_absorbed_into_the_next_pointwise_layer_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1)).eval()
    model[1].bias.fill_(4.0)
    model[1].weight.fill_(0.5)
    inputs = torch.randn(16, 4, 8, 8)
    # A running variance 4x the data's puts the pre-activations at N(4, 0.25^2) while the BatchNorm claims
    # N(4, 0.5^2): its 3-sigma floor 2.5 is 6 true sigmas away, so the ReLU never clips and 2.5 moves on.
    model[1].running_mean.copy_(model[0](inputs).mean((0, 2, 3)))
    model[1].running_var.copy_(model[0](inputs).var((0, 2, 3)) * 4)
    reference = model(inputs)
    plain = copy.deepcopy(model)
    fold_batchnorms(plain, inputs[:1])
    equalize_(plain, inputs[:1])  # no BatchNorm shifts given: nothing absorbed
    result, _, _ = fold_and_equalize_(model, inputs[:1])
    assert result.absorbed_channels == 6
    assert torch.allclose(model(inputs), reference, atol=1e-4)
    # What B's input is quantized on is lower by c = 2.5 / s in every channel (s: the equalization scale).
    lowered = (plain[2](plain[0](inputs)) - model[2](model[0](inputs))).amin((0, 2, 3))
    assert bool((lowered > 0.5).all())


def _simulated_int8(model: nn.Module, calibration: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Per-tensor int8 weights and per-tensor uint8 activations at every layer's input, min-max ranges."""
    model = copy.deepcopy(model)
    weights, activations = QScheme(signed=True, symmetric=True), QScheme(signed=False, symmetric=False)
    ranges, handles = {}, []
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        bound = layer.weight.abs().max()
        layer.weight.copy_(fake_quantize(layer.weight, *qparams(-bound, bound, weights), weights))
        handles.append(layer.register_forward_pre_hook(
            lambda m, a: ranges.__setitem__(m, (min(ranges.get(m, (0, 0))[0], float(a[0].min())),
                                                max(ranges.get(m, (0, 0))[1], float(a[0].max()))))))
    model(calibration)
    for handle in handles:
        handle.remove()
    for layer in layers:
        scale, zero = qparams(*ranges[layer], activations)
        layer.register_forward_pre_hook(lambda m, a, s=scale, z=zero: (fake_quantize(a[0], s, z, activations),))
    return model(inputs)


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int8_fidelity_with_equalization_is_at_least_as_good(seed):
    model = mobilenet_like(spread=2.5, seed=seed)
    calibration, inputs = torch.randn(32, 3, 16, 16), torch.randn(64, 3, 16, 16)
    reference = model(inputs)
    fold_batchnorms(model, inputs[:1])
    plain = sqnr_db(reference, _simulated_int8(model, calibration, inputs))
    equalize_(model, inputs[:1])
    equalized = sqnr_db(reference, _simulated_int8(model, calibration, inputs))
    assert equalized >= plain + 3.0, (plain, equalized)


def _step(tmp_path, runtime: str):
    """The int8-static step with ``equalize: true`` on the MobileNetV2-like model; (deployable, inputs, fp32)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import TINY_PREPROCESS
    from test_methods import make_context

    from torchslim.data.config import CalibrationConfig
    from torchslim.quant.int8_static import Int8StaticConfig, quantize_int8_static
    from torchslim.zoo import ModelBundle

    bundle = ModelBundle(model=mobilenet_like(in_channels=1), spec="test:mobilenet-like", task="classification",
                         modality="image", preprocess=TINY_PREPROCESS, example_inputs=TINY_PREPROCESS.example)
    context = make_context(tmp_path, bundle)
    inputs = next(iter(context.data.batches("test", bundle.preprocess, 64, limit=64)))[0]
    with torch.no_grad():
        reference = context.teacher(inputs)
    calibration = CalibrationConfig(samples=64, batch_size=32)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=calibration, runtime=runtime,
                                                                equalize=True))
    return deployable, inputs, reference


def test_int8_static_step_equalizes_before_calibration_and_reports_the_pairs(tmp_path):
    pytest.importorskip("onnxruntime")
    deployable, inputs, reference = _step(tmp_path, "onnxruntime")
    report = deployable.details["equalization"]
    assert report["equalized_pairs"] and report["sweeps"] >= 1
    assert "3.0 -> relu -> 3.3" in report["equalized_pairs"] and report["folded_batchnorms"] == 7
    agreement = float((deployable(inputs).argmax(-1) == reference.argmax(-1)).float().mean())
    assert agreement >= 0.8, agreement


@pytest.mark.slow
def test_torchinductor_backend_quantizes_the_equalized_model_and_reloads_it_exactly(tmp_path):
    pytest.importorskip("torchao")
    deployable, inputs, reference = _step(tmp_path, "torchinductor")
    outputs = deployable(inputs)  # compiles
    assert len(deployable.details["equalization"]["equalized_pairs"]) == 6
    assert deployable.details["int8_layers"] == "8 of 8 conv/linear"
    assert float((outputs.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.9
    reloaded = deployable.load_and_run(deployable.save(tmp_path / "artifact"), inputs)
    assert torch.allclose(reloaded, outputs, atol=1e-5)
