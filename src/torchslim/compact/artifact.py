"""The compact artifact (``model.tslim``): a model with shared weights, entropy coded, in one checked file.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"TSLM"
    4       1     format version (1)
    5       4     H: length of the header (uint32)
    9       4     CRC32 of the header bytes (uint32)
    13      H     header: raw-deflate-compressed UTF-8 JSON (below)
    13+H    ...   the sections, in the header's order, back to back; the file ends with the last one

Header JSON::

    {"codebook": "f16" | "f32",                      # how the codebooks are stored
     "sections": [[name, length, crc32], ...],       # "codebooks", "indices", "positions", "tensors"
     "shared":   [[name, shape, dtype, bits, nonzero], ...],   # e.g. ["fc1.weight", [300, 64], "float32", 4, 1841]
     "tensors":  [[name, shape, dtype, how], ...]}   # how: "raw", "f16", "f32", "i8" or "=<name>" (tied)

Sections:

* ``codebooks``: the ``2**bits`` centroids of each shared layer, in header order (fp16 or fp32).
* ``indices``: one ANS stream (`torchslim.compact.entropy`) with, per shared layer, the cluster index of each
  non-zero weight (row-major order), coded with a categorical model of the index counts.
* ``positions``: one ANS stream with, per shared layer, the positions of the non-zeros as Exp-Golomb-bucketed
  gaps (Deep Compression's relative indexing); pruned weights are not stored at all.
* ``tensors``: every other state-dict entry (biases, norms, unshared layers) in header order: ``raw`` bytes of
  its dtype, ``f16``/``f32`` casts of float tensors, or ``i8``: an int16 exponent ``e`` then int8 values ``q``
  with value ``q * 2**e`` (a power-of-two scale, so storing a stored tensor again changes nothing).

Every section's CRC32 sits in the header, and the header's own CRC32 in the preamble: a flipped or missing
byte raises `ArtifactError` naming the file and the section, never wrong weights. Decoding is bit-exact: a
module written after `round_to_storage_` reads back to identical tensors.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from torchslim._cache import atomic_write_bytes
from torchslim._deprecated import renamed
from torchslim.compact.entropy import CodingError, SectionReader, SectionWriter
from torchslim.compact.sharing import MAX_BITS, shared_layers, unshare_
from torchslim.core.modules import call_model
from torchslim.errors import ArtifactError
from torchslim.runtime import TorchDeployable

MAGIC = b"TSLM"
VERSION = 1
PREAMBLE = struct.Struct("<4sBII")
SECTIONS = ("codebooks", "indices", "positions", "tensors")
ARTIFACT_NAME = "model.tslim"
_CAST = {"f16": torch.float16, "f32": torch.float32}


@dataclass
class Storage:
    """How the artifact stores what is neither a cluster index nor a position.

    Args:
        codebook: "fp16" or "fp32" centroids.
        other: biases and every other float tensor: "fp32", "fp16", or "int8" (per tensor, power-of-two scale).
    """

    codebook: Literal["fp16", "fp32"] = "fp16"
    other: Literal["fp32", "fp16", "int8"] = "fp16"


# -- tensors ----------------------------------------------------------------------------------------------------
def _to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_bytes(payload: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    numel = int(np.prod(shape))
    if len(payload) != numel * dtype.itemsize:
        raise CodingError(f"{len(payload)} bytes for {numel} values of {dtype}")
    if not numel:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(shape)


def _how(tensor: torch.Tensor, storage: Storage) -> str:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return "raw"
    return {"fp16": "f16", "fp32": "f32", "int8": "i8"}[storage.other]


def _encode_tensor(tensor: torch.Tensor, how: str) -> bytes:
    tensor = tensor.detach().cpu()
    if how == "raw":
        return _to_bytes(tensor)
    if how in _CAST:
        return _to_bytes(tensor.to(_CAST[how]))
    peak = float(tensor.abs().max())
    exponent = 0 if peak == 0 or not np.isfinite(peak) else int(np.ceil(np.log2(peak / 127)))
    scale = torch.tensor(2.0 ** exponent, dtype=torch.float64)
    q = torch.round(tensor.double() / scale).clamp(-127, 127).to(torch.int8)
    return struct.pack("<h", exponent) + _to_bytes(q)


def _tensor_bytes(shape: list[int], dtype: torch.dtype, how: str) -> int:
    numel = int(np.prod(shape))
    if how not in ("raw", "i8", *_CAST):
        raise CodingError(f"unknown tensor storage {how!r}")
    if how == "i8":
        return 2 + numel
    return numel * (_CAST[how] if how in _CAST else dtype).itemsize


def _decode_tensor(payload: bytes, shape: list[int], dtype: torch.dtype, how: str) -> torch.Tensor:
    if how == "raw":
        return _from_bytes(payload, dtype, shape)
    if how in _CAST:
        return _from_bytes(payload, _CAST[how], shape).to(dtype)
    if how != "i8":
        raise CodingError(f"unknown tensor storage {how!r}")
    (exponent,) = struct.unpack("<h", payload[:2])
    q = _from_bytes(payload[2:], torch.int8, shape)
    return (q.double() * 2.0 ** exponent).to(dtype)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _other_tensors(module: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The state dict less the shared layers' parametrization entries (their weights are coded apart)."""
    prefixes = tuple(f"{name}.parametrizations.weight." if name else "parametrizations.weight."
                     for name in shared_layers(module))
    return {k: v for k, v in module.state_dict(keep_vars=keep_vars).items() if not k.startswith(prefixes)}


