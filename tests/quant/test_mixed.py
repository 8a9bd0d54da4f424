"""Mixed precision for int8-static on ONNX Runtime: layers kept float really run float, ``max_drop`` keeps the
fewest sensitive layers float for the drop, ``fallback_slow_layers`` keeps float what int8 runs slower."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import pytest
import torch

from torchslim.data.config import CalibrationConfig
from torchslim.errors import InputError
from torchslim.measure.layer_latency import LatencyTable
from torchslim.quant import mixed, onnx_layer_latency
from torchslim.quant.int8_static import Int8StaticConfig, quantize_int8_static

from conftest import tiny_bundle
from test_methods import make_context

pytest.importorskip("onnxruntime")

SMALL = CalibrationConfig(samples=64)


def sensitive_context(tmp_path):
    """The tiny CNN with conv2 made very sensitive, on unlabelled digits (the metric: top-1 agreement)."""
    bundle = tiny_bundle()
    with torch.no_grad():
        bundle.model.bn1.bias[0] = -100.0  # channel 0 of conv2's input is 0 after the ReLU, so the outlier
        bundle.model.conv2.weight[:, 0, 1, 1] = 50.0  # changes nothing in float, but every int8 weight scale
    context = make_context(tmp_path, bundle)  # becomes 50/127 and conv2's real weights round to 0
    context.data = dataclasses.replace(context.data, labels={k: None for k in context.data.labels})
    return context


def optimised_ops(path: Path, tmp_path: Path) -> list[str]:
    """The op types ONNX Runtime runs after its load-time graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]


def reads_float_weight(path: Path, module: str) -> bool:
    """Whether the Conv/Gemm of ``module`` reads a float initializer as its weight (no DequantizeLinear, no int8
    codes)."""
    graph = onnx.load(str(path)).graph
    node = next(n for n in graph.node if n.op_type in ("Conv", "Gemm") and n.input[1].startswith(module + "."))
    weights = {t.name: t.data_type for t in graph.initializer}
    return weights.get(node.input[1]) == onnx.TensorProto.FLOAT


def test_a_layer_kept_float_runs_float_in_onnxruntime(tmp_path):
    context = make_context(tmp_path)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=SMALL, runtime="onnxruntime",
                                                                fallback_layers=1))
    ops = optimised_ops(deployable.path, tmp_path)
    # ONNX Runtime would re-quantize a float Conv fed by a per-tensor DequantizeLinear at load time: the kept
    # layer reads its input per channel, stays a float Conv, and the deployed model is its simulation exactly.
    assert ops.count("Conv") == 1 and ops.count("QLinearConv") == 1
    assert deployable.details["deployed_vs_simulated"]["sqnr_db"] >= 80.0
    assert "float_nodes_quantized_at_load" not in deployable.details


def test_layers_kept_float_compute_on_float_tensors_between_them(tmp_path):
    context = make_context(tmp_path)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=SMALL, runtime="onnxruntime",
                                                                skip=["conv1", "conv2", "fc"]))
    graph = onnx.load(str(deployable.path)).graph
    # Nothing int8 is left to read a quantized tensor: no rounding anywhere, and the ReLU the QDQ writer had
    # folded into conv1's quantized output is back.
    assert not [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert [n.op_type for n in graph.node].count("Relu") == 2
    x = context.example_inputs(8)
    assert torch.allclose(deployable(x), context.model(x), atol=1e-4)


def test_layers_made_float_later_join_the_layers_already_float(tmp_path):
    from torchslim.quant.mixed import _with_float_layers
    from torchslim.quant.onnx_ranges import session

    context = make_context(tmp_path)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=SMALL, runtime="onnxruntime",
                                                                skip=["conv2"]))
    full = onnx.load(str(deployable.path))
    prepared = onnx.load(str(tmp_path / "int8-static-onnxruntime" / "float.prepared.onnx"))
    rest = [n.name for n in full.graph.node if n.op_type in ("Conv", "Gemm") and not n.input[1].startswith("conv2")]
    model = _with_float_layers(full, prepared, rest)  # conv1 and fc now float too: the float model exactly
    assert not [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    x = context.example_inputs(8)
    outputs = session(model.SerializeToString(), True).run(None, {"input_0": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(outputs), context.model(x), atol=1e-4)


def test_a_float_layer_onnxruntime_still_quantizes_is_reported(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1),
                                torch.nn.ReLU(), torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 16 * 16, 10)).eval()
    # Layer 4 reads one channel: no per-channel reader can keep it float.
    context = make_context(tmp_path, dataclasses.replace(tiny_bundle(), model=model))
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=SMALL, runtime="onnxruntime",
                                                                skip=["4"]))
    assert deployable.details["float_nodes_quantized_at_load"] == deployable.details["kept_float_nodes"]
    assert len(deployable.details["kept_float_nodes"]) == 1
    assert optimised_ops(deployable.path, tmp_path).count("QLinearConv") == 3  # what the detail warns of
    assert any("ONNX Runtime quantizes it per tensor" in note for note in context.bundle.notes)


