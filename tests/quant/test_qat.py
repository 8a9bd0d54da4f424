"""BatchNorm folding, bias correction and quantization-aware training: folding is exact, bias correction
removes the mean rounding offset it predicts, and QAT's trained integer weights are exactly what the deployed
ONNX Runtime model holds."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from torchslim.data.config import CalibrationConfig
from torchslim.quant.bias_correction import output_shift, quantized_weight
from torchslim.quant.fold import fold_batchnorms
from torchslim.quant.qat import QatConfig, quantize_qat
from torchslim.quant.qmath import QScheme
from torchslim.recover.finetune import FinetuneConfig
from torchslim.recover.trainer import OptimizerConfig

from conftest import TinyCNN
from test_methods import make_context

pytest.importorskip("onnxruntime")


def _randomise_batchnorms(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model.eval()


class SharedOutput(nn.Module):
    """conv1's output feeds both bn1 and a skip connection: folding bn1 would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        return self.bn2(self.conv2(self.bn1(y))) + y


@pytest.mark.parametrize("how", ["export", "trace"])
def test_folding_is_exact_and_refuses_a_shared_output(how):
    x = torch.randn(4, 1, 16, 16)
    model = _randomise_batchnorms(TinyCNN())
    reference = model(x)
    folded, refused = fold_batchnorms(model, x, how)
    assert folded == ["bn1"] and refused == {} and isinstance(model.bn1, nn.Identity)
    assert torch.allclose(model(x), reference, atol=1e-5)
    shared = _randomise_batchnorms(SharedOutput())
    reference = shared(x)
    folded, refused = fold_batchnorms(shared, x, how)
    assert folded == ["bn2"] and "conv1" in refused["bn1"]
    assert isinstance(shared.bn1, nn.BatchNorm2d) and torch.allclose(shared(x), reference, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 4])
def test_bias_correction_predicts_the_mean_rounding_offset_of_a_convolution(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, groups=groups)  # no padding: every output sees the full kernel
    x = torch.rand(64, 8, 12, 12) * 3 + torch.arange(8).reshape(1, 8, 1, 1)  # channel means far from zero
    scheme = QScheme(axis=0, reduce_range=True)
    delta = quantized_weight(conv.weight.detach(), scheme) - conv.weight.detach()
    measured = (F.conv2d(x, delta, groups=groups)).mean(dim=(0, 2, 3))
    predicted = output_shift(delta, x.mean(dim=(0, 2, 3)), groups)
    # (The prediction uses the whole input's mean; without padding the border rows weigh a little less.)
    assert float((predicted - measured).abs().max()) <= 0.01 * float(measured.abs().max())
    assert float(measured.abs().max()) > 1e-3  # the offset is real, not rounding noise
    linear = torch.randn(5, 8)
    delta = quantized_weight(linear, scheme) - linear
    rows = torch.rand(100, 8) + 1
    assert torch.allclose(output_shift(delta, rows.mean(0)), (rows @ delta.t()).mean(0), atol=1e-5)


def test_bias_correction_moves_each_quantized_layers_bias_by_its_predicted_offset(tmp_path):
    from torchslim.quant.int8_static import Int8StaticConfig, quantize_int8_static
    from torchslim.quant.onnx_backend import ACTIVATIONS, weight_scheme
    from torchslim.quant.onnx_ranges import observe_activations

    context = make_context(tmp_path)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=CalibrationConfig(samples=64),
                                                                runtime="onnxruntime"))
    workdir = tmp_path / "int8-static-onnxruntime"
    prepared = onnx.load(str(workdir / "float.prepared.onnx")).graph
    after = onnx.load(str(workdir / "float.prepared.corrected.onnx")).graph
    corrected = {t.name: numpy_helper.to_array(t) for t in after.initializer}
    bias_of = {n.name: n.input[2] for n in after.node if n.op_type == "Conv"}
    original = {t.name: numpy_helper.to_array(t) for t in prepared.initializer}
    convs = [n for n in prepared.node if n.op_type == "Conv"]
    feeds = [{"input_0": x.numpy()} for x, _ in context.data.batches("calib", context.bundle.preprocess, 32, limit=64)]
    _, _, means = observe_activations(workdir / "float.prepared.onnx", feeds, "minmax", ACTIVATIONS,
                                      means_of=[n.input[0] for n in convs])
    assert deployable.details["bias_corrected_layers"] >= 2 and len(convs) == 2
    for node in convs:
        weight = torch.from_numpy(original[node.input[1]])
        delta = quantized_weight(weight, weight_scheme(True)) - weight
        bias = original[node.input[2]] if len(node.input) > 2 else np.zeros(weight.shape[0], np.float32)
        expected = bias - output_shift(delta, means[node.input[0]]).numpy()
        assert np.allclose(corrected[bias_of[node.name]], expected, atol=1e-6)
        assert np.abs(corrected[bias_of[node.name]] - bias).max() > 1e-6


def _qdq_weights(path) -> dict[str, np.ndarray]:
    """Dequantized int8 weights of a QDQ file, keyed by the float weight's name."""
    graph = onnx.load(str(path)).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in constants and constants[node.input[0]].ndim >= 2:
            codes, scale, zero = (constants[node.input[i]] for i in range(3))
            shape = [-1] + [1] * (codes.ndim - 1)
            weights[node.input[0]] = (codes.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)
    return weights


def test_qat_trains_weights_on_the_grid_the_deployed_int8_model_holds(tmp_path):
    context = make_context(tmp_path)
    before = {n: p.detach().clone() for n, p in context.model.named_parameters()}
    config = QatConfig(calibration=CalibrationConfig(samples=64), bias_correction=False,
                 finetune=FinetuneConfig(epochs=2, batch_size=128, optimizer=OptimizerConfig(name="adamw", lr=1e-3)))
    deployable = quantize_qat(context, config)
    model = context.model
    assert isinstance(model.bn1, nn.Identity) and deployable.details["folded_batchnorms"] == 1
    assert not torch.equal(model.conv2.weight, before["conv2.weight"])  # it trained
    deployed = list(_qdq_weights(deployable.path).values())
    trained = [m.weight.detach().numpy() for m in (model.conv1, model.conv2, model.fc)]
    # Every trained weight tensor is held by the int8 model exactly (up to float rounding of scale * code).
    for weight in trained:
        match = [d for d in deployed if d.shape == weight.shape]
        assert match and np.abs(match[0] - weight).max() <= 1e-6 * max(1.0, float(np.abs(weight).max()))
    losses = deployable.details["train_loss"]
    assert len(losses) == 2 and losses[1] < losses[0]  # distillation through the fake-quantized model learns
    assert deployable.details["deployed_vs_simulated"]["top1_agreement"] >= 0.97
