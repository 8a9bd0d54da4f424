"""The ONNX Runtime int8 backend: export to ONNX, calibrate with torchslim's observers, write QDQ carrying our
scales (ONNX Runtime's quantizer places the nodes), run on ONNX Runtime's integer kernels.

ONNX Runtime fuses each DequantizeLinear -> op -> QuantizeLinear group into an integer kernel (QLinearConv,
QGemm, ...). On CPUs without VNNI the weights use the codes [-64, 64] (``reduce_range``) to avoid the saturation
of u8*s8 pair sums in AVX2's ``vpmaddubsw``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torchslim.core.calibration import calibration_batches
from torchslim.core.cpu import has_vnni, int8_features
from torchslim.core.modules import matches
from torchslim.runtime.onnx import export_onnx
from torchslim.quant.bias_correction import correct_onnx_biases
from torchslim.quant.onnx_float_regions import float_regions
from torchslim.quant.onnx_ranges import observe_activations, quant_overrides
from torchslim.quant.onnx_sensitivity import WEIGHTED, deployed_vs_simulated, layer_errors
from torchslim.quant.qmath import QScheme
from torchslim.runtime import OnnxRuntimeDeployable


def available() -> str | None:
    """None if this backend can run here, else what to install."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return "ONNX Runtime is not installed (pip install 'torchslim[onnx]')"
    return None


def _node_module_names(node, initializers: set[str]) -> list[str]:
    """Module paths a node belongs to: the exporter's cumulative name scopes (e.g. 'blocks', 'blocks.0',
    'blocks.0.bn1') and the owners of its weights ('blocks.0.conv1' for 'blocks.0.conv1.weight'), so a Conv
    that absorbed its BatchNorm still answers to the conv's name."""
    import ast

    names = [name.rsplit(".", 1)[0] for name in node.input if name in initializers and "." in name]
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                names += [s for s in ast.literal_eval(prop.value)[1:-1] if s]
            except (ValueError, SyntaxError):
                pass
    return names


def module_names(model_path: Path) -> dict[str, str]:
    """ONNX node name -> the innermost module it was exported from (for reports in the model's own terms)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    names = {}
    for node in graph.node:
        owners = _node_module_names(node, initializers)
        if owners:
            names[node.name] = max(owners, key=lambda n: n.count("."))
    return names


def _nodes_to_exclude(model_path: Path, patterns: list[str]) -> list[str]:
    import onnx

    if not patterns:
        return []
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return [node.name for node in graph.node
            if any(matches(name, patterns) for name in [node.name, *_node_module_names(node, initializers)])]


ACTIVATIONS = QScheme(signed=False, symmetric=False)  # uint8, asymmetric, per tensor


def attention_matmuls(graph) -> list[str]:
    """MatMul nodes that multiply two activations (attention scores and their weighted sum) — neither input a
    weight (an initializer or a Constant)."""
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                        for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


def weight_scheme(per_channel: bool) -> QScheme:
    """The weight grid ONNX Runtime's QDQ writer uses here: symmetric int8 with max-abs scales, [-64, 64]
    (``reduce_range``) on CPUs without VNNI; per output channel or per tensor."""
    return QScheme(signed=True, symmetric=True, axis=0 if per_channel else None, reduce_range=not has_vnni())


def weight_grid(config):
    """`weight_scheme`'s grid with ONNX Runtime's arithmetic (`torchslim.quant.adaround.WeightGrid`): its QDQ
    writer derives a symmetric scale from each channel's max |w| (``2 max|w| / (qmax - qmin)`` in float64, stored
    as float32) and stores ``round(w / scale)`` on [-127, 127] ([-64, 64] without VNNI)."""
    from torchslim.quant.adaround import WeightGrid

    scheme = weight_scheme(config.per_channel)
    return WeightGrid(qmin=-scheme.half_range, qmax=scheme.half_range, per_channel=config.per_channel,
                      arithmetic="onnxruntime")


def activation_simulation(config) -> tuple[QScheme, str]:
    """How this backend quantizes a layer's input: `ACTIVATIONS` with the range from ``config.observer``."""
    return ACTIVATIONS, config.observer


def _corrected(prepared: Path, means: dict, exclude: list[str], per_channel: bool) -> tuple[Path, dict]:
    """A copy of the prepared model whose quantized layers' biases cancel their weights' rounding offset."""
    import onnx

    model = onnx.load(str(prepared))
    moved = correct_onnx_biases(model, means, set(exclude), weight_scheme(per_channel))
    path = prepared.with_name(prepared.stem + ".corrected.onnx")
    onnx.save(model, str(path))
    return path, moved


