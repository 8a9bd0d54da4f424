"""Where an artifact's bytes go: by layer group (``blocks.3``, ``fc``) and by kind of tensor (float32 weights,
int8 weights, their scales), read from the file itself (the safetensors header or the ONNX initializers; no
tensor data is loaded). report.json keeps it as ``size_breakdown``; report.html draws it."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

# ONNX quantization suffixes (QDQ initializers): what they hold besides the values themselves.
SUFFIXES = (("_quantized", ""), ("_scale", "scales"), ("_zero_point", "zero points"))
LEAVES = {"weight": "weights", "bias": "biases", "running_mean": "norm statistics",
          "running_var": "norm statistics", "num_batches_tracked": "norm statistics"}
MAX_GROUPS = 30
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3",
          "F8_E5M2": "float8_e5m2"}


def _split(name: str) -> tuple[str, str]:
    """(module path, what the tensor holds): 'blocks.0.conv1.weight_scale' -> ('blocks.0.conv1', 'scales'),
    'fc.bias_quantized' -> ('fc', 'biases')."""
    role = ""
    for suffix, meaning in SUFFIXES:
        if name.endswith(suffix):
            name, role = name[: -len(suffix)], meaning
            break
    module, _, leaf = name.rpartition(".")
    return module, role or LEAVES.get(leaf, "other")


def _group(module: str, depth: int) -> str:
    return ".".join(module.split(".")[:depth]) if module else "other (graph constants)"


def _breakdown(tensors: list[tuple[str, str, int]]) -> dict:
    """``{"groups": {group: bytes}, "kinds": {kind: bytes}, "total": bytes}`` of (name, dtype, bytes) triples;
    groups are module paths cut to two parts (one where that still makes more than ``MAX_GROUPS``)."""
    kinds: dict[str, int] = {}
    parts = []
    for name, dtype, size in tensors:
        module, role = _split(name)
        kind = f"{dtype} {role}"
        kinds[kind] = kinds.get(kind, 0) + size
        parts.append((module, size))
    for depth in (2, 1):
        groups: dict[str, int] = {}
        for module, size in parts:
            groups[_group(module, depth)] = groups.get(_group(module, depth), 0) + size
        if len(groups) <= MAX_GROUPS:
            break
    return {"groups": groups, "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "total": sum(size for _, _, size in tensors)}


def _safetensors(path: Path) -> list[tuple[str, str, int]]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 << 20:
            raise ValueError("safetensors header larger than 100 MB")
        header = json.loads(handle.read(length))
    return [(name, DTYPES.get(str(entry["dtype"]), str(entry["dtype"]).lower()),
             int(entry["data_offsets"][1]) - int(entry["data_offsets"][0]))
            for name, entry in header.items() if name != "__metadata__"]


def _onnx(path: Path) -> list[tuple[str, str, int]]:
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    tensors = []
    for tensor in model.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        tensors.append((tensor.name, dtype.name, math.prod(tensor.dims) * dtype.itemsize))
    return tensors


def artifact_breakdown(path: str | Path) -> dict | None:
    """The breakdown of the artifact at ``path`` (.safetensors or .onnx), or None for other formats (a .tslim
    reports its own parts in its step's details)."""
    path = Path(path)
    readers = {".safetensors": _safetensors, ".onnx": _onnx}
    if path.suffix not in readers or not path.is_file():
        return None
    tensors = readers[path.suffix](path)
    return _breakdown(tensors) if tensors else None
