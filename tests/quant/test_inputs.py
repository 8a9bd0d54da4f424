"""Bad input to the quantizers: one clear message before any work, and layers no integer kernel takes are
kept in float and reported."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from torchslim.data.config import CalibrationConfig
from torchslim.errors import InputError
from torchslim.quant import onnx_backend
from torchslim.quant.int8_static import Int8StaticConfig, quantize_int8_static
from torchslim.quant.qat import QatConfig, quantize_qat
from torchslim.zoo.preprocess import ImagePreprocess

from conftest import tiny_bundle
from test_methods import make_context

pytest.importorskip("onnxruntime")


def test_calibration_data_of_the_wrong_shape_is_named_before_any_work(tmp_path):
    rgb = ImagePreprocess(size=16, resize=16, mean=(0.3,) * 3, std=(0.4,) * 3, channels=3)
    context = make_context(tmp_path, dataclasses.replace(tiny_bundle(), preprocess=rgb))
    for handler, config in [(quantize_int8_static, Int8StaticConfig(runtime="onnxruntime")), (quantize_qat,
                                                                                              QatConfig())]:
        with pytest.raises(InputError, match=r"calibration samples have shape \[\(3, 16, 16\)\], the model takes "
                                             r"\[\(1, 16, 16\)\]"):
            handler(context, config)
    assert not any(tmp_path.iterdir())  # nothing exported or written


def test_an_empty_calibration_set_is_refused(tmp_path):
    context = make_context(tmp_path)
    context.data = dataclasses.replace(context.data, splits={**context.data.splits, "calib": []})
    with pytest.raises(InputError, match="no calibration samples"):
        quantize_int8_static(context, Int8StaticConfig(runtime="onnxruntime"))


def test_a_runtime_that_is_not_installed_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_backend, "available", lambda: "ONNX Runtime is not installed "
                                                           "(pip install 'torchslim[onnx]')")
    context = make_context(tmp_path)
    for handler, config in [(quantize_int8_static, Int8StaticConfig(runtime="onnxruntime")), (quantize_qat,
                                                                                              QatConfig())]:
        with pytest.raises(InputError, match=r"pip install 'torchslim\[onnx\]'"):
            handler(context, config)


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(self.norm(torch.relu(self.conv(x))).flatten(1))


def test_a_layer_without_an_integer_kernel_is_kept_in_float_and_reported(tmp_path):
    torch.manual_seed(0)
    bundle = dataclasses.replace(tiny_bundle(), model=NormNet().eval())
    context = make_context(tmp_path, bundle)
    deployable = quantize_int8_static(context, Int8StaticConfig(runtime="onnxruntime",
                                                                calibration=CalibrationConfig(samples=32)))
    float_ops = set(deployable.details["float_layers"].values())
    assert float_ops == {"InstanceNormalization"}  # how GroupNorm exports
    assert sum("no integer kernel" in why for why in context.skipped.values()) == 1
    assert any(name.startswith("norm (") for name in context.skipped)  # reported by module name
    batch, _ = next(context.data.batches("test", context.bundle.preprocess, 64))
    cosine = torch.nn.functional.cosine_similarity(deployable(batch), context.teacher(batch)).mean()
    assert float(cosine) >= 0.95