def quantize_onnx_static(float_path: Path, int8_path: Path, batches: list, config, choose=None) -> dict:
    """Calibrate an ONNX model file with torchslim's observers and write it as QDQ with ONNX Runtime's
    quantizer, our scales and zero points given as overrides; returns what was done.

    ``choose(graph) -> (float nodes, corrections, details)``, given a `QuantizedGraph` whose ``int8_path``
    holds the model with every layer quantized, picks more layers to keep float and leaves ``int8_path`` holding
    that model (`torchslim.quant.mixed`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = float_path.with_name(float_path.stem + ".prepared.onnx")
    try:
        # (run in the scratch folder: when shape inference fails ONNX Runtime leaves temporary files in the cwd)
        with contextlib.chdir(float_path.parent):
            quant_pre_process(str(float_path.resolve()), str(prepared.resolve()), skip_symbolic_shape=False)
    except Exception:  # pre-processing (shape inference, BN folding) is an optimisation, not a requirement
        prepared = float_path
    import onnx

    smoothing = {}
    if getattr(config, "smoothquant", False):  # the groups a LayerNorm fold could not reach (post-LN encoders)
        from torchslim.quant.onnx_smooth import smooth_onnx

        smoothed = prepared.with_name(prepared.stem + ".smoothed.onnx")
        smoothing = smooth_onnx(prepared, smoothed, batches)
        prepared = smoothed if smoothing["smoothed"] else prepared
    muls = smoothing.pop("muls", [])  # float by design: neither quantized nor reported as layers left float
    graph = onnx.load(str(prepared), load_external_data=False).graph
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    # A transformer's residual stream, attention mask (-inf or finfo.min added to the scores) and softmax do not
    # survive one uint8 range per tensor: quantizing every op gave all-MiniLM-L6-v2 a mean cosine of 0.37 to
    # fp32, quantizing only the layers with weights 0.93. So where two activations are multiplied (attention),
    # only the weighted layers read quantized inputs, and the attention products stay float.
    attention = attention_matmuls(graph)
    op_types = list(WEIGHTED) if attention else None  # the layers with weights
    correct = config.bias_correction
    observers, samples, means = observe_activations(prepared, batches, config.observer, ACTIVATIONS,
                                                    means_of=[n.input[0] for n in layers] if correct else ())
    overrides = quant_overrides(observers)
    excluded = _nodes_to_exclude(float_path, config.skip)
    # Without VNNI, x86 u8 x s8 kernels sum pairs of products in int16 (vpmaddubsw), which saturates: measured
    # here on EfficientNet-Lite0, 8-bit weights gave 61% top-1 agreement deployed against 81% simulated.
    # Weights on [-64, 64] cannot saturate, so the deployed model computes what the simulation does.
    reduce_range = not has_vnni()

    def write(exclude: list[str], path: Path = int8_path) -> dict[str, float]:
        """Quantize to ``path`` keeping ``exclude`` float; returns the layers bias correction moved."""
        source, moved = prepared, {}
        if correct:
            source, moved = _corrected(prepared, means, exclude, config.per_channel)
        # ONNX Runtime calibrates too before applying our overrides: one sample keeps that pass short.
        one_sample = _Reader([{name: value[:1] for name, value in batches[0].items()}])
        quantize_static(str(source), str(path), one_sample, quant_format=QuantFormat.QDQ,
                        per_channel=config.per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=(exclude + attention + muls) or None,
                        op_types_to_quantize=op_types,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                       "TensorQuantOverrides": overrides,
                                       # (a tensor read by a float op too, a residual say, stays float for it)
                                       "DedicatedQDQPair": bool(attention),
                                       "OpTypesToExcludeOutputQuantization": list(WEIGHTED) if attention else []})
        if exclude:
            model = onnx.load(str(path))
            float_regions(model, onnx.load(str(prepared), load_external_data=False), set(exclude))
            onnx.save(model, str(path))
        keep_float(path, exclude)
        return moved

    corrections = write(excluded)
    chosen, choice = [], {}
    if choose is not None:
        chosen, moved, choice = choose(QuantizedGraph(prepared, int8_path, excluded, batches, write))
        corrections = corrections if moved is None else moved
    sensitive = {}
    if config.fallback_layers:
        # Measure each layer's own error in the simulated int8 model; the worst stay in float.
        errors = layer_errors(prepared, int8_path, batches[:2])
        worst = sorted((n for n in errors if n not in excluded + chosen), key=errors.get, reverse=True)
        sensitive = {name: round(errors[name], 2) for name in worst[:config.fallback_layers]}
        corrections = write(excluded + chosen + list(sensitive))
    strip_debug_metadata(int8_path)
    requantized = quantized_at_load(int8_path)
    weights = "int8 [-64, 64]" if reduce_range else "int8"
    return {"format": "QDQ", "weights": weights + (" per-channel" if config.per_channel else " per-tensor"),
            "float_layers": {name: op for name, op in float_layers(int8_path).items() if name not in muls},
            "activations": "uint8 per-tensor", "observer": config.observer, "reduce_range": reduce_range,
            "calibration_samples": samples, "cpu_int8_features": int8_features(), "kept_float_nodes": excluded,
            "sensitive_float_nodes_db": sensitive, "bias_corrected_layers": len(corrections),
            **({"attention": f"{len(attention)} activation x activation MatMuls and every op without weights kept "
                             f"float (quantized: {', '.join(WEIGHTED)})"} if attention else {}),
            "deployed_vs_simulated": deployed_vs_simulated(int8_path, batches[0]), **choice,
            **({"smoothing_onnx": smoothing} if smoothing else {}),
            **({"float_nodes_quantized_at_load": requantized} if requantized else {})}


def quantized_at_load(path: Path) -> list[str]:
    """The float Conv/Gemm nodes of a QDQ file that ONNX Runtime will still quantize when it loads it (input
    from a per-tensor DequantizeLinear, float weight: see `keep_float`)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    tensors = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    found = []
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 else None
        weight = tensors.get(node.input[1]) if source is not None else None
        scale = tensors.get(source.input[1]) if source is not None and source.op_type == "DequantizeLinear" else None
        if weight is not None and weight.data_type == onnx.TensorProto.FLOAT and scale is not None \
                and math.prod(scale.dims) == 1:
            found.append(node.name)
    return found


