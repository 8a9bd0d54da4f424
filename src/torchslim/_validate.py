"""Checks that artifact readers run before they allocate anything: JSON documents against their schema, and
every recorded shape against the safetensors header (which gives shapes without reading a tensor).

Each check raises `torchslim.errors.ArtifactError` naming the file and the entry, never a TypeError or KeyError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchslim.errors import ArtifactError, key_text, shorten

MAX_JSON_BYTES = 64 << 20
MAX_DIMS = 8
MAX_DIM = 1 << 31


def read_json(path: Path) -> Any:
    """The JSON document at ``path`` (at most `MAX_JSON_BYTES`)."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ArtifactError(f"{path}: larger than {MAX_JSON_BYTES:,} bytes; not a torchslim artifact file")
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (OSError, ValueError, RecursionError) as error:
        raise ArtifactError(f"{path}: not valid JSON ({shorten(str(error), 120)})") from None


def require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise ArtifactError(f"{path}: {message}")


def check_format(document: Any, path: Path, expected: str) -> dict:
    """``document`` as a mapping stamped ``"format": expected``."""
    stamp = document.get("format") if isinstance(document, dict) else None
    require(stamp == expected, path, f"not a {expected} file (format {shorten(stamp)})")
    return document


def is_shape(value: Any) -> bool:
    return (isinstance(value, list) and len(value) <= MAX_DIMS
            and all(type(d) is int and 0 <= d < MAX_DIM for d in value))


def safetensors_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """``({tensor name: shape}, metadata)`` of a safetensors file, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}, dict(handle.metadata() or {})
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ArtifactError(f"{path}: not a readable safetensors file ({shorten(str(error), 120)})") from None


def load_tensors(path: Path) -> dict:
    """Every tensor of a safetensors file (no pickle)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except Exception as error:  # safetensors raises its own error types
        raise ArtifactError(f"{path}: not a readable safetensors file ({shorten(str(error), 120)})") from None


def read_shapes(directory: Path, shapes_format: str) -> dict[str, list[int]]:
    """``model.shapes.json`` of ``directory``, validated, every shape checked against ``model.safetensors``.

    A name absent from the weights file is a tied tensor (saved once, under another name): its shape must be
    that of some tensor the file holds.
    """
    path = directory / "model.shapes.json"
    document = check_format(read_json(path), path, shapes_format)
    shapes = document.get("shapes")
    require(isinstance(shapes, dict), path, "'shapes' must map tensor names to shapes")
    for name, shape in shapes.items():
        require(is_shape(shape), path, f"shape of {key_text(name)} must be a list of at most {MAX_DIMS} sizes "
                                       f"in [0, 2**31), got {shorten(shape)}")
    weights = directory / "model.safetensors"
    stored, _ = safetensors_header(weights)
    present = {tuple(shape) for shape in stored.values()}
    for name, shape in shapes.items():
        saved = stored.get(name)
        if saved is not None and saved != shape:
            raise ArtifactError(f"{path}: {key_text(name)} is {shape}, {weights.name} holds {saved}")
        if saved is None and tuple(shape) not in present:
            raise ArtifactError(f"{path}: {key_text(name)} ({shape}) is not in {weights.name}")
    for name in stored:
        require(name in shapes, path, f"{weights.name} holds {key_text(name)}, which it does not list")
    return shapes


_LAYER_KEYS = {"kind": str, "bits": int, "group_size": int, "in_features": int, "out_features": int,
               "has_bias": bool, "has_input_scale": bool}


def _check_layer(path: Path, name: str, spec: Any) -> None:
    where = f"layers.{key_text(name)}"
    require(isinstance(spec, dict), path, f"{where} must be a mapping")
    for key, kind in _LAYER_KEYS.items():
        require(type(spec.get(key)) is kind, path, f"{where}.{key} must be a {kind.__name__}, "
                                                   f"got {shorten(spec.get(key))}")
    require(spec["kind"] in ("linear", "embedding"), path, f"{where}.kind must be linear or embedding")
    require(spec["bits"] in (4, 8), path, f"{where}.bits must be 4 or 8, got {spec['bits']}")
    for key in ("in_features", "out_features"):
        require(1 <= spec[key] < MAX_DIM, path, f"{where}.{key} must be in [1, 2**31), got {shorten(spec[key])}")
    group, width = spec["group_size"], spec["in_features"]
    require(group == 0 or (0 < group <= width and width % group == 0), path,
            f"{where}.group_size {shorten(group)} does not divide in_features {width}")
    require(spec["bits"] == 8 or width % 2 == 0, path, f"{where}: int4 codes need an even in_features")
    require(spec.get("shares") is None or isinstance(spec.get("shares"), str), path, f"{where}.shares must be a "
                                                                                      f"layer name or null")


def check_weight_only_layers(document: Any, path: Path, weights: Path, expected_format: str) -> dict[str, dict]:
    """The ``layers`` of ``model.weight_only.json``, validated; each packed table's shape checked against the
    safetensors header (a tied table is saved once, under one of its two names)."""
    layers = check_format(document, path, expected_format).get("layers")
    require(isinstance(layers, dict), path, "'layers' must map module names to their packing")
    for name, spec in layers.items():
        _check_layer(path, name, spec)
    stored, _ = safetensors_header(weights)
    partners: dict[str, set[str]] = {name: set() for name in layers}
    for name, spec in layers.items():
        owner = spec.get("shares")
        if owner is not None:
            require(owner in layers, path, f"layers.{key_text(name)}.shares names {key_text(owner)}, not a layer")
            partners[name].add(owner)
            partners[owner].add(name)
    for name, spec in layers.items():
        width = spec["in_features"] // 2 if spec["bits"] == 4 else spec["in_features"]
        expected = [spec["out_features"], width]
        if not any(stored.get(f"{n}.qweight") == expected for n in (name, *partners[name])):
            raise ArtifactError(f"{path}: layers.{key_text(name)} records a {expected} table; {weights.name} "
                                f"holds {stored.get(f'{name}.qweight', 'none')}")
    return layers


def check_onnx(path: Path, *, verify: bool = True) -> None:
    """Check an ONNX file before a runtime loads it: against its folder's ``manifest.json`` when there is one
    and ``verify`` is on (the SHA-256 catches any changed byte), else with onnx's checker (structure only, no
    weights compared; cheap).
    """
    from torchslim.integrity import verify_manifest

    path = Path(path)
    if verify_manifest(path.parent, [path.name], verify=verify) is not None:
        return
    try:
        import onnx
    except ImportError:  # nothing more to check with; the runtime still parses the file
        return
    try:
        onnx.checker.check_model(str(path))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except Exception as error:  # onnx raises ValidationError, DecodeError and others
        raise ArtifactError(f"{path}: not a valid ONNX model ({shorten(str(error).strip(), 120)})") from None
