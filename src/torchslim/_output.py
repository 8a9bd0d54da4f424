"""Where a run writes: ``--out`` checked before any work starts, locked while the run lasts, replaced atomically.

The rules (see docs/security.md):

* ``--out`` may be a new path, an empty folder, or a folder a previous torchslim run wrote (its
  ``manifest.json`` lists every file it holds). Anything else (a folder of the user's, a file) is refused unless
  ``overwrite=True`` (``--overwrite``).
* Never, even with ``overwrite``: a symbolic link, the working folder or a folder above it, the home folder or a
  folder above it, a filesystem root or mount point, a folder that holds the recipe, anything under /proc, /sys
  or /dev, a path below a file.
* The folder it would be created in must be writable: a probe folder is created and removed there at the start.
* ``.NAME.lock`` beside the folder (``fcntl.flock``, the holder's PID inside) guards the folder and its
  ``NAME.checkpoints`` while a run lasts; the kernel drops the lock when its process dies, so a stale lock file
  never blocks. A second run on the same folder is refused, naming the holder's PID.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from torchslim.errors import ArtifactError, InputError
from torchslim.integrity import current_umask, read_manifest, unlisted_files

VIRTUAL = (Path("/proc"), Path("/sys"), Path("/dev"))


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_protected(out: Path, real: Path, protect: Iterable[str | Path]) -> None:
    for root in VIRTUAL:
        if _within(real, root):
            raise InputError(f"--out {out}: is under {root}, a virtual filesystem; choose a folder on disk")
    if real.parent == real or os.path.ismount(real):
        raise InputError(f"--out {out}: is a filesystem root ({real}); choose a new folder inside it")
    for what, place in (("working folder", Path.cwd()), ("home folder", Path.home())):
        place = Path(os.path.realpath(place))
        if _within(place, real):
            relation = "is" if place == real else "contains"
            raise InputError(f"--out {out}: {relation} the {what} ({place}); torchslim never replaces it, "
                             f"even with --overwrite; choose a new folder")
    for item in protect:
        recipe = Path(os.path.realpath(item))
        if _within(recipe, real):
            raise InputError(f"--out {out}: holds the recipe {item}; torchslim never replaces it, even with "
                             f"--overwrite; choose a new folder")


def _nearest_existing(real: Path) -> Path:
    """The nearest existing folder above ``real`` (refusing a file on the way)."""
    for parent in real.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--out {real}: {parent} is a file, not a folder")
            return parent
    return Path("/")  # pragma: no cover - "/" always exists


def _refuse_foreign(out: Path, real: Path) -> None:
    """Refuse an existing ``real`` that is not an empty folder or a previous run's output (without overwrite)."""
    hint = "choose a new --out, or pass --overwrite to replace it (what it holds is deleted)"
    if not real.is_dir():
        raise InputError(f"--out {out}: is an existing file, not a torchslim output folder; {hint}")
    if not any(real.iterdir()):
        return
    try:
        manifest = read_manifest(real)
        extra = unlisted_files(real, manifest) if manifest is not None else []
    except ArtifactError as error:
        raise InputError(f"--out {out}: not a torchslim output folder ({error}); {hint}") from None
    if manifest is None:
        raise InputError(f"--out {out}: exists and was not written by torchslim (no manifest.json); {hint}")
    if extra:
        raise InputError(f"--out {out}: holds files torchslim did not write ({', '.join(extra[:3])}"
                         f"{', ...' if len(extra) > 3 else ''}); move them away, or {hint}")


def _probe(folder: Path, out: Path) -> None:
    try:
        probe = tempfile.mkdtemp(dir=folder, prefix=f".{out.name}.probe-")
        os.rmdir(probe)
    except OSError as error:
        raise InputError(f"--out {out}: cannot write in {folder}: {error.strerror or error}") from None


