"""Where torchslim caches what it builds once (trained built-in models, assembled corpora)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$TORCHSLIM_CACHE`` (default ``~/.cache/torchslim``) joined with ``parts``, created if missing."""
    root = Path(os.environ.get("TORCHSLIM_CACHE") or Path.home() / ".cache" / "torchslim")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file renamed into place (no half-written files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_json(path: Path, build):
    """The JSON value cached at ``path``, or ``build()``'s result written there atomically on first use."""
    if path.exists():
        return json.loads(path.read_text())
    value = build()
    atomic_write_bytes(path, json.dumps(value, indent=0).encode())
    return value
