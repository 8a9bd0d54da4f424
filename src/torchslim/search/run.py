"""`torchslim.auto`: give it a model, data and a budget; it searches compression plans by measured trials and
writes the Pareto front, a recipe per front point and ``best/`` (the chosen point re-run by `compress`).

Order of work: resolve the search recipe -> open the study's storage -> (new study) time the baseline's layers,
score every option without training (`torchslim.search.sensitivity`), allocate the first plans
(`torchslim.search.allocation`) and enqueue them -> run the workers (`torchslim.search.worker`) -> re-measure
the front's latencies with no worker running -> write the results (`torchslim.search.results`).

While it runs, the study and the trials' files live in ``<out>.search/``; the output folder appears, complete,
only at the end (written to a temporary folder and renamed). Running the same command again resumes the study.
"""

from __future__ import annotations

import copy
import fcntl
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from torchslim.errors import InputError

SETTINGS = ("max_drop", "target", "budget", "runtime", "trials", "time_budget", "workers", "storage", "sampler")


def search_recipe(model: str | None = None, data: str | None = None, recipe: Any = None, seed: int | None = None,
                  batch_size: int | None = None, **settings) -> Any:
    """The validated search recipe: ``recipe`` (a path, a raw dict or a `Recipe`) or ``model`` + ``data``,
    with ``settings`` (see `SETTINGS`) written into its ``search:`` section."""
    from torchslim.recipe import load_recipe, parse_recipe

    source = "auto"
    if recipe is None:
        if not model or not data:
            raise InputError("auto: give a model spec and a data spec (or a recipe with a search: section)")
        raw: dict = {"model": model, "data": data}
    elif isinstance(recipe, (str, Path)):
        loaded = load_recipe(recipe)
        raw, source = loaded.to_dict(), str(recipe)
    else:
        raw = copy.deepcopy(recipe if isinstance(recipe, dict) else recipe.to_dict())
    if raw.get("steps"):
        raise InputError(f"{source}: steps: a search starts from the untouched model; leave steps out "
                         f"(the search writes them)")
    search = dict(raw.get("search") or {})
    constraints = dict(search.get("constraints") or {})
    for key, value in settings.items():
        if key not in SETTINGS:
            raise TypeError(f"auto() got an unexpected setting {key!r}")
        if value is None:
            continue
        (constraints if key in ("max_drop", "target", "budget") else search)[key] = value
    if constraints.get("budget") is not None and not constraints.get("target"):
        constraints["target"] = "latency"
    search["constraints"] = constraints
    raw["search"] = search
    if seed is not None:
        raw["seed"] = seed
    if batch_size is not None:
        raw["measure"] = {**(raw.get("measure") or {}), "batch_size": batch_size}
    result = parse_recipe(raw, source=source)
    if result.search.constraints.max_drop is None and result.search.constraints.budget is None:
        raise InputError(f"{source}: search.constraints: give max_drop (--max-drop) and/or a budget (--budget)")
    return result


def _check_runtime(recipe) -> None:
    if recipe.search.runtime == "onnxruntime":
        from torchslim.quant import onnx_backend

        reason = onnx_backend.available()
        if reason:
            raise InputError(f"{recipe.source}: search.runtime: onnxruntime: {reason}")


