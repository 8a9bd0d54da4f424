"""The output folder: accepted targets, atomic replacement that leaves nothing beside it, and the lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchslim._output import OutputLock, atomic_output_dir, check_output_dir
from torchslim.errors import InputError
from torchslim.integrity import write_manifest


def _previous_run(folder: Path) -> Path:
    folder.mkdir()
    (folder / "report.json").write_text('{"schema": "torchslim.report/1"}')
    write_manifest(folder)
    return folder


def test_new_empty_and_previous_run_folders_are_accepted(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # the check creates nothing
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    assert check_output_dir(_previous_run(tmp_path / "run")) == tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]  # the write probe is gone


def test_a_symlinked_parent_resolves_and_a_foreign_manifest_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert check_output_dir(tmp_path / "alias" / "out") == tmp_path / "real" / "out"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "manifest.json").write_text('{"format": "someone-else/2"}')
    with pytest.raises(InputError, match="not a torchslim output folder"):
        check_output_dir(odd)
    assert check_output_dir(odd, overwrite=True) == odd


def test_replacing_keeps_the_old_folder_when_the_final_rename_fails(tmp_path, monkeypatch):
    out = _previous_run(tmp_path / "run")
    real_rename = Path.rename

    def failing_rename(self, target):
        if self.name.startswith(".run.partial-"):
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        with atomic_output_dir(out) as tmp:
            (tmp / "report.json").write_text("new")
    assert (out / "report.json").read_text() == '{"schema": "torchslim.report/1"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .run.old-PID, no partial folder


def test_a_failing_block_and_a_success_leave_nothing_beside_the_folder(tmp_path):
    out = _previous_run(tmp_path / "run")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    with atomic_output_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_lock_tidies_what_a_killed_run_left_and_refuses_a_live_holder(tmp_path):
    out = tmp_path / "run"
    old = _previous_run(tmp_path / f".run.old-{999999}")  # killed between its two renames: the output is here
    (tmp_path / ".run.partial-abc").mkdir()
    with OutputLock(out) as lock:
        assert (out / "report.json").exists() and not old.exists()
        assert not (tmp_path / ".run.partial-abc").exists()
        assert lock.path.read_text() == f"{os.getpid()}\n"
        holder = subprocess.run([sys.executable, "-c", "import sys; from torchslim._output import OutputLock\n"
                                 "OutputLock(sys.argv[1]).acquire()", str(out)], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        assert holder.returncode == 1 and f"in use by another torchslim run (process {os.getpid()}" in holder.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_run_removes_the_parent_folders_its_lock_created(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(RuntimeError):
        with OutputLock(out):
            assert (tmp_path / "a" / "b").is_dir()
            raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []
