"""Single-layer latencies on ONNX Runtime, int8 against float, timed once per machine and cached.

What ``fallback_slow_layers`` asks of a quantized layer: does its fused int8 kernel (QLinearConv, QGemm) run
faster here than the float kernel it would otherwise use? Each Conv or Gemm node of the float graph becomes two
standalone ONNX models with the same uint8 input and output, as the layer sits in an int8 graph:

- ``int8``: ``u8 -> DequantizeLinear -> Conv(DequantizeLinear(int8 W), DequantizeLinear(int32 b)) ->
  QuantizeLinear -> u8``, which ONNX Runtime fuses into one integer kernel;
- ``float``: ``u8 -> DequantizeLinear -> Conv(float W, float b) -> QuantizeLinear -> u8``: the float kernel plus
  the conversions a layer kept float between int8 neighbours costs (its input read per channel, as
  `torchslim.quant.onnx_backend.keep_float` writes it, so that ONNX Runtime does not quantize it at load).

Both sides of a fused layer also pay two layout Transposes in a standalone model (ONNX Runtime runs integer and
blocked float convolutions in other layouts than NCHW; in a whole graph they cancel between neighbours).

Both run at the layer's real input shape (batch 1 and the recipe's batch) with the run's threads. Entries live
in the same cache folder as the PyTorch table (`torchslim.measure.layer_latency`), one JSON file per (CPU,
vector extensions, threads, torch and ONNX Runtime versions), so a second run on the machine times nothing.

Example:
    >>> table = onnx_latency_table(threads=2)
    >>> layers = conv_and_gemm_layers(Path("float.onnx"), ["/conv/Conv"], batch=16)
    >>> table.latencies([layers["/conv/Conv"].at("int8"), layers["/conv/Conv"].at("float")])
    [0.21, 0.34]                             # milliseconds, on the machine that ran it
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from torchslim._cache import cache_dir
from torchslim.measure.layer_latency import LatencyTable, machine

TIMED_OPS = ("Conv", "Gemm")


@dataclass(frozen=True)
class OnnxLayer:
    """One Conv or Gemm node as the table times it: its attributes (sorted (name, value) pairs), weight shape,
    whether it has a bias, the full input shape (batch included) and ``precision`` ("int8" or "float")."""

    op: str
    attributes: tuple
    weight_shape: tuple[int, ...]
    bias: bool
    input_shape: tuple[int, ...]
    precision: str = "float"

    def at(self, precision: str, batch: int | None = None) -> OnnxLayer:
        """This layer in ``precision`` (and with its input's batch dimension set to ``batch``)."""
        shape = self.input_shape if batch is None else (batch, *self.input_shape[1:])
        return dataclasses.replace(self, precision=precision, input_shape=shape)

    def key(self) -> str:
        attributes = ",".join(f"{k}={v}" for k, v in self.attributes)
        return (f"onnx {self.op} {self.precision} w={list(self.weight_shape)} bias={self.bias} {attributes} "
                f"x={list(self.input_shape)}")

    def build(self) -> tuple[bytes, dict[str, np.ndarray]]:
        """The standalone model (random weights, fixed scales) and a random uint8 feed."""
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        weight = (rng.standard_normal(self.weight_shape) * 0.1).astype(np.float32)
        attributes = dict(self.attributes)
        # Gemm's output channels are the rows of B when transB = 1, else its columns.
        axis = 0 if self.op == "Conv" or attributes.get("transB", 0) else 1
        outputs = self.weight_shape[axis]
        bias = (rng.standard_normal(outputs) * 0.1).astype(np.float32)
        x_scale, w_scale = np.float32(0.02), (np.abs(weight).max(axis=tuple(
            d for d in range(weight.ndim) if d != axis)) / 127).astype(np.float32)
        initializers = [numpy_helper.from_array(np.array(x_scale, np.float32), "x_scale"),
                        numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
                        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
                        numpy_helper.from_array(np.array(128, np.uint8), "y_zero")]
        nodes = [helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["x_float"])]
        if self.precision == "float":  # read as a kept layer reads it (`onnx_backend.keep_float`)
            channels = self.input_shape[1]
            initializers[:2] = [numpy_helper.from_array(np.full(channels, x_scale, np.float32), "x_scale"),
                                numpy_helper.from_array(np.full(channels, 128, np.uint8), "x_zero")]
            nodes[0] = helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["x_float"], axis=1)
        if self.precision == "int8":
            shape = [-1 if d == axis else 1 for d in range(weight.ndim)]
            codes = np.clip(np.round(weight / w_scale.reshape(shape)), -127, 127).astype(np.int8)
            bias_scale = (x_scale * w_scale).astype(np.float32)
            initializers += [numpy_helper.from_array(codes, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
                             numpy_helper.from_array(np.zeros(outputs, np.int8), "w_zero"),
                             numpy_helper.from_array(np.round(bias / bias_scale).astype(np.int32), "b_q"),
                             numpy_helper.from_array(bias_scale, "b_scale"),
                             numpy_helper.from_array(np.zeros(outputs, np.int32), "b_zero")]
            nodes += [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=axis),
                      helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zero"], ["b"], axis=0)]
        else:
            initializers += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
        inputs = ["x_float", "w", "b"] if self.bias or self.op == "Gemm" else ["x_float", "w"]
        nodes += [helper.make_node(self.op, inputs, ["y_float"], **attributes),
                  helper.make_node("QuantizeLinear", ["y_float", "y_scale", "y_zero"], ["y"])]
        graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.UINT8,
                                                                                 list(self.input_shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        feed = {"x": rng.integers(0, 256, self.input_shape, dtype=np.uint8)}
        return model.SerializeToString(), feed


def conv_and_gemm_layers(float_path: Path, names, batch: int = 1) -> dict[str, OnnxLayer]:
    """``{node name: OnnxLayer}`` for the Conv and Gemm nodes ``names`` of an ONNX float graph whose weight is a
    stored tensor and whose input shape shape inference knows (but for the batch, set to ``batch``)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(float_path)))
    graph = model.graph
    shapes = {}
    for value in [*graph.input, *graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    weights = {t.name: tuple(t.dims) for t in graph.initializer}
    wanted, layers = set(names), {}
    for node in graph.node:
        if node.name not in wanted or node.op_type not in TIMED_OPS or len(node.input) < 2:
            continue
        shape = shapes.get(node.input[0])
        if node.input[1] not in weights or not shape or any(d is None for d in shape[1:]):
            continue
        attributes = tuple(sorted((a.name, _attribute(a)) for a in node.attribute))
        layers[node.name] = OnnxLayer(node.op_type, attributes, weights[node.input[1]],
                                      len(node.input) > 2 and bool(node.input[2]), (batch, *shape[1:]))
    return layers


def _attribute(attribute):
    import onnx

    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    return tuple(value) if isinstance(value, (list, tuple)) else value


class OnnxLayerTimer:
    """The fastest of ``repeats`` runs of a layer's standalone model, in milliseconds; sessions are made (and
    warmed up) once and kept until `clear`, so `LatencyTable`'s interleaved rounds only run them."""

    def __init__(self, threads: int, repeats: int = 3):
        self.threads, self.repeats = threads, repeats
        self.sessions: dict[str, tuple] = {}

    def __call__(self, layer: OnnxLayer) -> float:
        from torchslim.quant.onnx_ranges import session

        key = layer.key()
        if key not in self.sessions:
            model, feed = layer.build()
            run = session(model, True, self.threads)
            run.run(None, feed)
            self.sessions[key] = run, feed
        run, feed = self.sessions[key]
        best = float("inf")
        for _ in range(self.repeats):
            started = time.perf_counter()
            run.run(None, feed)
            best = min(best, (time.perf_counter() - started) * 1000)
        return best

    def clear(self) -> None:
        self.sessions.clear()


def onnx_latency_table(threads: int, timer=None, path: Path | None = None, load=None) -> LatencyTable:
    """The cached table of `OnnxLayer` latencies for this machine, ONNX Runtime version and thread count
    (``load``: the load-average reader `LatencyTable` judges its entries by; tests pass a fixed one)."""
    import onnxruntime

    if path is None:
        key = {**machine(), "threads": threads, "onnxruntime": onnxruntime.__version__}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir("latency") / f"onnxruntime-{digest}.json"
    return LatencyTable(path, timer or OnnxLayerTimer(threads), load=load)
