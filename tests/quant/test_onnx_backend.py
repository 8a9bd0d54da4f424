"""The ONNX Runtime int8 path: our scales reach the QDQ file exactly, the deployed integer kernels compute what
the simulation computes, and the most sensitive layers can stay in float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from torchslim.data.config import CalibrationConfig
from torchslim.quant.int8_static import Int8StaticConfig, quantize_int8_static
from torchslim.quant.onnx_backend import ACTIVATIONS
from torchslim.quant.onnx_ranges import observe_activations

from test_methods import make_context

pytest.importorskip("onnxruntime")


def _scales(path) -> dict[str, tuple[float, int]]:
    """QuantizeLinear scale and zero point of every quantized activation tensor of a QDQ file."""
    graph = onnx.load(str(path)).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # (ONNX Runtime renames a quantized graph output T to T_QuantizeLinear_Input.)
    return {node.input[0].removesuffix("_QuantizeLinear_Input"): (float(constants[node.input[1]]),
                                                                  int(constants[node.input[2]]))
            for node in graph.node if node.op_type == "QuantizeLinear" and node.input[1] in constants}


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_our_activation_scales_reach_the_qdq_file_exactly(tmp_path, observer):
    context = make_context(tmp_path)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=CalibrationConfig(samples=64),
                                                                observer=observer,
                                                          runtime="onnxruntime"))
    prepared = next(context.workdir.glob("int8-static-onnxruntime/float.prepared.onnx"))
    feeds = [{"input_0": x.numpy()} for x, _ in context.data.batches("calib", context.bundle.preprocess, 32,
                                                                     limit=64)]
    observers, samples, _ = observe_activations(prepared, feeds, observer, ACTIVATIONS)
    written = _scales(deployable.path)
    ours = {name: tuple(float(v) for v in o.qparams()) for name, o in observers.items() if o.lo is not None}
    assert samples == 64 and len(written) >= 4
    own = [t for t, (scale, zero) in written.items()
           if (np.float32(scale), zero) == (np.float32(ours[t][0]), int(ours[t][1]))]
    # Every tensor carries our scale and zero point; ONNX Runtime gives the outputs of pooling and flatten their
    # input's (they cannot leave the input's range), which is ours too.
    assert {"input_0", "relu", "conv2d_1", "relu_1", "output"} <= set(own) and len(own) >= len(written) - 2
    ours_set = {(np.float32(s), int(z)) for s, z in ours.values()}
    assert all((np.float32(scale), zero) in ours_set for scale, zero in written.values())
    assert deployable.details["observer"] == observer


def test_deployed_integer_kernels_match_the_simulation(tmp_path):
    context = make_context(tmp_path)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=CalibrationConfig(samples=64),
                                                                runtime="onnxruntime"))
    check = deployable.details["deployed_vs_simulated"]
    # With reduce_range chosen from the CPU's features, no int16 saturation: the fused kernels agree with the
    # literal QuantizeLinear/DequantizeLinear simulation up to rounding of the requantization.
    assert check["top1_agreement"] >= 0.97 and check["sqnr_db"] >= 25.0


def test_fallback_keeps_the_most_sensitive_layers_in_float(tmp_path):
    context = make_context(tmp_path)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=CalibrationConfig(samples=64),
                                                                runtime="onnxruntime",
                                                          fallback_layers=1))
    sensitive = deployable.details["sensitive_float_nodes_db"]
    assert len(sensitive) == 1 and all(np.isfinite(v) for v in sensitive.values())
    graph = onnx.load(str(deployable.path)).graph
    kept = next(n for n in graph.node if n.name == next(iter(sensitive)))
    producers = {o: n.op_type for n in graph.node for o in n.output}
    weights = {t.name: t.data_type for t in graph.initializer}
    # The layer kept in float reads a float weight, not a dequantized int8 one.
    assert any(weights.get(i) == onnx.TensorProto.FLOAT and len(onnx.numpy_helper.to_array(
        next(t for t in graph.initializer if t.name == i)).shape) >= 2 for i in kept.input)
    assert not any(producers.get(i) == "DequantizeLinear" and "weight" in i for i in kept.input)
    node = next(iter(sensitive))
    assert any(name == node or name.endswith(f"({node})") for name in context.skipped)


def test_int8_dynamic_quantizes_linear_weights_and_leaves_convolutions_in_float(tmp_path):
    from torchslim.quant.int8_dynamic import Int8DynamicConfig, quantize_int8_dynamic

    context = make_context(tmp_path)
    deployable = quantize_int8_dynamic(context, Int8DynamicConfig())
    graph = onnx.load(str(deployable.path)).graph
    kinds = {n.op_type for n in graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= kinds and "Conv" in kinds
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 1 and list(int8[0].dims) in ([128, 10], [10, 128])  # fc only
    x, _ = next(context.data.batches("test", context.bundle.preprocess, 128))
    from torchslim.quant.qmath import sqnr_db

    assert sqnr_db(context.teacher(x), deployable(x)) > 25.0


class TinyEncoder(torch.nn.Module):
    """A 16x16 image as 16 tokens of 16 pixels through one transformer encoder layer (attention: two
    activation x activation MatMuls)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(16, 16)
        self.layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.layer(self.embed(x.reshape(x.shape[0], 16, 16))).mean(1))


