"""The ONNX Runtime int8 backend: export to ONNX, calibrate, write QDQ, run on ONNX Runtime's integer kernels.

ONNX Runtime fuses each DequantizeLinear -> op -> QuantizeLinear group into an integer kernel (QLinearConv,
QGemm, ...). On CPUs without VNNI the weights use 7 bits (``reduce_range``) to avoid the saturation of u8*s8
pair sums in AVX2's ``vpmaddubsw``.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from torchslim.export import export_onnx
from torchslim.quant.cpu import has_vnni, int8_features
from torchslim.quant.calibration import calibration_batches
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


def _nodes_to_exclude(model_path: Path, patterns: list[str]) -> list[str]:
    import onnx

    if not patterns:
        return []
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return [node.name for node in graph.node
            if any(fnmatch.fnmatch(name, p) for p in patterns
                   for name in [node.name, *_node_module_names(node, initializers)])]


def quantize_onnx_static(float_path: Path, int8_path: Path, calibration, config) -> dict:
    """Calibrate and quantize an ONNX model file with ONNX Runtime's QDQ quantizer; returns what was done."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = float_path.with_name(float_path.stem + ".prepared.onnx")
    try:
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=False)
    except Exception:  # pre-processing (shape inference, BN folding) is an optimisation, not a requirement
        prepared = float_path
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[config.observer]
    excluded = _nodes_to_exclude(float_path, config.skip)
    reduce_range = not has_vnni()
    quantize_static(str(prepared), str(int8_path), calibration, quant_format=QuantFormat.QDQ,
                    per_channel=config.per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=excluded or None,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    strip_debug_metadata(int8_path)
    return {"format": "QDQ", "weights": "int8 per-channel" if config.per_channel else "int8 per-tensor",
            "activations": "uint8 per-tensor", "observer": config.observer, "reduce_range": reduce_range,
            "cpu_int8_features": int8_features(), "kept_float_nodes": excluded}


def strip_debug_metadata(path: Path) -> None:
    """Drop per-node doc strings and exporter metadata (stack traces, module scopes): they cost ~15% of a small
    int8 file and nothing at run time."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    onnx.save(model, str(path))


class _Calibration:
    """ONNX Runtime CalibrationDataReader over the data's calibration split."""

    def __init__(self, context, config):
        self.batches = calibration_batches(context, config)
        self.samples = 0

    def get_next(self):
        batch = next(self.batches, None)
        if batch is None:
            return None
        inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
        self.samples += len(inputs[0])
        return {f"input_{i}": t.numpy() for i, t in enumerate(inputs)}

    def rewind(self):  # not needed: one pass
        pass




def build(context, config) -> OnnxRuntimeDeployable:
    """Export ``context.model``, quantize it with calibration and load it in ONNX Runtime."""
    workdir = context.scratch("int8-static-onnxruntime")
    float_path, int8_path = workdir / "float.onnx", workdir / "int8.onnx"
    exporter = export_onnx(context.model, context.example_inputs(2), float_path)
    calibration = _Calibration(context, config)
    details = quantize_onnx_static(float_path, int8_path, calibration, config)
    details.update(exporter=exporter, calibration_samples=calibration.samples)
    for name in details["kept_float_nodes"]:
        context.skip_layer(name, "kept in float (matched quantize.skip)")
    return OnnxRuntimeDeployable(int8_path, context.model, context.threads, details=details)
