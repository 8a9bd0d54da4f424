"""Contract tests over every registered method, plus checks specific to each first method."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from torchslim.data.config import CalibrationConfig
from torchslim.data import resolve_data
from torchslim._context import _StepContext
from torchslim.pruning.magnitude import MagnitudePruningConfig, magnitude_masks, prunable_weights
from torchslim.recover.losses import distillation_loss
from torchslim.registry import list_methods

from conftest import tiny_bundle


def make_context(tmp_path, bundle=None) -> _StepContext:
    bundle = bundle or tiny_bundle()
    return _StepContext(model=bundle.model, teacher=copy.deepcopy(bundle.model).requires_grad_(False),
                        bundle=bundle, data=resolve_data("builtin:digits"), seed=0, threads=1, workdir=tmp_path,
                        progress=False, where="test")


def small_config(entry):
    def small(config):
        fields = {f.name for f in dataclasses.fields(config)}
        changes = {k: v for k, v in {"epochs": 1, "batch_size": 256}.items() if k in fields}
        if "calibration" in fields:
            changes["calibration"] = dataclasses.replace(config.calibration, samples=64)
        return dataclasses.replace(config, **changes)

    config = small(entry.config_cls())
    if getattr(config, "finetune", None) is not None:  # QAT nests its fine-tuning run
        config = dataclasses.replace(config, finetune=small(config.finetune))
    return config


@pytest.mark.parametrize("entry", list_methods(), ids=lambda e: f"{e.kind}:{e.name}")
def test_every_method_keeps_outputs_shaped_and_saves_a_reloadable_artifact(tmp_path, entry):
    context = make_context(tmp_path)
    inputs = context.example_inputs(4)
    before = context.teacher(inputs)
    deployable = entry.handler(context, small_config(entry))
    after = deployable(inputs)
    assert after.shape == before.shape
    assert torch.isfinite(after).all()
    path = deployable.save(tmp_path / "artifact")
    assert path.stat().st_size > 0 and path.suffix in (".onnx", ".safetensors", ".tslim")
    reloaded = deployable.load_and_run(path, inputs)
    reloaded = torch.as_tensor(reloaded[0] if isinstance(reloaded, list) else reloaded)
    assert torch.allclose(reloaded, after, atol=1e-5)


def test_global_magnitude_pruning_hits_the_sparsity_exactly_and_keeps_large_weights(tmp_path):
    context = make_context(tmp_path)
    weights = prunable_weights(context.model, [])
    largest = max(float(w.detach().abs().max()) for w in weights.values())
    deployable = __import__("torchslim.pruning.magnitude", fromlist=["x"]).prune_magnitude(
        context, MagnitudePruningConfig(sparsity=0.6))
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros / total == pytest.approx(0.6, abs=1 / total)
    assert zeros == int(0.6 * total)
    assert max(float(w.detach().abs().max()) for w in weights.values()) == largest
    assert deployable.details["sparsity"] == pytest.approx(zeros / total, abs=1e-4)
    assert set(context.masks) == set(weights)


def test_local_scope_prunes_every_layer_alike_and_skip_keeps_layers_dense(tmp_path):
    context = make_context(tmp_path)
    masks = magnitude_masks(prunable_weights(context.model, ["fc"]), 0.5, "local")
    assert "fc.weight" not in masks
    for name, mask in masks.items():
        assert 1 - float(mask.float().mean()) == pytest.approx(0.5, abs=1 / mask.numel()), name


def test_distillation_loss_is_zero_for_identical_logits_and_scales_with_t_squared():
    logits = torch.randn(8, 10)
    assert float(distillation_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(8, 10)
    # At high temperature the T^2-scaled KD tends to the logit-matching MSE / (2 N) (Hinton et al.).
    centred = lambda x: x - x.mean(-1, keepdim=True)  # noqa: E731
    mse = float(((centred(logits) - centred(other)) ** 2).sum(-1).mean()) / (2 * 10)
    assert float(distillation_loss(other, logits, 100.0)) == pytest.approx(mse, rel=0.05)


def test_finetune_recovers_accuracy_and_keeps_pruned_weights_at_zero(tmp_path):
    from torchslim.pruning.magnitude import prune_magnitude
    from torchslim.recover.finetune import FinetuneConfig, finetune
    from torchslim.recover.trainer import OptimizerConfig

    context = make_context(tmp_path)
    data = context.data

    def accuracy():
        correct = 0
        with torch.inference_mode():
            for x, y in data.batches("val", context.bundle.preprocess, 256):
                correct += int((context.model(x).argmax(1) == y).sum())
        return correct / len(data.splits["val"])

    prune_magnitude(context, MagnitudePruningConfig(sparsity=0.5))
    context.teacher = copy.deepcopy(context.model).requires_grad_(False)
    before = accuracy()
    finetune(context, FinetuneConfig(epochs=4, batch_size=32, optimizer=OptimizerConfig(name="adamw", lr=0.01),
                                     distill=None))
    assert accuracy() > max(0.8, before + 0.3)  # the tiny random net learns digits from its labels
    for name, mask in context.masks.items():
        assert int((dict(context.model.named_parameters())[name][~mask] != 0).sum()) == 0


def test_int8_static_runs_integer_kernels_close_to_float(tmp_path):
    import onnx

    from torchslim.quant.int8_static import Int8StaticConfig, quantize_int8_static

    context = make_context(tmp_path)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=CalibrationConfig(samples=128)))
    graph = onnx.load(str(deployable.path)).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8_weights) == 3  # conv1, conv2, fc
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    x, _ = next(context.data.batches("test", context.bundle.preprocess, 128))
    reference = context.teacher(x)
    error = deployable(x) - reference
    sqnr_db = 10 * math.log10(float(reference.pow(2).mean()) / float(error.pow(2).mean()))
    assert sqnr_db > 20.0
    # 7-bit weights where the CPU lacks VNNI (see tests/quant/test_onnx_backend.py), else 8-bit.
    grid = "int8 [-64, 64]" if deployable.details["reduce_range"] else "int8"
    assert deployable.details["weights"] == grid + " per-channel"


def test_int8_static_skip_keeps_matching_layers_in_float(tmp_path):
    import onnx

    from torchslim.quant.int8_static import Int8StaticConfig, quantize_int8_static

    context = make_context(tmp_path)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=CalibrationConfig(samples=64), skip=["fc"]))
    graph = onnx.load(str(deployable.path)).graph
    assert len([t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]) == 2
    assert len(context.skipped) == 1 and "float" in next(iter(context.skipped.values()))


def test_auto_runtime_times_every_available_backend_and_keeps_the_fastest(tmp_path):
    from torchslim.quant.int8_static import BACKENDS, Int8StaticConfig, quantize_int8_static

    available = [name for name, backend in BACKENDS.items() if backend.available() is None]
    if len(available) < 2:
        pytest.skip(f"only {available} available here")
    context = make_context(tmp_path)
    context.batch_size = 32
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=CalibrationConfig(samples=64),
                                                                prefer="batch"))
    candidates = deployable.details["candidates"]
    assert set(candidates) == set(available)
    timed = {n: c for n, c in candidates.items() if "error" not in c}
    assert deployable.runtime == min(timed, key=lambda n: timed[n]["latency_ms_batch"])
    for figures in timed.values():
        assert figures["score"] == figures["latency_ms_batch"] > 0
        assert figures["val_agreement"] >= 0.9


def test_torchinductor_int8_artifact_reloads_to_identical_outputs(tmp_path):
    pytest.importorskip("torchao")
    from torchslim.quant import pt2e_backend
    from torchslim.quant.int8_static import Int8StaticConfig

    if pt2e_backend.available():
        pytest.skip(pt2e_backend.available())
    from torch import nn

    from torchslim.zoo import ModelBundle

    def plain_cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)).eval()

    tiny = tiny_bundle()
    bundle = ModelBundle(model=plain_cnn(), spec="test:plain", task="classification", modality="image",
                         preprocess=tiny.preprocess, example_inputs=tiny.example_inputs)
    context = make_context(tmp_path, bundle)
    config = Int8StaticConfig(runtime="torchinductor", calibration=CalibrationConfig(samples=64))
    deployable = pt2e_backend.build(context, config)
    assert deployable.details["int8_layers"] == "3 of 3 conv/linear" and not context.skipped
    x, _ = next(context.data.batches("test", context.bundle.preprocess, 16))
    expected = deployable(x)
    path = deployable.save(tmp_path / "artifact")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["format"] == "torchslim.pt2e-int8/1"
        int8 = [k for k in handle.keys() if handle.get_tensor(k).dtype == torch.int8]
    assert len(int8) == 3  # conv1, conv2 and fc weights stored as int8
    fresh_architecture = plain_cnn()
    with torch.no_grad():
        for p in fresh_architecture.parameters():
            p.mul_(-3.0)  # different weights: the artifact must supply every tensor
    reloaded = pt2e_backend.load_artifact(fresh_architecture, context.example_inputs(2), path, config)
    assert torch.equal(reloaded(x), expected)
    error = expected - context.teacher(x)
    assert float(error.pow(2).mean()) < 0.01 * float(context.teacher(x).pow(2).mean())  # SQNR > 20 dB


def test_torchinductor_reports_layers_its_quantizer_passes_over(tmp_path):
    pytest.importorskip("torchao")
    from torch import nn

    from torchslim.quant import pt2e_backend
    from torchslim.quant.int8_static import Int8StaticConfig
    from torchslim.zoo import ModelBundle

    if pt2e_backend.available():
        pytest.skip(pt2e_backend.available())

    class SamePadConv(nn.Conv2d):  # as EfficientNet ports write it: a subclass with its own forward
        def forward(self, x):
            return torch.nn.functional.conv2d(torch.nn.functional.pad(x, [1, 1, 1, 1]), self.weight, self.bias)

    torch.manual_seed(0)
    model = nn.Sequential(SamePadConv(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    tiny = tiny_bundle()
    bundle = ModelBundle(model=model, spec="test:same-pad", task="classification", modality="image",
                         preprocess=tiny.preprocess, example_inputs=tiny.example_inputs)
    context = make_context(tmp_path, bundle)
    deployable = pt2e_backend.build(context, Int8StaticConfig(runtime="torchinductor",
                                                              calibration=CalibrationConfig(samples=32)))
    total, done = 3, int(deployable.details["int8_layers"].split()[0])
    assert done < total and len(context.skipped) == total - done
    assert all("not matched by torchao" in why for why in context.skipped.values())