def check_output_dir(out: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Path:
    """Check ``out`` against the rules above before any work starts; returns the folder to write (absolute, with
    symbolic links in its parents resolved).

    Args:
        overwrite: allow replacing an existing file or folder that no torchslim run wrote.
        protect: files (the recipe) that the output folder must not contain.

    Raises:
        InputError: one line naming ``out`` and the rule it breaks.
    """
    text = str(out)
    if not text.strip():
        raise InputError("--out: empty path")
    given = Path(os.path.abspath(os.path.expanduser(text)))
    if given.is_symlink():
        raise InputError(f"--out {out}: is a symbolic link; give the folder itself ({os.path.realpath(given)})")
    real = Path(os.path.realpath(given))
    _refuse_protected(Path(text), real, protect)
    parent = _nearest_existing(real)
    if real.exists() and not overwrite:
        _refuse_foreign(Path(text), real)
    elif real.exists() and not (real.is_dir() or real.is_file()):
        raise InputError(f"--out {out}: is neither a file nor a folder; choose a new --out")
    checkpoints = checkpoint_root(real)
    if checkpoints.is_symlink() or (checkpoints.exists() and not checkpoints.is_dir()):
        raise InputError(f"--out {out}: {checkpoints} (where its training checkpoints go) is not a folder")
    _probe(parent, real)
    return real


def checkpoint_root(out_dir: str | Path) -> Path:
    """Where a run writing ``out_dir`` keeps its training checkpoints until it completes."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.checkpoints")


class OutputLock:
    """An exclusive ``flock`` on ``.NAME.lock`` beside the output folder ``out`` (its PID written inside).

    Acquiring also tidies what a killed earlier run left beside the folder: a ``.NAME.partial-*`` temporary
    folder is removed; a ``.NAME.old-*`` one is moved back when the output itself is missing (the run was killed
    between its two renames), else removed.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out.with_name(f".{self.out.name}.lock")
        self.fd: int | None = None
        self.created: list[Path] = []

    def acquire(self) -> "OutputLock":
        for parent in reversed(self.out.parents):
            if not parent.exists():
                try:
                    parent.mkdir()
                except OSError as error:
                    raise InputError(f"--out {self.out}: cannot create {parent}: {error.strerror}") from None
                self.created.append(parent)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise InputError(f"--out {self.out}: in use by another torchslim run (process {holder}; lock file "
                                 f"{self.path}); wait for it to finish, or choose another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # its holder removed it as we opened it: lock the new one
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
        self._tidy()
        return self

    def _tidy(self) -> None:
        for leftover in sorted(self.out.parent.glob(f".{self.out.name}.old-*")):
            if not self.out.exists() and not self.out.is_symlink():
                leftover.rename(self.out)
            else:
                _remove(leftover)
        for leftover in self.out.parent.glob(f".{self.out.name}.partial-*"):
            _remove(leftover)

    def release(self, failed: bool = False) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        if failed:
            for parent in reversed(self.created):  # leave no empty folders a failed run made
                try:
                    parent.rmdir()
                except OSError:
                    break

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, kind, value, traceback) -> None:
        self.release(failed=kind is not None)


def _remove(path: Path) -> None:
    """Delete a file or folder tree, making read-only sub-folders writable on the way; warn if anything stays."""

    def retry(function, name, _):
        os.chmod(os.path.dirname(name), stat.S_IRWXU)
        function(name)

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=retry)
    else:
        path.unlink(missing_ok=True)
    if path.exists():  # pragma: no cover - a file system that refuses even the owner
        warnings.warn(f"could not remove {path}; delete it by hand", RuntimeWarning, stacklevel=2)


@contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; it replaces ``out_dir`` only when the block completes.

    A previous ``out_dir`` is renamed aside, the new folder renamed into place, and the old one deleted; if the
    second rename fails the old one is moved back. Nothing is left beside ``out_dir`` either way.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        yield tmp
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the output is an ordinary folder
        if out_dir.exists() or out_dir.is_symlink():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            try:
                tmp.rename(out_dir)
            except BaseException:
                old.rename(out_dir)
                raise
            _remove(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        _remove(tmp)
        raise
