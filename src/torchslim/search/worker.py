"""A worker: pull trials from the study, build and measure them, report their figures; stop at the trial budget
or the deadline. `torchslim auto --workers N` runs N of these on this machine (itself and N-1 processes);
``torchslim worker --storage URL --study NAME`` joins a study from another machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from torchslim.search.space import SearchSpace
from torchslim.search.study import PAYLOAD, counted, load_study, make_sampler, require_optuna
from torchslim.search.trial import TrialRunner, default_lock_path, worker_id

OBJECTIVE_KEYS = {"score": "drop", "latency": "latency_ratio", "size": "size_ratio", "macs": "macs_ratio"}
TARGET_KEYS = {"latency": "latency_ratio", "size": "size_ratio", "macs": "macs_ratio"}


def constraint_values(figures: dict, constraints: dict) -> list[float]:
    """Each constraint's excess (<= 0: met): drop - max_drop, target ratio - budget."""
    values = []
    if constraints.get("max_drop") is not None:
        values.append(round(figures["drop"] - constraints["max_drop"], 6))
    if constraints.get("budget") is not None:
        values.append(round(figures[TARGET_KEYS[constraints["target"]]] - constraints["budget"], 6))
    return values


def constraint_names(constraints: dict) -> list[str]:
    """The names of `constraint_values`' entries, in order."""
    return [name for name, key in (("max_drop", "max_drop"), ("budget", "budget")) if constraints.get(key) is not None]