def test_max_drop_keeps_exactly_the_sensitive_layer_float(tmp_path):
    context = sensitive_context(tmp_path)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=SMALL, runtime="onnxruntime",
                                                                max_drop=0.02))
    choice = deployable.details["float_layer_choice"]
    assert choice["metric"] == "agreement" and choice["split"] == "val" and choice["samples"] == 180
    assert choice["int8_drop"] > 0.02  # every layer int8: over the limit
    assert list(choice["layers"]) == ["node_conv2d_1"]  # conv2, and only it
    assert choice["met"] and choice["drop"] <= 0.02 and [c["float_layers"] for c in choice["candidates"]] == [1]
    kept = choice["layers"]["node_conv2d_1"]
    assert kept["rank"] == 1 and kept["output_sqnr_db_alone"] < 15
    assert kept["int8"]["ms_batch"] > 0 and kept["float"]["ms_batch"] > 0 and "float_cost_ms_batch" in kept
    assert reads_float_weight(deployable.path, "conv2")
    assert not reads_float_weight(deployable.path, "conv1") and not reads_float_weight(deployable.path, "fc")
    assert "Conv" in optimised_ops(deployable.path, tmp_path)
    assert any(name.startswith("conv2") and "max_drop 0.02" in why for name, why in context.skipped.items())
    # The drop the search reports is the one the written file has on the validation split.
    assert mixed.ValidationScore(context).drop(deployable.path)[0] == pytest.approx(choice["drop"], abs=1e-6)


def test_max_drop_already_met_keeps_every_layer_int8(tmp_path):
    context = sensitive_context(tmp_path)
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=SMALL, runtime="onnxruntime",
                                                                max_drop=0.5))
    choice = deployable.details["float_layer_choice"]
    assert choice["met"] and choice["layers"] == {} and choice["candidates"] == []
    assert choice["drop"] == choice["int8_drop"] <= 0.5
    assert not any(reads_float_weight(deployable.path, n) for n in ("conv1", "conv2", "fc"))


def test_max_drop_out_of_reach_keeps_the_best_and_says_why(tmp_path, monkeypatch):
    context = sensitive_context(tmp_path)
    drops = iter([0.5, 0.4, 0.3, 0.35, 0.45])  # all int8, then 1, 2, 3 (all three) layers float
    monkeypatch.setattr(mixed.ValidationScore, "drop", lambda self, path: (d := next(drops), 1 - d))
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=SMALL, runtime="onnxruntime",
                                                                max_drop=0.01))
    choice = deployable.details["float_layer_choice"]
    assert not choice["met"] and choice["drop"] == 0.3 and len(choice["layers"]) == 2
    assert [c["float_layers"] for c in choice["candidates"]] == [1, 2, 3]
    assert "no candidate met max_drop 0.01" in choice["reason"] and "2 of 3" in choice["reason"]
    assert not list(deployable.path.parent.glob("int8.float*.onnx"))  # candidates removed


