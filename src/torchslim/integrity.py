"""Output-folder manifests: what torchslim wrote, so that nothing loads a damaged or altered file silently.

Every output folder of a run ends with ``manifest.json``, written last over every other file in the folder::

    {"format": "torchslim.manifest/1", "torchslim": "0.1.0",
     "files": {"model.safetensors": {"format": "safetensors", "size": 12345, "sha256": "9f2c..."}, ...},
     "manifest_sha256": "..."}    # of the rest of this document (sorted keys): the manifest is checked too

Loaders (`torchslim.load` and the per-format readers behind it: shapes, weight-only, ``.tslim``, PT2E, ONNX)
call `verify_manifest` on the files they read: a file whose size or SHA-256 differs from the
manifest is refused with `ArtifactError` naming it. Users who edit a file on purpose pass ``verify=False`` to the
loader, set ``TORCHSLIM_VERIFY=0``, or give the CLI ``--no-verify``. A folder without a manifest (written by
hand, or by an older torchslim) is read without this check; its formats' own checks still apply.

Example:
    >>> write_manifest("out/demo")          # the pipeline does this for every run
    >>> verify_manifest("out/demo", ["model.safetensors"])
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

from torchslim.errors import ArtifactError, shorten

MANIFEST_NAME = "manifest.json"
FORMAT = "torchslim.manifest/1"
VERIFY_ENV = "TORCHSLIM_VERIFY"
MAX_MANIFEST_BYTES = 16 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
# File formats by name ending; JSON files that carry their own "format" (or "schema") stamp record that instead.
_SUFFIX_FORMATS = {".safetensors": "safetensors", ".onnx": "onnx", ".tslim": "torchslim.compact/1",
                   ".json": "json", ".md": "markdown", ".yaml": "yaml", ".yml": "yaml", ".html": "html",
                   ".txt": "text", ".data": "onnx-external-data"}


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _file_format(path: Path) -> str:
    if path.suffix == ".json" and path.stat().st_size < MAX_MANIFEST_BYTES:
        try:
            body = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return "json"
        stamp = body.get("format") or body.get("schema") if isinstance(body, dict) else None
        if isinstance(stamp, str) and len(stamp) <= 100:
            return stamp
    return _SUFFIX_FORMATS.get(path.suffix, "bytes")


def _listed_files(folder: Path) -> list[str]:
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise ArtifactError(f"{path}: an output folder holds no symbolic links")
        if path.is_file() and relative != MANIFEST_NAME:
            files.append(relative)
    return files


def write_manifest(folder: str | Path) -> Path:
    """Write ``folder/manifest.json`` over every file in ``folder`` (sub-folders included); returns its path.

    Call it last: a file written afterwards is not covered, and a loader that reads it refuses it.
    """
    from torchslim._version import __version__

    folder = Path(folder)
    files = {}
    for name in _listed_files(folder):
        path = folder / name
        files[name] = {"format": _file_format(path), "size": path.stat().st_size, "sha256": sha256_file(path)}
    body = {"format": FORMAT, "torchslim": __version__, "files": files}
    body["manifest_sha256"] = _self_digest(body)
    _write_json_atomically(folder / MANIFEST_NAME, body)
    return folder / MANIFEST_NAME


def refresh_manifest(folder: str | Path, names: Iterable[str]) -> Path:
    """Record the current size and SHA-256 of ``names`` (relative to ``folder``) in its manifest, leaving every
    other entry as it was (so a file damaged since the run stays detected); for a file torchslim rewrote on
    purpose, such as a rebuilt report.html.

    Raises:
        ArtifactError: ``folder`` has no valid manifest, or a name lies outside it or is missing.
    """
    folder = Path(folder)
    body = read_manifest(folder)
    if body is None:
        raise ArtifactError(f"{folder}: has no {MANIFEST_NAME} to refresh")
    for name in names:
        path = folder / name
        _check_entry(folder / MANIFEST_NAME, name, {"format": "", "size": 0, "sha256": "0" * 64})
        if not path.is_file() or path.is_symlink():
            raise ArtifactError(f"{path}: missing; cannot record it in {MANIFEST_NAME}")
        body["files"][name] = {"format": _file_format(path), "size": path.stat().st_size,
                               "sha256": sha256_file(path)}
    body["files"] = dict(sorted(body["files"].items()))
    body["manifest_sha256"] = _self_digest(body)
    _write_json_atomically(folder / MANIFEST_NAME, body)
    return folder / MANIFEST_NAME


def _write_json_atomically(path: Path, body: dict) -> None:
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".manifest-", suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(body, handle, indent=1)
            handle.write("\n")
        os.chmod(handle.name, 0o666 & ~current_umask())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask (read by setting and restoring it): the mode ordinary new files get."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _self_digest(body: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without this digest: a damaged manifest is detected too."""
    rest = {k: v for k, v in body.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _check_entry(path: Path, name: object, entry: object) -> None:
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
        raise ArtifactError(f"{path}: lists a file outside its folder: {shorten(name)}")
    if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _HEX64.fullmatch(entry["sha256"])
            and type(entry.get("size")) is int and entry["size"] >= 0 and isinstance(entry.get("format"), str)):
        raise ArtifactError(f"{path}: entry {shorten(name)} is malformed (expected format, size, sha256)")