@dataclass
class QuantizedGraph:
    """What `quantize_onnx_static` hands a layer chooser: the float graph it quantizes (``prepared``), the file
    holding the int8 model, the nodes ``skip`` keeps float, the calibration feeds, and
    ``write(float nodes, path) -> bias corrections`` to rebuild the QDQ model keeping other layers float."""

    prepared: Path
    int8_path: Path
    excluded: list[str]
    feeds: list[dict]
    write: Callable[..., dict]


def keep_float(path: Path, nodes: list[str]) -> int:
    """Make the Conv/Gemm ``nodes`` of a QDQ file stay float in ONNX Runtime; returns how many were changed.

    ONNX Runtime (1.2x, ``WeightBiasQuantization``) quantizes at load time the float weights of a Conv or Gemm
    whose input comes from a per-tensor DequantizeLinear, so a layer the QDQ writer left float would run as
    int8 with per-tensor weights. Its input is read instead through its own DequantizeLinear with the same
    scale repeated per channel (axis 1), which that transformer leaves alone; the values are unchanged. A
    layer with one input channel cannot be kept this way and is left as it is."""
    import onnx

    if not nodes:
        return 0
    model = onnx.load(str(path))
    changed = keep_float_in(model, nodes)
    if changed:
        onnx.save(model, str(path))
    return changed


def keep_float_in(model, nodes: list[str]) -> int:
    """`keep_float` on a loaded ModelProto, in place."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    wanted, changed = set(nodes), 0
    for node in list(graph.node):
        dequantize = producers.get(node.input[0]) if node.input else None
        if node.name not in wanted or node.op_type not in ("Conv", "Gemm") or dequantize is None \
                or dequantize.op_type != "DequantizeLinear" or node.input[1] not in tensors:
            continue
        scale = tensors.get(dequantize.input[1])
        zero = tensors.get(dequantize.input[2]) if len(dequantize.input) > 2 else None
        if scale is None or len(scale.dims) > 0:
            continue
        weight = tensors[node.input[1]].dims
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            channels = weight[1] * group
        else:
            transposed = next((a.i for a in node.attribute if a.name == "transB"), 0)
            channels = weight[1] if transposed else weight[0]
        if channels < 2:
            continue
        prefix = f"{node.name}_float_input"
        graph.initializer.extend([
            numpy_helper.from_array(np.full(channels, numpy_helper.to_array(scale), np.float32), prefix + "_scale"),
            numpy_helper.from_array(np.full(channels, numpy_helper.to_array(zero) if zero is not None else 0,
                                            numpy_helper.to_array(zero).dtype if zero is not None else np.uint8),
                                    prefix + "_zero_point")])
        reader = onnx.helper.make_node("DequantizeLinear", [dequantize.input[0], prefix + "_scale",
                                                           prefix + "_zero_point"], [prefix], name=prefix, axis=1)
        graph.node.insert(list(graph.node).index(node), reader)
        node.input[0] = prefix
        changed += 1
    return changed


_PLUMBING = {"QuantizeLinear", "DequantizeLinear", "Shape", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
             "Transpose", "Concat", "Gather", "Slice", "Cast", "Constant", "Identity"}


# Operators ONNX Runtime's CPU provider fuses with their Q/DQ neighbours into integer kernels (QLinear*).
INTEGER_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "AveragePool", "GlobalAveragePool",
               "MaxPool", "Concat", "Relu", "Clip", "Sigmoid", "LeakyRelu", "Softmax", "Resize", "Where", "Split",
               "ArgMax"}


def float_layers(int8_path: Path) -> dict[str, str]:
    """``{node: op type}`` of the layers with parameters that still compute in float after quantization —
    op types no integer kernel takes (InstanceNormalization, LayerNormalization, ...) or excluded layers."""
    import onnx

    graph = onnx.load(str(int8_path)).graph
    tensors = {t.name for t in graph.initializer if len(t.dims) >= 1}  # (int64 axes and shapes are not weights)
    weights = {t.name for t in graph.initializer if len(t.dims) >= 1 and t.data_type == onnx.TensorProto.FLOAT}
    weights |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    dequantized = {o for node in graph.node if node.op_type == "DequantizeLinear" for o in node.output}
    weights |= {o for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in tensors for o in n.output}
    layers = {}
    for node in graph.node:
        if node.op_type in _PLUMBING or (node.op_type in INTEGER_OPS and any(i in dequantized for i in node.input)):
            continue
        if any(i in weights for i in node.input[1:]):
            layers[node.name] = node.op_type
    return layers


def strip_debug_metadata(path: Path) -> None:
    """Drop per-node doc strings and exporter metadata (stack traces, module scopes): they cost ~15% of a small
    int8 file and nothing at run time."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    onnx.save(model, str(path))