def test_in_a_graph_with_attention_only_weighted_layers_read_quantized_inputs(tmp_path):
    import dataclasses

    from conftest import tiny_bundle

    torch.manual_seed(0)
    bundle = dataclasses.replace(tiny_bundle(), model=TinyEncoder().eval())
    context = make_context(tmp_path, bundle)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=CalibrationConfig(samples=64),
                                                                runtime="onnxruntime"))
    assert deployable.details["attention"].startswith("2 activation x activation MatMuls")
    graph = onnx.load(str(deployable.path)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    quantized_weights = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")
                         and any(producers.get(i) == "DequantizeLinear" for i in n.input[1:])]
    assert len(quantized_weights) == 6  # embed, in-projection, out-projection, two FFN layers, head
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    assert softmax and not any(producers.get(i) == "DequantizeLinear" for n in softmax for i in n.input)
    constants = {t.name for t in graph.initializer}
    attention = [n for n in graph.node if n.op_type == "MatMul"
                 and not any(i in constants or producers.get(i) == "DequantizeLinear" for i in n.input)]
    assert len(attention) == 2  # the score and weighted-sum products run in float
    # The weighted layers' outputs stay float too (the bias, residual and activation after them are float):
    # rounding them to uint8 had cost all-MiniLM-L6-v2 most of its fidelity (mean cosine 0.934 -> 0.991).
    requantized = [n.name for n in graph.node if n.op_type == "QuantizeLinear" and producers.get(n.input[0])
                   in ("MatMul", "Gemm")]
    assert requantized == []
    x = context.example_inputs(32)
    with torch.no_grad():
        reference = bundle.model(x)
    agreement = float((deployable(x).argmax(1) == reference.argmax(1)).float().mean())
    assert agreement >= 0.8


def test_smoothquant_reaches_a_post_ln_encoder_through_the_onnx_graph(tmp_path):
    """nn.TransformerEncoderLayer is post-LN: its LayerNorms also feed the residual, so the LayerNorm fold
    refuses them all; the ONNX pass smooths every weighted group instead, with an outlier channel after the
    first LayerNorm as transformer activations have."""
    import dataclasses

    from conftest import tiny_bundle

    def step(smoothquant: bool, where):
        torch.manual_seed(0)
        model = TinyEncoder().eval()
        with torch.no_grad():
            model.layer.norm1.weight[3] = 30.0
        bundle = dataclasses.replace(tiny_bundle(), model=model)
        context = make_context(where, bundle)
        config = Int8StaticConfig(calibration=CalibrationConfig(samples=64), runtime="onnxruntime",
                                  smoothquant=smoothquant)
        deployable = quantize_int8_static(context, config)
        x = torch.cat([x for x, _ in context.data.batches("test", bundle.preprocess, 128, limit=256)])
        with torch.no_grad():
            reference = model(x)
        error = float((deployable(x) - reference).pow(2).sum() / reference.pow(2).sum())
        return error, deployable.details

    plain, _ = step(False, tmp_path / "plain")
    smoothed, details = step(True, tmp_path / "smoothed")
    assert details["smoothing"]["smoothed"] == {} and len(details["smoothing"]["refused"]) == 2
    groups = details["smoothing_onnx"]["smoothed"]
    assert len(groups) >= 3 and all(g["error_after"] < g["error_before"] for g in groups.values())
    # the smoothing Muls are float by design, not layers an integer kernel failed to take
    assert not any(name.startswith("smooth_") for name in details["float_layers"])
    # measured: relative squared error of the deployed outputs 2.8e-3 -> 8.7e-5, six groups smoothed
    assert smoothed < plain / 10, (plain, smoothed)