def round_to_storage_(module: nn.Module, storage: Storage) -> nn.Module:
    """Round codebooks and other float tensors in place to what the artifact stores, so that the model and its
    decoded artifact are bit-identical (rounding is idempotent: a rounded module rounds to itself)."""
    with torch.no_grad():
        for shared in shared_layers(module).values():
            codebook = shared.codebook
            how = "f16" if storage.codebook == "fp16" else "f32"
            codebook.copy_(_decode_tensor(_encode_tensor(codebook, how), list(codebook.shape), codebook.dtype, how))
        for tensor in _other_tensors(module, keep_vars=True).values():
            how = _how(tensor, storage)
            if how != "raw":
                decoded = _decode_tensor(_encode_tensor(tensor, how), list(tensor.shape), tensor.dtype, how)
                tensor.data.copy_(decoded.to(tensor.device))
    return module


# -- writing ----------------------------------------------------------------------------------------------------
def _shared_entries(module: nn.Module, storage: Storage, sections: dict[str, Any]) -> list[list]:
    entries = []
    how = "f16" if storage.codebook == "fp16" else "f32"
    for name, shared in shared_layers(module).items():
        keep = shared.keep.detach().cpu().flatten().numpy()
        positions = np.flatnonzero(keep)
        indices = shared.indices.detach().cpu().flatten().numpy()[positions]
        sections["codebooks"] += _encode_tensor(shared.codebook, how)
        sections["indices"].add_symbols(indices, shared.codebook.numel())
        sections["positions"].add_gaps(positions)
        entries.append([f"{name}.weight" if name else "weight", list(shared.keep.shape),
                        str(shared.codebook.dtype).removeprefix("torch."), shared.bits, int(positions.size)])
    return entries


def _tensor_entries(module: nn.Module, storage: Storage, sections: dict[str, Any]) -> list[list]:
    entries, seen = [], {}
    for name, tensor in _other_tensors(module).items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:  # tied: stored once
            entries.append([name, list(tensor.shape), dtype, f"={seen[key]}"])
            continue
        seen[key] = name
        how = _how(tensor, storage)
        sections["tensors"] += _encode_tensor(tensor, how)
        entries.append([name, list(tensor.shape), dtype, how])
    return entries


