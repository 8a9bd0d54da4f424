"""``quantize: {method: int8-dynamic}``: int8 weights, activations quantized on the fly per batch.

For Linear-heavy models (transformers, recommenders' MLPs): no calibration, the activation range is measured
at run time for every input, so nothing about the input distribution is assumed; embedding tables (Gather) are
stored as int8 too. Executed by ONNX Runtime's integer kernels (DynamicQuantizeLinear + MatMulInteger).
Convolutions stay in float (dynamic quantization of convolutions is slow on ONNX Runtime's CPU kernels), and so
do layers matching ``skip``, which are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torchslim._deprecated import renamed
from torchslim.core.cpu import has_vnni, int8_features
from torchslim.errors import InputError
from torchslim.runtime.onnx import export_onnx
from torchslim.registry import register_method
from torchslim.runtime import OnnxRuntimeDeployable


@dataclass(frozen=True)
class Int8DynamicConfig:
    """Config of ``quantize: {method: int8-dynamic, ...}``.

    Args:
        runtime: "onnxruntime" (the integer kernels that run it).
        per_channel: one weight scale per output feature (else per tensor).
        skip: module-name patterns (fnmatch) kept in float, e.g. ["classifier"].
    """

    runtime: Literal["onnxruntime"] = "onnxruntime"
    per_channel: bool = True
    skip: list[str] = field(default_factory=list)
    version: int = 1


@register_method("quantize", "int8-dynamic", Int8DynamicConfig)
def quantize_int8_dynamic(context, config: Int8DynamicConfig) -> OnnxRuntimeDeployable:
    """Export ``context.model`` to ONNX; MatMul/Gemm weights and embedding tables to int8, activations dynamic."""
    from torchslim.quant import onnx_backend

    reason = onnx_backend.available()
    if reason:
        raise InputError(f"{context.where}.runtime: onnxruntime: {reason}")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    workdir = context.scratch("int8-dynamic-onnxruntime")
    float_path, int8_path = workdir / "float.onnx", workdir / "int8.onnx"
    exporter = export_onnx(context.model, context.example_inputs(2), float_path)
    excluded = onnx_backend._nodes_to_exclude(float_path, config.skip)
    reduce_range = not has_vnni()  # the same u8 x s8 int16 saturation trap as static quantization
    quantize_dynamic(str(float_path), str(int8_path), per_channel=config.per_channel, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                     nodes_to_exclude=excluded or None)
    onnx_backend.strip_debug_metadata(int8_path)
    for name in excluded:
        context.skip_layer(name, "kept in float (matched quantize.skip)")
    details = {"format": "dynamic (DynamicQuantizeLinear + MatMulInteger)",
               "weights": ("int8 [-64, 64]" if reduce_range else "int8") + (" per-channel" if config.per_channel
                                                                  else " per-tensor"),
               "activations": "uint8 per-tensor, range measured per batch at run time", "reduce_range": reduce_range,
               "cpu_int8_features": int8_features(), "kept_float_nodes": excluded, "exporter": exporter,
               "runtime_choice": "onnxruntime"}
    return OnnxRuntimeDeployable(int8_path, context.model, context.threads, details=details)


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "Int8Dynamic": "Int8DynamicConfig",
})
