"""The pipeline: recipe -> model/data specs -> steps -> measure -> report.

Every stage (the baseline, then the result of each step) is measured in this one process, one after another,
with the same inputs, threads and repetitions, so that every ratio in the report is side by side.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from torchslim._context import _StepContext, run_step
from torchslim._output import OutputLock, atomic_output_dir, check_output_dir, checkpoint_root
from torchslim._progress import enabled as progress_bars
from torchslim.core.modules import call_model
from torchslim.data import DataBundle, resolve_data
from torchslim.errors import InputError
from torchslim.export import check_exports
from torchslim.measure.generation import measure_generation
from torchslim.measure.latency import set_threads
from torchslim.measure.stage import collect_outputs, evaluate, measure_deployable
from torchslim.recipe import Recipe
from torchslim.runtime import Deployable, TorchDeployable
from torchslim.zoo import ModelBundle, resolve_model

_LOG = logging.getLogger(__name__)  # the CLI shows INFO lines, DEBUG with -v (see torchslim._logging)


def _check_compatible(bundle: ModelBundle, data: DataBundle) -> None:
    if bundle.modality != data.modality:
        raise InputError(f"data: {data.spec} gives {data.modality} samples but {bundle.spec} takes "
                         f"{bundle.modality} input")
    if data.num_classes and bundle.task == "classification":
        with torch.inference_mode():
            outputs = call_model(bundle.model, bundle.example_inputs(1))
        if outputs.shape[-1] < data.num_classes:
            raise InputError(f"data: {data.spec} has {data.num_classes} classes but {bundle.spec} predicts "
                             f"{outputs.shape[-1]}")


class Pipeline:
    """Runs a recipe. Use `compress` unless you need the stages' live objects."""

    def __init__(self, recipe: Recipe, *, progress: bool = True, log=None):
        self.recipe = recipe
        self.progress = progress
        self.log = log or _LOG.info

    def _measure(self, name: str, step: str | None, deployable: Deployable, seconds: float, context: _StepContext,
                 reference: torch.Tensor | None, latency_batch: Any, scratch: Path) -> dict:
        m = self.recipe.measure
        eval_batch = max(m.batch_size, 32)
        self.log(f"measuring {name} on {deployable.runtime} ...")
        outputs, labels = collect_outputs(deployable, context.data, context.bundle.preprocess, eval_batch,
                                          m.max_eval_samples, progress=context.progress, desc=f"evaluating {name}")
        evaluation = evaluate(outputs, labels, reference, context.bundle.task)
        record = {"name": name, "step": step}
        record.update(measure_deployable(deployable, scratch / name.replace(":", "-"), latency_batch, m.batch_size,
                                         context.example_inputs(1), warmup=m.warmup, repeats=m.repeats))
        record.update(threads=context.threads, metric=evaluation.metric, score=round(evaluation.score, 6),
                      metrics={k: round(v, 6) for k, v in evaluation.metrics.items()},
                      eval_samples=int(outputs.shape[0]), step_seconds=round(seconds, 2),
                      details=deployable.details)
        tokenizer = getattr(context.bundle.preprocess, "tokenizer", None)
        if context.bundle.task == "lm" and deployable.runtime == "torch" and tokenizer is not None:
            record.update(measure_generation(deployable.module, tokenizer))  # decode tokens/s at batch 1
        record["_outputs"] = evaluation.outputs
        return record

    def run(self, workdir: Path, checkpoints: Path | None = None) -> tuple[list[dict], Deployable, _StepContext]:
        """Run every step and measure every stage; returns (stage records, final deployable, context).

        Under torchrun every rank runs the steps (training steps share the work); only rank 0 measures and
        runs the quantize step, whose result is not trained further. Other ranks return no stage records.
        """
        from torchslim.recover import distributed

        recipe = self.recipe
        main = distributed.current().is_main
        torch.manual_seed(recipe.seed)
        threads = set_threads(recipe.measure.threads)
        started = time.perf_counter()
        bundle = resolve_model(recipe.model)
        data = resolve_data(recipe.data, recipe.seed)
        _LOG.debug(f"{bundle.spec} and {data.spec} loaded in {time.perf_counter() - started:.1f} s; "
                   f"{threads} threads; scratch files in {workdir}")
        _check_compatible(bundle, data)
        check_exports(recipe.export, bundle, f"{recipe.source}: export")
        teacher = copy.deepcopy(bundle.model).eval().requires_grad_(False)
        context = _StepContext(model=bundle.model, teacher=teacher, bundle=bundle, data=data, seed=recipe.seed,
                               threads=threads, workdir=workdir, batch_size=recipe.measure.batch_size,
                               progress=self.progress and main, checkpoints=checkpoints)
        latency_batch = data.fill_batch("test", bundle.preprocess, recipe.measure.batch_size)
        scratch = context.scratch("stages")
        deployable: Deployable = TorchDeployable(bundle.model)
        stages, reference = [], None
        if main:
            stages.append(self._measure("baseline", None, deployable, 0.0, context, None, latency_batch, scratch))
            reference = stages[0]["_outputs"]
        distributed.barrier()  # the other ranks wait: the baseline is timed on an otherwise idle machine
        for index, step in enumerate(recipe.steps):
            context.where = f"{recipe.source}: steps[{index}].{step.kind}"
            context.step_index = index
            context.recipe_dict = _resolved_up_to(recipe, index)
            if step.kind == "quantize" and not main:
                continue
            self.log(f"step {index + 1}/{len(recipe.steps)}: {step.name}")
            started = time.perf_counter()
            deployable = run_step(context, step.kind, step.method, step.config)
            seconds = time.perf_counter() - started
            _LOG.debug(f"{step.name} took {seconds:.1f} s; result on {deployable.runtime}")
            if main:
                stages.append(self._measure(f"{index + 1}-{step.name}", step.name, deployable, seconds, context,
                                            reference, latency_batch, scratch))
        return stages, deployable, context