def suggest(trial, space: SearchSpace) -> dict:
    """The trial's plan: every decision that applies under the choices made before it."""
    plan: dict = {}
    for decision in space.decisions:
        if decision.when is None or plan.get(decision.when[0]) == decision.when[1]:
            plan[decision.name] = trial.suggest_categorical(decision.name, list(decision.options))
    return plan


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One line per finished trial: its figures, the trials done, the best feasible so far and the time left."""

    def __init__(self, payload: dict, log: Callable[[str], None]):
        search = payload["recipe"]["search"]
        self.log, self.trials, self.constraints = log, search["trials"], search["constraints"]
        self.deadline = payload.get("deadline")
        self.primary = TARGET_KEYS.get(self.constraints.get("target") or "latency", "latency_ratio")
        self.metric = payload["baseline"]["metric"]

    def __call__(self, study, trial) -> None:
        figures = trial.user_attrs.get("figures")
        if figures is None:
            self.log(f"trial {trial.number} {trial.state.name.lower()}: {trial.user_attrs.get('error', '')}")
            return
        feasible = all(v <= 0 for v in trial.user_attrs.get("constraints", []))
        best = _best_so_far(study, self.primary)
        left = "" if not self.deadline else f", {_duration(self.deadline - time.time())} left"
        points = 100 if self.metric in ("accuracy", "agreement") else 1
        self.log(f"trial {trial.number} ({counted(study)}/{self.trials} done{left}): drop "
                 f"{figures['drop'] * points:+.3f}{' pts' if points == 100 else ''}, latency "
                 f"{figures['latency_ratio']:.3f}x, size {figures['size_ratio']:.3f}x"
                 f"{' (feasible)' if feasible else ''}; best feasible so far: "
                 + (f"trial {best.number} at {best.user_attrs['figures'][self.primary]:.3f}x" if best else "none"))


def _best_so_far(study, key: str):
    from optuna.trial import TrialState

    feasible = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if all(v <= 0 for v in t.user_attrs.get("constraints", [1.0]))]
    return min(feasible, key=lambda t: (t.user_attrs["figures"][key], t.user_attrs["figures"]["drop"]),
               default=None)


class _Budget:
    """Stops the study once enough trials count (completed or failed by their own error), or when the time left
    before the deadline is shorter than a typical trial (so the last one ends near the deadline, not past it)."""

    def __init__(self, trials: int, deadline: float | None):
        self.trials, self.deadline = trials, deadline

    def __call__(self, study, trial) -> None:
        import statistics

        if counted(study) >= self.trials:
            study.stop()
            return
        if self.deadline:
            durations = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False)
                         if t.state.name == "COMPLETE" and t.duration is not None]
            if durations and self.deadline - time.time() < statistics.median(durations):
                study.stop()


def objective_for(runner: TrialRunner, space: SearchSpace, payload: dict, log: Callable[[str], None]):
    search = payload["recipe"]["search"]
    recipe = payload["recipe"]
    objectives, constraints = search["objectives"], search["constraints"]

    def objective(trial):
        trial.set_user_attr("worker", worker_id())
        plan = suggest(trial, space)
        raw = space.recipe(plan, recipe["model"], recipe["data"], recipe["seed"], recipe["measure"],
                           search["finetune"])
        trial.set_user_attr("recipe", raw)
        log(f"trial {trial.number} started on {worker_id()}")
        try:
            figures = runner.run(raw, f"trial-{trial.number:04d}")
        except Exception as error:
            from torchslim.errors import describe

            trial.set_user_attr("error", describe(error))
            raise
        trial.set_user_attr("figures", figures)
        excess = constraint_values(figures, constraints)
        trial.set_user_attr("constraints", excess)
        for key, value in zip(constraint_names(constraints), excess):
            trial.set_constraint(key, value)  # what the sampler reads
        return [figures[OBJECTIVE_KEYS[name]] for name in objectives]

    return objective


def run_worker(storage, study_name: str, workdir: Path, *, runner: TrialRunner | None = None,
               index: int = 0, compute_threads: int = 0, log: Callable[[str], None] = print,
               ready: Callable[[], None] = lambda: None) -> int:
    """Run trials of an existing study until its trial budget or deadline; returns the trials this worker ran.

    ``ready()`` is called once the worker has built its model and baseline, right before its first trial (local
    workers start together: see `start_local_workers`)."""
    require_optuna()
    study, payload = load_study(storage, study_name)
    if payload is None:
        from torchslim.errors import InputError

        raise InputError(f"--study {study_name}: no torchslim search of that name in this storage")
    search = payload["recipe"]["search"]
    space = SearchSpace.from_dict(payload["space"])
    if runner is None:
        from torchslim.recipe import parse_recipe

        recipe = parse_recipe(payload["recipe"], source=f"study {study_name}")
        runner = TrialRunner(recipe, workdir, compute_threads, default_lock_path(), search["repeats"], log)
    startup = len(payload.get("enqueued", [])) + max(4, len(space.decisions) // 2)
    study.sampler = make_sampler(search["sampler"], payload["seed"] + index, startup)
    deadline = payload.get("deadline")
    timeout = None if not deadline else max(0.0, deadline - time.time())
    before = _mine(study)
    ready()
    if counted(study) < search["trials"] and (timeout is None or timeout > 0):
        study.optimize(objective_for(runner, space, payload, log), timeout=timeout, catch=(Exception,),
                       callbacks=[_Budget(search["trials"], deadline), Progress(payload, log)])
    return _mine(study) - before


def _mine(study) -> int:
    me = worker_id()
    return sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == me)


def start_local_workers(count: int, storage_url: str, study_name: str, workdir: Path, threads: int,
                        quiet: bool) -> tuple[list[subprocess.Popen], Callable[[], None]]:
    """Start ``count`` `torchslim worker` processes on this machine for the study; returns them and a function
    that blocks until each has built its model and baseline (or exited): each writes one byte to a pipe when
    ready, so the workers start their trials together without polling."""
    if count <= 0:
        return [], lambda: None
    read_end, write_end = os.pipe()
    processes = []
    try:
        for index in range(1, count + 1):
            command = [sys.executable, "-m", "torchslim", "worker", "--storage", storage_url, "--study", study_name,
                       "--workdir", str(workdir / f"worker-{index}"), "--index", str(index),
                       "--threads", str(threads), "--ready-fd", str(write_end)]
            if quiet:
                command.append("--quiet")
            processes.append(subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                              pass_fds=(write_end,)))
    finally:
        os.close(write_end)  # from now on only the workers hold it: EOF once every one has written or exited

    def wait_ready() -> None:
        received = 0
        while received < count:
            chunk = os.read(read_end, count - received)
            if not chunk:
                break
            received += len(chunk)
        os.close(read_end)

    return processes, wait_ready


def signal_ready(fd: int | None) -> Callable[[], None]:
    """The ``ready`` callback of a worker started by `start_local_workers` (writes its byte once)."""
    def ready() -> None:
        if fd is not None:
            os.write(fd, b"1")
            os.close(fd)

    return ready


__all__ = ["PAYLOAD", "constraint_values", "objective_for", "run_worker", "start_local_workers", "suggest"]