def test_fallback_slow_layers_keeps_float_the_layers_measured_slower_in_int8(tmp_path, monkeypatch):
    context = make_context(tmp_path)

    def timer(layer):  # the classifier (Gemm) runs 3x slower in int8; every convolution 2x faster
        if layer.op == "Gemm":
            return 3.0 if layer.precision == "int8" else 1.0
        return 1.0 if layer.precision == "int8" else 2.0

    monkeypatch.setattr(onnx_layer_latency, "onnx_latency_table",
                        lambda threads: LatencyTable(tmp_path / "table.json", timer, rounds=1))
    deployable = quantize_int8_static(context, Int8StaticConfig(calibration=SMALL, runtime="onnxruntime",
                                                                fallback_slow_layers=True))
    layers = deployable.details["float_layer_choice"]["layers"]
    assert list(layers) == ["node_linear"]
    assert layers["node_linear"]["int8"]["ms_batch"] == 3.0 and layers["node_linear"]["float"]["ms_batch"] == 1.0
    assert layers["node_linear"]["float_cost_ms_batch"] == -2.0  # float saves 2 ms
    assert "int8 slower" in layers["node_linear"]["why"]
    assert reads_float_weight(deployable.path, "fc")
    assert not reads_float_weight(deployable.path, "conv1") and not reads_float_weight(deployable.path, "conv2")
    assert "Gemm" in optimised_ops(deployable.path, tmp_path)  # not QGemm


def test_the_onnx_layer_table_times_each_shape_once_per_machine(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 8 * 8, 10)).eval()
    from torchslim.runtime.onnx import export_onnx

    export_onnx(model, torch.randn(2, 8, 8, 8), tmp_path / "float.onnx")
    nodes = [n.name for n in onnx.load(str(tmp_path / "float.onnx")).graph.node]
    layers = onnx_layer_latency.conv_and_gemm_layers(tmp_path / "float.onnx", nodes, batch=4)
    assert sorted(layer.op for layer in layers.values()) == ["Conv", "Gemm"]
    assert all(layer.input_shape[0] == 4 for layer in layers.values())
    shapes = [layer.at(p) for layer in layers.values() for p in ("int8", "float")]
    quiet = lambda: 0.0  # noqa: E731  (a machine that is not busy: every entry clean, none timed again)
    table = onnx_layer_latency.onnx_latency_table(1, path=tmp_path / "onnx.json", load=quiet)
    first = table.latencies(shapes)
    assert all(ms > 0 for ms in first) and table.measured == 4
    clean = [not table.entries[shape.key()].provisional for shape in shapes]  # (rounds spread <= SPREAD_LIMIT)
    again = onnx_layer_latency.onnx_latency_table(1, path=tmp_path / "onnx.json", load=quiet)
    values = again.latencies(shapes)
    # A clean entry is read back, not timed again; a provisional one (rounds spread too far) is timed again.
    assert [v for v, c in zip(values, clean) if c] == pytest.approx([v for v, c in zip(first, clean) if c], rel=1e-4)
    assert again.measured == again.retimed == clean.count(False)


@pytest.mark.parametrize("fields, message", [
    ({"max_drop": -0.1}, r"max_drop: must be in \[0, 1\), got -0.1"),
    ({"max_drop": 0.01, "fallback_layers": 2}, "max_drop: chooses the float layers by sensitivity as "
                                               "fallback_layers does: give one of them"),
    ({"max_drop": 0.01, "adaround": {"enabled": True}}, "max_drop: cannot give float layers their float weights "
                                                         "back after adaround rounded them"),
    ({"max_drop": 0.01, "runtime": "torchinductor"}, "runtime: torchinductor: does not keep layers float by "
                                                     "measured drop"),
])
def test_bad_mixed_precision_input_is_one_line(tmp_path, fields, message):
    from torchslim.recipe import parse_recipe

    raw = {"model": "builtin:tiny-test-cnn", "data": "builtin:digits",
           "steps": [{"quantize": {"method": "int8-static", **fields}}]}
    with pytest.raises(InputError, match=message) as caught:
        recipe = parse_recipe(raw, source="recipe.yaml")
        quantize_int8_static(dataclasses.replace(make_context(tmp_path), where="recipe.yaml: steps[0].quantize"),
                             recipe.steps[0].config)
    assert "\n" not in str(caught.value)