def compress(recipe: Recipe, out_dir: str | Path | None = None, *, progress: bool = True, log=None,
             fresh: bool = False, overwrite: bool = False) -> dict | None:
    """Run ``recipe``; write report.json, report.md, recipe.yaml, the final artifact and manifest.json to
    ``out_dir``.

    ``out_dir`` is checked before any work starts (see `torchslim._output`): a new path, an empty folder or a
    previous run's output folder; ``overwrite=True`` also allows replacing another file or folder, but never the
    working or home folder, a filesystem root or a folder holding the recipe. A lock beside it keeps a second run
    away while this one lasts. Nothing is written unless the whole run succeeds (the folder appears complete or
    not at all). Training steps checkpoint to ``<out_dir>.checkpoints/``; running the same recipe again after an
    interruption resumes from there (``fresh=True`` deletes them first); the folder is removed when the run
    completes. Under torchrun (see `torchslim.recover.distributed`) only rank 0 measures and writes; other ranks
    return None. Progress lines go to ``log`` (default: the ``torchslim.pipeline`` logger, level INFO);
    ``progress=False`` hides the progress bars.

    Returns:
        The report (see `torchslim.report.build_report`).

    Raises:
        InputError: a bad recipe, spec or data, an ``out_dir`` the rules refuse, or a folder in use by another run.
    """
    from torchslim.recover import distributed

    info = distributed.init_from_env()
    target = None
    if out_dir is not None:
        source = Path(recipe.source)
        target = check_output_dir(out_dir, overwrite=overwrite, protect=[source] if source.is_file() else [])
    if target is None or not info.is_main:
        return _compress(recipe, target, info, progress, log, fresh)
    with OutputLock(target):
        return _compress(recipe, target, info, progress, log, fresh)


def _resolved_up_to(recipe: Recipe, index: int) -> dict:
    """What identifies a training run in steps[index] (its checkpoints' fingerprint): the resolved recipe content
    up to that step; how the recipe's path was spelled and how stages are measured play no part."""
    resolved = recipe.to_dict()
    resolved.pop("measure")
    resolved.pop("export", None)  # which extra formats are written afterwards changes no training
    resolved["steps"] = resolved["steps"][:index + 1]
    return resolved


def _compress(recipe: Recipe, out_dir: Path | None, info, progress: bool, log, fresh: bool) -> dict | None:
    from torchslim.integrity import write_manifest
    from torchslim.recover import distributed
    from torchslim.report import build_report, write_outputs

    checkpoints = None if out_dir is None else checkpoint_root(out_dir)
    if checkpoints is not None and fresh and info.is_main and checkpoints.exists():
        shutil.rmtree(checkpoints)
    distributed.barrier()
    with _scratch_folder() as scratch, progress_bars(progress and info.is_main):
        stages, final, context = Pipeline(recipe, progress=progress, log=log if info.is_main else _quiet).run(
            Path(scratch), checkpoints)
        if not info.is_main:
            distributed.barrier()
            return None
        report = build_report(recipe, stages, context)
        report["processes"] = info.world_size
        if out_dir is not None:
            with atomic_output_dir(out_dir) as tmp:
                write_outputs(tmp, report, recipe, final, context, log=log)
                write_manifest(tmp)  # last: it covers every file written above
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)
        distributed.barrier()
    return report


def _scratch_folder() -> tempfile.TemporaryDirectory:
    try:
        return tempfile.TemporaryDirectory(prefix="torchslim-")
    except OSError as error:
        raise InputError(f"cannot create a scratch folder in {tempfile.gettempdir()} (set TMPDIR to a writable "
                         f"folder): {error.strerror or error}") from None


def _quiet(*args, **kwargs) -> None:
    pass


def __getattr__(name: str):
    if name == "StepContext":  # the handlers' context is internal now; `torchslim.apply` is the public way in
        warnings.warn("torchslim.pipeline.StepContext is internal (torchslim._context._StepContext); apply a "
                      "method with torchslim.apply(model, config, data)", DeprecationWarning, stacklevel=2)
        return _StepContext
    raise AttributeError(f"module 'torchslim.pipeline' has no attribute {name!r}")