class _Reader:
    """ONNX Runtime CalibrationDataReader over prepared feeds (its own ranges are replaced by ours)."""

    def __init__(self, feeds: list):
        from torchslim._progress import bar

        self.feeds = iter(bar(feeds, desc="calibrating (ONNX Runtime)"))

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):  # one pass is all the quantizer makes
        pass


def _feeds(context, config) -> list[dict]:
    feeds = []
    for batch in calibration_batches(context, config):
        inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
        feeds.append({f"input_{i}": t.numpy() for i, t in enumerate(inputs)})
    return feeds


def build(context, config, choose=None) -> OnnxRuntimeDeployable:
    """Export ``context.model``, quantize it with calibration and load it in ONNX Runtime (``choose``: a layer
    chooser, see `quantize_onnx_static`)."""
    workdir = context.scratch("int8-static-onnxruntime")
    float_path, int8_path = workdir / "float.onnx", workdir / "int8.onnx"
    started = time.perf_counter()
    exporter = export_onnx(context.model, context.example_inputs(2), float_path)
    exported = time.perf_counter()
    details = quantize_onnx_static(float_path, int8_path, _feeds(context, config), config, choose)
    details.update(exporter=exporter, export_seconds=round(exported - started, 2),
                   ptq_seconds=round(time.perf_counter() - exported, 2))
    modules = module_names(float_path)
    check = details["deployed_vs_simulated"]
    if check["top1_agreement"] < 0.9 or check["sqnr_db"] < 15:
        # The fused kernels compute something else than the QDQ graph says (seen when a layer in the middle of
        # a fused chain is kept float): the accuracy measured below is the deployed one, but say why it differs.
        context.bundle.notes.append(
            f"{context.where}: ONNX Runtime's fused int8 model departs from its QDQ simulation (SQNR "
            f"{check['sqnr_db']} dB, top-1 agreement {check['top1_agreement']}); try without skip/fallback layers")

    def layer(node: str) -> str:
        return f"{modules[node]} ({node})" if node in modules else node

    for name in details["kept_float_nodes"]:
        context.skip_layer(layer(name), "kept in float (matched quantize.skip)")
    mixed = details.get("float_layer_choice", {}).get("layers", {})
    chosen = set(details["kept_float_nodes"]) | set(details["sensitive_float_nodes_db"]) | set(mixed)
    for name, op in details["float_layers"].items():
        if name not in chosen:
            context.skip_layer(layer(name), f"{op}: no integer kernel takes it in ONNX Runtime, kept in float")
    for name, loss in details["sensitive_float_nodes_db"].items():
        context.skip_layer(layer(name), f"kept in float: its int8 output lost {loss} dB SQNR, among the "
                                        f"{config.fallback_layers} worst (quantize.fallback_layers)")
    for name in details.get("float_nodes_quantized_at_load", []):
        context.bundle.notes.append(f"{context.where}: {layer(name)} was to stay float, but ONNX Runtime quantizes "
                                    "it per tensor when it loads the model (one input channel)")
    for name, why in mixed.items():
        cost = f"; float costs {why['float_cost_ms_batch']} ms at batch {context.batch_size}" \
            if "float_cost_ms_batch" in why else ""
        context.skip_layer(layer(name), f"kept in float: {why['why']}{cost}")
    return OnnxRuntimeDeployable(int8_path, context.model, context.threads, details=details)