def read_manifest(folder: str | Path) -> dict | None:
    """The validated manifest of ``folder``, or None when it has none.

    Raises:
        ArtifactError: ``manifest.json`` exists but is not a torchslim manifest (unreadable, another format, or
            a malformed entry).
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{path}: larger than {MAX_MANIFEST_BYTES:,} bytes; not a torchslim manifest")
        body = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path}: unreadable manifest ({shorten(str(error), 120)})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        stamp = body.get("format") if isinstance(body, dict) else None
        raise ArtifactError(f"{path}: not a {FORMAT} manifest (format {shorten(stamp)})")
    if body.get("manifest_sha256") != _self_digest(body):
        raise ArtifactError(f"{path}: the manifest is damaged or was edited (its own SHA-256 differs)")
    if not isinstance(body.get("files"), dict):
        raise ArtifactError(f"{path}: 'files' must be a mapping of file name -> entry")
    for name, entry in body["files"].items():
        _check_entry(path, name, entry)
    return body


def verification_enabled(verify: bool = True) -> bool:
    """False when the caller or the environment (``TORCHSLIM_VERIFY=0``) turns manifest checks off."""
    return verify and os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def verify_manifest(folder: str | Path, files: Iterable[str] | None = None, *, verify: bool = True) -> dict | None:
    """Check ``files`` (names relative to ``folder``; default: every file listed) against ``folder``'s manifest.

    Returns:
        The manifest, or None when the folder has none or verification is off (``verify=False`` or
        ``TORCHSLIM_VERIFY=0``).

    Raises:
        ArtifactError: a file is missing, not listed, or its size or SHA-256 differs; the message names it.
    """
    if not verification_enabled(verify):
        return None
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    listed = manifest["files"]
    hint = f"if you changed it on purpose, load with verify=False (or {VERIFY_ENV}=0, or --no-verify)"
    for name in listed if files is None else files:
        path = folder / name
        entry = listed.get(name)
        if entry is None:
            raise ArtifactError(f"{path}: not listed in {folder / MANIFEST_NAME} (added after the run); {hint}")
        try:
            size = path.stat().st_size
        except OSError:
            raise ArtifactError(f"{path}: listed in {MANIFEST_NAME} but missing") from None
        if size != entry["size"]:
            raise ArtifactError(f"{path}: {size:,} bytes, {MANIFEST_NAME} records {entry['size']:,} "
                                f"(truncated or changed since torchslim wrote it); {hint}")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: SHA-256 differs from {MANIFEST_NAME} (the file is damaged or was changed "
                                f"since torchslim wrote it); {hint}")
    return manifest


def unlisted_files(folder: str | Path, manifest: dict) -> list[str]:
    """Files in ``folder`` that its manifest does not list (what a user added after the run)."""
    return [name for name in _listed_files(Path(folder)) if name not in manifest["files"]]


__all__ = ["FORMAT", "MANIFEST_NAME", "read_manifest", "refresh_manifest", "sha256_file", "verify_manifest",
           "write_manifest"]
