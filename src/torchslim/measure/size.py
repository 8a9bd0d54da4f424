"""Bytes of a saved deployable artifact: as stored on disk, and as shipped (deflate-compressed).

Unstructured sparsity does not shrink a dense file; it shrinks what has to be stored and shipped once the file
is compressed (zeros compress away). Both numbers are measured on the same file, for every stage alike.
"""

from __future__ import annotations

import zlib
from pathlib import Path


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def artifact_bytes(path: str | Path) -> tuple[int, int]:
    """``(raw_bytes, compressed_bytes)`` of a file or folder; compressed is zlib (deflate) level 9, per file."""
    raw = compressed = 0
    for file in _files(Path(path)):
        payload = file.read_bytes()
        raw += len(payload)
        compressed += len(zlib.compress(payload, 9))
    return raw, compressed


def resident_parameter_bytes(module) -> int:
    """Bytes of every parameter and buffer a torch module keeps in memory (each storage counted once): what
    stays resident between calls, whatever is generated during a call."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