def encode_artifact(module: nn.Module, storage: Storage | None = None) -> tuple[bytes, dict[str, int]]:
    """The artifact's bytes and its size per component (``header`` includes the 13-byte preamble)."""
    if sys.byteorder != "little":  # pragma: no cover - tensors are written as raw little-endian bytes
        raise RuntimeError("the compact artifact is written on little-endian machines only")
    storage = storage or Storage()
    sections: dict[str, Any] = {"codebooks": bytearray(), "indices": SectionWriter(),
                                "positions": SectionWriter(), "tensors": bytearray()}
    shared = _shared_entries(module, storage, sections)
    tensors = _tensor_entries(module, storage, sections)
    payloads = {name: bytes(s) if isinstance(s, bytearray) else s.finish() for name, s in sections.items()}
    header = {"codebook": "f16" if storage.codebook == "fp16" else "f32",
              "sections": [[name, len(payloads[name]), zlib.crc32(payloads[name])] for name in SECTIONS],
              "shared": shared, "tensors": tensors}
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    header_bytes = packer.compress(json.dumps(header, separators=(",", ":")).encode()) + packer.flush()
    preamble = PREAMBLE.pack(MAGIC, VERSION, len(header_bytes), zlib.crc32(header_bytes))
    sizes = {"header": len(preamble) + len(header_bytes), **{name: len(payloads[name]) for name in SECTIONS}}
    sizes["total"] = sum(sizes.values())
    return preamble + header_bytes + b"".join(payloads[name] for name in SECTIONS), sizes


def write_artifact(module: nn.Module, path: str | Path, storage: Storage | None = None) -> dict[str, int]:
    """Write ``module`` to ``path`` (through a temporary file renamed into place); returns bytes per component."""
    payload, sizes = encode_artifact(module, storage)
    atomic_write_bytes(Path(path), payload)
    umask = os.umask(0)
    os.umask(umask)
    Path(path).chmod(0o666 & ~umask)  # an ordinary file (the temporary file it was renamed from is private)
    return sizes


