"""One full evaluation: a plan's recipe run through the registered steps, scored on the validation split, its
latency measured on its deployment runtime against the baseline, one worker at a time.

A worker resolves the model and data once and keeps the untouched model; every trial starts from a copy of it,
runs the recipe's steps through their registered handlers (the same as `torchslim compress`), and measures what
the pipeline measures — but on the ``val`` split (the search must not choose by the test split, which the
final ``best/`` run reports) and with latency timed alternately with the baseline's (A/B), so that load on a
shared machine moves both and the ratio stays honest.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from torchslim.measure.latency import set_threads
from torchslim.measure.macs import count_macs
from torchslim.measure.params import count_params
from torchslim.measure.size import artifact_bytes
from torchslim.measure.stage import collect_outputs, evaluate, first_samples, score_drop
from torchslim.runtime import Deployable, TorchDeployable


def default_lock_path() -> Path:
    """The machine-wide latency lock: every torchslim search on this machine times one thing at a time."""
    return Path(tempfile.gettempdir()) / "torchslim-latency.lock"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _median_call(run: Callable[[Any], Any], inputs: Any, calls: int) -> float:
    times = []
    for _ in range(calls):
        begin = time.perf_counter()
        run(inputs)
        times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


def ab_latency(candidate: Callable, baseline: Callable, batch: Any, repeats: int, lock_path: Path | None) -> dict:
    """Batched and batch-1 latency of ``candidate`` and ``baseline``, timed alternately under the latency lock.

    A round times each once at the batch and by the median of 5 calls at batch 1, one right after the other;
    the figures are medians over ``repeats`` rounds, and the ratios are the medians of the rounds' ratios, so a
    burst of load from another process moves both sides of a ratio and not the ratio.
    """
    from filelock import FileLock

    single = first_samples(batch, 1)
    lock = FileLock(str(lock_path)) if lock_path else None
    waited = time.perf_counter()
    if lock:
        lock.acquire()
    try:
        waited = time.perf_counter() - waited
        for run in (candidate, baseline):  # warm-up (and any first-call compilation)
            run(batch)
            run(single)
        rounds: dict[str, list[float]] = {"candidate": [], "baseline": [], "candidate_bs1": [], "baseline_bs1": []}
        for _ in range(repeats):
            for name, run in (("baseline", baseline), ("candidate", candidate)):
                rounds[name].append(_median_call(run, batch, 1))
                rounds[f"{name}_bs1"].append(_median_call(run, single, 5))
    finally:
        if lock:
            lock.release()
    median = {k: statistics.median(v) for k, v in rounds.items()}

    def ratio(suffix: str) -> float:
        pairs = zip(rounds["candidate" + suffix], rounds["baseline" + suffix])
        return round(statistics.median(c / b for c, b in pairs), 5)

    return {"latency_ms_batch": round(median["candidate"], 4), "latency_ms_bs1": round(median["candidate_bs1"], 4),
            "baseline_latency_ms_batch": round(median["baseline"], 4),
            "baseline_latency_ms_bs1": round(median["baseline_bs1"], 4),
            "latency_ratio": ratio(""), "latency_ratio_bs1": ratio("_bs1"),
            "latency_spread_ms_batch": [round(min(rounds["candidate"]), 4), round(max(rounds["candidate"]), 4)],
            "lock_wait_s": round(waited, 2)}


class TrialRunner:
    """Builds and measures plans' recipes for one worker process.

    Args:
        recipe: the search's recipe (model, data, seed, measure).
        workdir: where trial artifacts go (one folder per trial).
        compute_threads: torch threads while building and training (parallel workers share the cores);
            latency is measured with the recipe's ``measure.threads``.
        lock_path: the latency lock (None: no lock).
        repeats: A/B rounds per latency measurement.
    """

    def __init__(self, recipe, workdir: Path, compute_threads: int = 0, lock_path: Path | None = None,
                 repeats: int = 7, log: Callable[[str], None] = lambda message: None):
        from torchslim.data import resolve_data
        from torchslim.pipeline import _check_compatible
        from torchslim.zoo import resolve_model

        self.recipe, self.workdir, self.lock_path, self.repeats, self.log = recipe, Path(workdir), lock_path, \
            repeats, log
        self.threads = set_threads(recipe.measure.threads)
        self.compute_threads = compute_threads or self.threads
        torch.manual_seed(recipe.seed)
        self.bundle = resolve_model(recipe.model)
        self.data = resolve_data(recipe.data, recipe.seed)
        _check_compatible(self.bundle, self.data)
        self.split = "val" if len(self.data.splits.get("val", [])) else "test"
        self.pristine = copy.deepcopy(self.bundle.model).eval()
        self.teacher = copy.deepcopy(self.bundle.model).eval().requires_grad_(False)
        self.batch = self.data.fill_batch(self.split, self.bundle.preprocess, recipe.measure.batch_size)
        self.baseline_deployable = TorchDeployable(self.teacher)
        self.baseline = self._baseline()

    def _evaluate(self, deployable: Deployable, reference: torch.Tensor | None):
        eval_batch = max(self.recipe.measure.batch_size, 32)
        outputs, labels = collect_outputs(deployable, self.data, self.bundle.preprocess, eval_batch,
                                          self.recipe.measure.max_eval_samples, split=self.split, progress=False)
        return evaluate(outputs, labels, reference, self.bundle.task)

    def _baseline(self) -> dict:
        evaluation = self._evaluate(self.baseline_deployable, None)
        self.reference = evaluation.outputs
        path = self.baseline_deployable.save(self.workdir / "baseline")
        raw, shipped = artifact_bytes(path)
        return {"split": self.split, "metric": evaluation.metric, "score": round(evaluation.score, 6),
                "size_bytes": shipped, "size_bytes_raw": raw, "params": count_params(self.teacher),
                "macs": count_macs(self.teacher, self.bundle.example_inputs(1)),
                "batch_size": self.recipe.measure.batch_size, "runtime": "torch"}

    def build(self, raw_recipe: dict, name: str) -> tuple[Deployable, Any]:
        """Run a recipe's steps on a fresh copy of the model; returns (final deployable, step context)."""
        from torchslim._context import _StepContext, run_step
        from torchslim.recipe import parse_recipe

        recipe = parse_recipe(raw_recipe, source=name)
        model = copy.deepcopy(self.pristine)
        bundle = dataclasses.replace(self.bundle, model=model, notes=[])
        scratch = self.workdir / name / "scratch"
        context = _StepContext(model=model, teacher=self.teacher, bundle=bundle, data=self.data, seed=recipe.seed,
                               threads=self.threads, workdir=scratch, batch_size=recipe.measure.batch_size,
                               progress=False)
        deployable: Deployable = TorchDeployable(model)
        torch.set_num_threads(self.compute_threads)
        torch.manual_seed(recipe.seed)
        try:
            for index, step in enumerate(recipe.steps):
                context.where = f"{name}: steps[{index}].{step.kind}"
                context.step_index = index
                deployable = run_step(context, step.kind, step.method, step.config, onnx_metadata=False)
        finally:
            torch.set_num_threads(self.threads)
        return deployable, context

    def run(self, raw_recipe: dict, name: str) -> dict:
        """Build, score on the validation split, size, count MACs and A/B-time one recipe; returns its figures."""
        started = time.perf_counter()
        deployable, context = self.build(raw_recipe, name)
        built = time.perf_counter() - started
        torch.set_num_threads(self.compute_threads)
        try:
            evaluation = self._evaluate(deployable, self.reference)
        finally:
            torch.set_num_threads(self.threads)
        path = deployable.save(self.workdir / name / "artifact")
        raw, shipped = artifact_bytes(path)
        macs = count_macs(deployable.module, self.bundle.example_inputs(1))
        timing = ab_latency(deployable, self.baseline_deployable, self.batch, self.repeats, self.lock_path)
        base = self.baseline
        return {"metric": evaluation.metric, "score": round(evaluation.score, 6),
                "metrics": {k: round(v, 6) for k, v in evaluation.metrics.items()},
                "drop": round(score_drop(evaluation.metric, base["score"], evaluation.score), 6),
                **timing, "size_bytes": shipped, "size_bytes_raw": raw,
                "size_ratio": round(shipped / base["size_bytes"], 5), "macs": macs,
                "macs_ratio": round(macs / base["macs"], 5), "runtime": deployable.runtime,
                "artifact": str(path), "skipped": len(context.skipped), "build_seconds": round(built, 2),
                "seconds": round(time.perf_counter() - started, 2), "worker": worker_id(), "split": self.split}
