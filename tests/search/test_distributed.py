"""Workers sharing one journal storage, and a search killed with SIGKILL mid-trial then resumed.

Both run the real command in subprocesses on a tiny model and space, and wait on events, never on the clock:
the local workers start together through a pipe (`start_local_workers`), and the kill follows the line a trial
prints when it starts.

Both are marked slow (`make test-all`): each starts two or three interpreters that import torch, optuna and
the data (about 15 CPU-seconds a test, most of it start-up); `torchslim auto` itself, with its journal, front
and best/, runs in the default suite in test_auto.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _recipe(path: Path, trials: int, workers: int) -> Path:
    recipe = {"model": "builtin:digits-mlp", "data": "builtin:digits", "seed": 0,
              "measure": {"batch_size": 16, "warmup": 1, "repeats": 2, "max_eval_samples": 64},
              "search": {"space": {"ratios": [0.0, 0.25, 0.5], "precision": ["float"], "epochs": [1], "round_to": 1},
                         "finetune": {"epochs": 1, "batch_size": 256, "optimizer": {"name": "adamw", "lr": 0.003}},
                         "constraints": {"max_drop": 0.5}, "trials": trials, "workers": workers, "repeats": 2,
                         "sensitivity": {"calibration": {"samples": 32}, "plans": 1}}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}


def _command(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torchslim", "auto", str(recipe), "--out", str(out)]


@pytest.mark.slow
def test_two_workers_on_one_journal_run_each_trial_once_and_share_one_front(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(_command(_recipe(tmp_path / "search.yaml", 6, 2), out), capture_output=True,
                            text=True, env=_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    started = re.findall(r"trial (\d+) started on (\S+)", result.stderr)
    assert Counter(number for number, _ in started).most_common(1)[0][1] == 1  # no trial ran twice
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) >= 6 and len({t["trial"] for t in trials}) == len(trials)
    workers = {t["figures"]["worker"] for t in trials}
    assert len(workers) == 2 and workers == {worker for _, worker in started}  # both contributed
    front = json.loads((out / "front.json").read_text())["front"]
    assert front and {p["trial"] for p in front} <= {t["trial"] for t in trials}
    assert json.loads((out / "report.json").read_text())["search"]["trials"]["complete"] == len(trials)


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_and_loses_at_most_that_trial(tmp_path):
    recipe, out = _recipe(tmp_path / "search.yaml", 4, 1), tmp_path / "out"
    process = subprocess.Popen(_command(recipe, out), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env=_env(), start_new_session=True)
    for line in process.stderr:
        if "trial 1 started" in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists() and (tmp_path / "out.search" / "journal.log").is_file()  # nothing half-written
    resumed = subprocess.run(_command(recipe, out), capture_output=True, text=True, env=_env(), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming study torchslim-out: 1 trials done" in resumed.stderr
    assert "interrupted trials [1] failed and enqueued again" in resumed.stderr
    counts = json.loads((out / "report.json").read_text())["search"]["trials"]
    assert counts["complete"] == 4 and counts["interrupted"] == 1 and counts["failed"] == 0
    assert not (tmp_path / "out.search").exists()