# -- reading ----------------------------------------------------------------------------------------------------
def _read_header(data: bytes, source: str) -> tuple[dict, int]:
    if len(data) < PREAMBLE.size:
        raise ArtifactError(f"{source}: truncated: {len(data)} bytes, shorter than the {PREAMBLE.size}-byte preamble")
    magic, version, length, crc = PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise ArtifactError(f"{source}: not a torchslim compact artifact (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ArtifactError(f"{source}: format version {version} is not supported (this torchslim reads {VERSION})")
    end = PREAMBLE.size + length
    if len(data) < end:
        raise ArtifactError(f"{source}: truncated in section 'header' ({len(data)} of at least {end} bytes)")
    if zlib.crc32(data[PREAMBLE.size:end]) != crc:
        raise ArtifactError(f"{source}: section 'header' is corrupted (CRC32 mismatch)")
    try:
        header = json.loads(zlib.decompressobj(-15).decompress(data[PREAMBLE.size:end], MAX_HEADER_BYTES))
    except (ValueError, RecursionError, zlib.error) as error:
        raise ArtifactError(f"{source}: section 'header' does not decode: {str(error)[:120]}") from None
    problem = _header_problem(header, len(data))
    if problem:
        raise ArtifactError(f"{source}: section 'header' is malformed: {problem}")
    return header, end


MAX_HEADER_BYTES = 64 << 20


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 8 and all(type(d) is int and 0 <= d < 1 << 31 for d in value)


def _entry_problem(kind: str, entry: Any, budget: int) -> str | None:
    """Why one ``shared`` or ``tensors`` header entry is malformed, or None. ``budget`` bounds its values: the
    file cannot describe more than a few thousand values per byte (pruned positions cost a few bits each)."""
    width = 5 if kind == "shared" else 4
    if not (isinstance(entry, list) and len(entry) == width and isinstance(entry[0], str) and _is_shape(entry[1])
            and isinstance(entry[2], str)):
        return f"{kind} entry {str(entry)[:80]} is not [name, shape, dtype, ...]"
    if not isinstance(getattr(torch, entry[2], None), torch.dtype):
        return f"{entry[0][:60]}: unknown dtype {entry[2][:20]!r}"
    if int(np.prod(entry[1], dtype=np.float64)) > budget:
        return f"{entry[0][:60]}: shape {entry[1]} is larger than the file can hold"
    if kind == "shared":
        if not (type(entry[3]) is int and 1 <= entry[3] <= MAX_BITS and type(entry[4]) is int
                and 0 <= entry[4] <= np.prod(entry[1], dtype=np.float64)):
            return f"{entry[0][:60]}: bits {str(entry[3])[:10]} / non-zeros {str(entry[4])[:20]} out of range"
    elif not (isinstance(entry[3], str) and (entry[3] in ("raw", "i8", *_CAST) or entry[3].startswith("="))):
        return f"{entry[0][:60]}: unknown storage {str(entry[3])[:20]}"
    return None


def _header_problem(header: Any, file_bytes: int) -> str | None:
    """Why a decoded header does not follow the schema in this module's docstring, or None."""
    codebook = header.get("codebook") if isinstance(header, dict) else None
    if not isinstance(codebook, str) or codebook not in _CAST:  # a crafted list or dict is unhashable
        return "not a mapping with codebook f16 or f32"
    sections = header.get("sections")
    if not (isinstance(sections, list) and [s[0] if isinstance(s, list) and s else None for s in sections]
            == list(SECTIONS)) or not all(len(s) == 3 and all(type(v) is int and v >= 0 for v in s[1:])
                                          for s in sections):
        return f"sections must be {list(SECTIONS)}, each [name, length, crc32]"
    budget = 4096 * file_bytes + (1 << 20)
    for kind in ("shared", "tensors"):
        if not isinstance(header.get(kind), list):
            return f"{kind} must be a list"
        for entry in header[kind]:
            problem = _entry_problem(kind, entry, budget)
            if problem:
                return problem
    return None


def _split_sections(data: bytes, header: dict, start: int, source: str) -> dict[str, bytes]:
    sections, offset = {}, start
    for name, length, crc in header["sections"]:
        if len(data) < offset + length:
            raise ArtifactError(f"{source}: truncated in section '{name}' (the file has {len(data)} bytes, "
                                f"the section ends at byte {offset + length})")
        payload = data[offset:offset + length]
        if zlib.crc32(payload) != crc:
            raise ArtifactError(f"{source}: section '{name}' is corrupted (CRC32 mismatch)")
        sections[name], offset = payload, offset + length
    if len(data) != offset:
        raise ArtifactError(f"{source}: {len(data) - offset} unexpected bytes after the last section")
    return sections


def _decode_shared(header: dict, sections: dict[str, bytes]) -> dict[str, torch.Tensor]:
    codebook_dtype = _CAST[header["codebook"]]
    indices, positions = SectionReader(sections["indices"]), SectionReader(sections["positions"])
    state, offset = {}, 0
    for name, shape, dtype, bits, nonzero in header["shared"]:
        if not 1 <= bits <= MAX_BITS:
            raise CodingError(f"{name}: {bits} bits per index (at most {MAX_BITS})")
        size = (2 ** bits) * codebook_dtype.itemsize
        codebook = _from_bytes(sections["codebooks"][offset:offset + size], codebook_dtype, [2 ** bits])
        offset += size
        numel = int(np.prod(shape))
        symbols = torch.from_numpy(indices.read_symbols(nonzero, 2 ** bits).astype(np.int64))
        where = torch.from_numpy(positions.read_positions(nonzero, numel))
        weight = torch.zeros(numel, dtype=_dtype(dtype))
        weight[where] = codebook.to(weight.dtype)[symbols]
        state[name] = weight.reshape(shape)
    if offset != len(sections["codebooks"]):
        raise CodingError(f"codebooks hold {len(sections['codebooks'])} bytes, the header accounts for {offset}")
    return state


def _decode_tensors(header: dict, payload: bytes) -> dict[str, torch.Tensor]:
    state, offset = {}, 0
    for name, shape, dtype, how in header["tensors"]:
        if how.startswith("="):
            state[name] = state[how[1:]]
            continue
        size = _tensor_bytes(shape, _dtype(dtype), how)
        if offset + size > len(payload):
            raise CodingError(f"tensor {name!r} runs past the end of the section")
        state[name] = _decode_tensor(payload[offset:offset + size], shape, _dtype(dtype), how)
        offset += size
    if offset != len(payload):
        raise CodingError(f"the section holds {len(payload)} bytes, the header accounts for {offset}")
    return state


def decode_artifact(data: bytes, source: str = "<bytes>") -> dict[str, torch.Tensor]:
    """The plain (unshared) state dict an artifact holds: shared weights decoded to dense tensors.

    Raises:
        ArtifactError: ``source`` is not a readable artifact; the message names the file and the section.
    """
    header, start = _read_header(data, source)
    sections = _split_sections(data, header, start, source)
    state = {}
    for section, decode in (("indices", lambda: _decode_shared(header, sections)),
                            ("tensors", lambda: _decode_tensors(header, sections["tensors"]))):
        try:
            state.update(decode())
        except (CodingError, ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError,
                struct.error, OverflowError, MemoryError) as error:
            raise ArtifactError(f"{source}: section '{section}' does not decode: {error}") from None
    return state


def read_artifact(path: str | Path, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """`decode_artifact` of the file at ``path``, checked first against its folder's ``manifest.json`` (unless
    ``verify=False``; see `torchslim.integrity`)."""
    from torchslim.integrity import verify_manifest

    path = Path(path)
    verify_manifest(path.parent, [path.name], verify=verify)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ArtifactError(f"{path}: cannot read: {error.strerror or error}") from None
    return decode_artifact(data, str(path))


def _load_compact(template: nn.Module, path: str | Path, *, verify: bool = True) -> nn.Module:
    """A fresh plain copy of ``template`` (shared layers as dense weights) holding the artifact's tensors.

    Every state-dict entry of the copy is overwritten from the file (strictly), so nothing of the template's
    values survives; the template only gives the architecture.
    """
    state = read_artifact(path, verify=verify)
    fresh = unshare_(copy.deepcopy(template))
    try:
        fresh.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ArtifactError(f"{path}: does not fit the model: {str(error).splitlines()[0]}") from None
    return fresh.eval()


def raw_fp32_bytes(module: nn.Module) -> int:
    """Bytes of the module's state as dense tensors, float tensors at 4 bytes a value (the fp32 baseline)."""
    total = sum(shared.keep.numel() * 4 for shared in shared_layers(module).values())
    for tensor in _other_tensors(module).values():
        total += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
    return total


class CompactDeployable(TorchDeployable):
    """A model with shared weights on eager PyTorch; its artifact is ``model.tslim`` (this module's format).

    ``load_and_run`` decodes the file into a fresh plain copy of the module and runs it.
    """

    def __init__(self, module: nn.Module, details: dict | None = None, storage: Storage | None = None):
        super().__init__(module, details)
        self.storage = storage or Storage()

    def __call__(self, inputs: Any) -> torch.Tensor:
        from torch.nn.utils import parametrize

        with torch.inference_mode(), parametrize.cached():  # gather each shared weight once per call
            return call_model(self.module, inputs)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / ARTIFACT_NAME
        write_artifact(self.module, path, self.storage)
        return path

    def load_and_run(self, path: Path, inputs: Any) -> Any:
        fresh = _load_compact(self.module, path)
        with torch.inference_mode():
            return call_model(fresh, inputs)


__all__ = ["ArtifactError", "CompactDeployable", "Storage", "decode_artifact", "encode_artifact",
           "raw_fp32_bytes", "read_artifact", "round_to_storage_", "write_artifact"]


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "load_compact": "_load_compact",
})