@contextmanager
def _exclusive(workdir: Path, created: bool) -> Iterator[None]:
    """Hold ``workdir``'s lock for the search (a second search on the same folder is refused); a folder this
    call created is removed again when the search stops on bad input, so nothing is left half-written."""
    handle = open(workdir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise InputError(f"{workdir}: another search is running on this output folder") from None
    try:
        yield
    except InputError:
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        handle.close()


def _payload_key(raw: dict) -> dict:
    """What must match to resume a study: everything but how long and how parallel it runs."""
    search = {k: v for k, v in raw["search"].items() if k not in ("trials", "time_budget", "workers", "storage")}
    return {**{k: v for k, v in raw.items() if k != "search"}, "search": search}


def _new_study(recipe, runner, storage, name: str, log: Callable, started: float) -> tuple[Any, dict]:
    from torchslim.search import allocation, sensitivity, space as spaces, study as studies

    config = recipe.search
    space = spaces.build_space(runner.bundle, runner.data, config.space, config.runtime)
    log(f"search space: {spaces.space_size_text(space)}" + (f" ({'; '.join(space.notes)})" if space.notes else ""))
    result = sensitivity.SensitivityPass(runner, space, config.sensitivity.calibration, config.space.float_layers,
                                         log).run()
    sensitivity.add_float_decisions(space, result)
    constraints = config.constraints
    target = constraints.target or next((o for o in config.objectives if o != "score"), "latency")
    reachable = allocation.cheapest(space, result, target)
    if constraints.budget is not None and reachable > constraints.budget * (2.0 if target == "latency" else 1.1):
        raise InputError(f"{recipe.source}: search.constraints.budget: {constraints.budget} of the baseline's "
                         f"{target} is out of reach: the most compressing plan in this space is predicted at "
                         f"{reachable:.3f} (widen search.space or raise the budget)")
    plans = allocation.allocate(space, result, target, constraints.budget, config.sensitivity.plans,
                                config.sensitivity.proxy)
    if config.sensitivity.plans:  # each precision alone first: the likeliest feasible points
        anchors = allocation.precision_plans(space, result)
        plans = anchors + [plan for plan in plans if plan not in anchors]
    payload = {"schema": studies.PAYLOAD_SCHEMA, "recipe": recipe.to_dict(), "key": _payload_key(recipe.to_dict()),
               "space": space.to_dict(), "sensitivity": result, "baseline": runner.baseline, "seed": recipe.seed,
               "started": started, "target": target, "enqueued": plans}
    payload["deadline"] = started + config.seconds if config.seconds else None
    study = studies.create_study(storage, name, len(config.objectives), payload,
                                 studies.make_sampler(config.sampler, recipe.seed, len(plans) + 4))
    for plan in plans:
        study.enqueue_trial(plan, user_attrs={"proxy_plan": True})
    log(f"sensitivity pass: {result['seconds']:.0f} s; {len(plans)} proxy-allocated plans enqueued")
    return study, payload


def _resume(study, payload: dict, recipe, name: str, log: Callable, started: float) -> None:
    """Continue ``study`` with this command's trial and time budget; interrupted trials run again."""
    from torchslim.search import study as studies

    config = recipe.search
    if payload.get("key") != _payload_key(recipe.to_dict()):
        raise InputError(f"--study {name}: that study holds another search (model, data, space or constraints "
                         f"differ); use another --study or --out, or --fresh")
    payload["deadline"] = started + config.seconds if config.seconds else None
    payload["recipe"]["search"].update(trials=config.trials, workers=config.workers)
    study.set_user_attr(studies.PAYLOAD, payload)
    lost = studies.recover_interrupted(study, studies.is_journal(config.storage))
    log(f"resuming study {name}: {studies.counted(study)} trials done"
        + (f"; interrupted trials {lost} failed and enqueued again" if lost else ""))


def auto(model: str | None = None, data: str | None = None, out: str | Path | None = None, *,
         recipe: Any = None, seed: int | None = None, batch_size: int | None = None, study: str | None = None,
         progress: bool = True, log: Callable[[str], None] = print, fresh: bool = False, overwrite: bool = False,
         **settings) -> dict:
    """Search compression plans for ``model`` on ``data`` under the constraints; returns the report dict
    (``report["search"]`` holds the front, the constraint lines and the chosen point).

    Args:
        model: the model spec (e.g. "builtin:digits-cnn"), or ``recipe`` with a search section.
        data: the data spec (e.g. "builtin:digits").
        out: the output folder (default ``out/auto-<model name>``).
        seed: the recipe's seed (steps) and the sampler's.
        batch_size: the batched latency's batch size (``measure.batch_size``).
        study: the study's name in its storage (default ``torchslim-<out folder name>``).
        fresh: discard an interrupted earlier search of this output folder instead of resuming it.
        overwrite: replace ``out`` even if no torchslim run wrote it (see `torchslim._output.check_output_dir`).
        **settings (Any): ``max_drop``, ``target``, ``budget``, ``runtime``, ``trials``, ``time_budget``, ``workers``,
            ``storage``, ``sampler`` — the `SearchConfig` fields of the same names.

    Examples:
        >>> report = torchslim.auto("builtin:digits-cnn", "builtin:digits", "out/auto", max_drop=0.005,
        ...                         target="latency", trials=30, batch_size=256)
        >>> report["search"]["chosen"]["latency_ratio"]
    """
    from torchslim._output import OutputLock, check_output_dir
    from torchslim.search import study as studies

    started = time.time()  # the time budget covers the sensitivity pass and the trials
    recipe = search_recipe(model, data, recipe, seed, batch_size, **settings)
    _check_runtime(recipe)
    studies.require_optuna()
    out = Path(out or f"out/auto-{str(recipe.model).split(':')[-1].replace('/', '-')}")
    source = Path(recipe.source)
    out = check_output_dir(out, overwrite=overwrite, protect=[source] if source.is_file() else [])
    with OutputLock(out):
        return _search(recipe, out, study, progress, log, fresh, started)


def _search(recipe, out: Path, study: str | None, progress: bool, log: Callable, fresh: bool,
            started: float) -> dict:
    """The search itself, under the output folder's lock (see `auto`)."""
    from torchslim.measure.latency import usable_cores
    from torchslim.search import study as studies
    from torchslim.search.results import finish
    from torchslim.search.trial import TrialRunner, default_lock_path
    from torchslim.search.worker import run_worker, start_local_workers

    config = recipe.search
    workdir = out.with_name(out.name + ".search")
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    name = study or f"torchslim-{out.name}"
    with _exclusive(workdir, created):
        journal = workdir / "journal.log"
        if created and (out / "study.journal").is_file() and studies.is_journal(config.storage):
            shutil.copyfile(out / "study.journal", journal)  # a finished search, extended
        storage = studies.open_storage(config.storage, journal)
        workers = config.workers
        threads = max(1, (recipe.measure.threads or usable_cores()) // workers)
        existing, payload = studies.load_study(storage, name)
        runner = TrialRunner(recipe, workdir / "worker-0", threads, default_lock_path(), config.repeats, log)
        if payload is not None:
            _resume(existing, payload, recipe, name, log, started)
        else:
            _new_study(recipe, runner, storage, name, log, started)
        url = config.storage or f"journal:{journal.resolve()}"
        helpers, helpers_ready = start_local_workers(workers - 1, url, name, workdir, threads, not progress)
        try:
            run_worker(storage, name, workdir, runner=runner, compute_threads=threads, log=log, ready=helpers_ready)
        finally:
            for process in helpers:
                process.wait()
        failed = [p.returncode for p in helpers if p.returncode]
        if failed:
            log(f"{len(failed)} of {len(helpers)} helper workers exited with an error (codes {failed})")
        if studies.is_journal(config.storage):
            journal = journal if config.storage is None else Path(config.storage.removeprefix("journal:"))
        else:
            journal = None
        report = finish(recipe, storage, name, runner, out, log, journal)
    shutil.rmtree(workdir, ignore_errors=True)  # the study is in out/study.journal (or in its own storage)
    return report
