"""Writing a finished search: re-measure the front, choose, re-run the chosen point as a full recipe, and write
the output folder — ``report.json`` (its ``search`` section: schema ``torchslim.search/1``), ``report.md``,
``report.html``, ``front.json``, ``front/trial-NNNN/recipe.yaml`` (one per Pareto point, runnable by
`torchslim compress`), ``trials.json``, ``sensitivity.json``, ``recipe.yaml`` (the search as resolved),
``study.journal`` and ``best/`` (a complete `compress` output folder of the chosen point).
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
from pathlib import Path
from typing import Callable

import yaml

from torchslim.search.front import (SCHEMA, choose, default_reference, hypervolume, pareto_front, points_of,
                                    proxy_quality)
from torchslim.search.worker import TARGET_KEYS, constraint_values

LATENCY_NOTE = ("Latency is measured by one worker at a time (a machine-wide file lock), each time alternating "
                "the candidate with the baseline (medians of the rounds), so the ratios stay honest while other "
                "workers compute; the front's points are then re-measured with no worker running.")


def _reload(runner, point: dict):
    """The point's artifact as a deployable, or None where it cannot be rebuilt from its file alone."""
    from torchslim.runtime import OnnxRuntimeDeployable, TorchDeployable

    path = Path(point["artifact"])
    if not path.exists():
        return None
    if path.suffix == ".onnx":
        return OnnxRuntimeDeployable(path, runner.teacher, runner.threads)
    kinds = {next(iter(step)) for step in point["recipe"]["steps"]}
    if path.name == "model.safetensors" and kinds <= {"prune", "finetune"}:
        from torchslim.pruning.channel import _load_pruned

        return TorchDeployable(_load_pruned(copy.deepcopy(runner.pristine), path.parent))
    quantize = [step["quantize"] for step in point["recipe"]["steps"] if "quantize" in step]
    if path.name == "model.safetensors" and kinds <= {"prune", "finetune", "quantize"} and quantize and \
            all(q.get("method") == "bf16" for q in quantize):
        from torchslim.loading import load
        from torchslim.quant.bf16 import CompiledTorchDeployable

        module = load(path.parent, copy.deepcopy(runner.pristine), verify=False)  # replays the recorded bf16
        # on the runtime the trial's step chose (eager or compiled), as it was timed in the trial
        return (CompiledTorchDeployable if point.get("runtime") == "torchinductor" else TorchDeployable)(module)
    return None


def remeasure(runner, points: list[dict], rounds: int = 2) -> None:
    """Time each point again against the baseline (A/B, ``rounds`` times its search repeats; no other worker
    runs now) and replace its latency figures, keeping the trial's as ``trial_latency``."""
    from torchslim.search.trial import ab_latency

    for point in points:
        deployable = _reload(runner, point)
        if deployable is None:
            point["remeasured"] = False
            continue
        timing = ab_latency(deployable, runner.baseline_deployable, runner.batch, runner.repeats * rounds,
                            runner.lock_path)
        point["trial_latency"] = {k: point[k] for k in ("latency_ms_batch", "latency_ms_bs1", "latency_ratio",
                                                        "latency_ratio_bs1")}
        point.update({k: v for k, v in timing.items() if k != "lock_wait_s"}, remeasured=True)


def _section(recipe, payload: dict, points: list[dict], front: list[dict], chosen: dict | None, reason: str,
             runner, counts: dict, proxy: dict, volume: float, reference: list[float]) -> dict:
    from torchslim.search.study import masked

    config = recipe.search
    c = config.constraints
    lines = []
    if c.max_drop is not None:
        metric = payload["baseline"]["metric"]
        lines.append({"name": "max_drop", "objective": "score", "key": "drop", "limit": c.max_drop,
                      "relative": metric == "perplexity", "metric": metric})
    if c.budget is not None:
        lines.append({"name": "budget", "objective": c.target, "key": TARGET_KEYS[c.target], "limit": c.budget,
                      "of": "the baseline's " + {"latency": "batched latency", "size": "shipped bytes",
                                                  "macs": "MACs"}[c.target]})
    feasible = [p for p in points if p["feasible"]]
    return {
        "schema": SCHEMA, "study": payload.get("name"), "storage": masked(config.storage or "journal: study.journal"),
        "sampler": config.sampler, "seed": recipe.seed, "objectives": [
            {"name": o, "key": {"score": "drop", "latency": "latency_ratio", "size": "size_ratio",
                                "macs": "macs_ratio"}[o], "direction": "minimize"} for o in config.objectives],
        "constraints": lines, "baseline": payload["baseline"] | {
            "latency_ms_batch": _median([p["baseline_latency_ms_batch"] for p in points]),
            "latency_ms_bs1": _median([p["baseline_latency_ms_bs1"] for p in points])},
        "trials": {**counts, "feasible": len(feasible),
                   "first_feasible": min((p["trial"] for p in feasible), default=None)},
        "space": {k: v for k, v in payload["space"].items() if k != "decisions"} | {
            "decisions": [{"name": d["name"], "kind": d["kind"], "options": d["options"], "layers": d["layers"]}
                          for d in payload["space"]["decisions"]]},
        "proxy": {**proxy, "used": config.sensitivity.proxy, "enqueued": len(payload.get("enqueued", [])),
                  "sensitivity_seconds": payload["sensitivity"]["seconds"]},
        "front": [_public(p) for p in front],
        "chosen": None if chosen is None else _public(chosen) | {"reason": reason, "best": "best" if chosen["feasible"]
                                                                 else None},
        "feasible": bool(feasible),
        "message": _message(points, feasible, payload, config),
        "hypervolume": {"value": round(volume, 6), "reference": reference},
        "latency_note": LATENCY_NOTE, "split": runner.split,
    }


def _message(points: list[dict], feasible: list[dict], payload: dict, config) -> str:
    if feasible:
        return f"{len(feasible)} of {len(points)} measured points meet the constraints"
    if not points and config.seconds and payload["sensitivity"]["seconds"] >= config.seconds:
        return (f"no trial ran: the sensitivity pass took {payload['sensitivity']['seconds']:.0f} s of the "
                f"{config.seconds:.0f} s time budget (raise search.time_budget / --time-budget, or lower "
                f"search.sensitivity.calibration.samples)")
    return (f"no point meets the constraints ({len(points)} measured); the front and the closest point are "
            f"written, best/ is not")


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def _public(point: dict) -> dict:
    hidden = ("artifact", "recipe", "constraint_excess")
    recipe = f"front/trial-{point['trial']:04d}/recipe.yaml"
    return {k: v for k, v in point.items() if k not in hidden} | {"recipe": recipe}


def _counts(study) -> dict:
    from optuna.trial import TrialState

    from torchslim.search.study import interrupted

    trials = study.get_trials(deepcopy=False)
    lost = set(interrupted(study))
    return {"requested": study.user_attrs["torchslim"]["recipe"]["search"]["trials"],
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "failed": sum(t.state == TrialState.FAIL and t.number not in lost for t in trials),
            "interrupted": len(lost), "interrupted_trials": sorted(lost),
            "seconds": round(max((t.datetime_complete.timestamp() - study.user_attrs["torchslim"]["started"]
                                  for t in trials if t.datetime_complete), default=0.0), 1)}


def _write_yaml(path: Path, raw: dict, comment: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(comment + yaml.safe_dump(raw, sort_keys=False))


def finish(recipe, storage, name: str, runner, out: Path, log: Callable[[str], None],
           journal: Path | None = None) -> dict:
    """Collect the study's trials and write the output folder (see the module docstring); returns the report."""
    from torchslim.pipeline import atomic_output_dir
    from torchslim.report import environment
    from torchslim.search.allocation import Predictor
    from torchslim.search.space import SearchSpace
    from torchslim.search.study import load_study

    config = recipe.search
    study, payload = load_study(storage, name)
    payload["name"] = name
    constraints = {"max_drop": config.constraints.max_drop, "target": config.constraints.target,
                   "budget": config.constraints.budget}
    points = points_of(study.get_trials(deepcopy=False))
    log(f"re-measuring the latency of the front's points ({len(pareto_front(points, config.objectives))})")
    remeasure(runner, pareto_front(points, config.objectives))
    for point in points:
        point["constraint_excess"] = constraint_values(point, constraints)
        point["feasible"] = all(v <= 0 for v in point["constraint_excess"])
    front = pareto_front(points, config.objectives)
    chosen, reason = choose(points, constraints, config.objectives)
    predictor = Predictor(SearchSpace.from_dict(payload["space"]), payload["sensitivity"])
    reference = default_reference(config.objectives, constraints)
    section = _section(recipe, payload, points, front, chosen, reason, runner, _counts(study),
                       proxy_quality(points, predictor), hypervolume(points, config.objectives, reference),
                       reference)
    with atomic_output_dir(out) as tmp:
        report = _best(chosen, section, tmp, log)
        for point in front + ([chosen] if chosen is not None and chosen not in front else []):
            _write_yaml(tmp / "front" / f"trial-{point['trial']:04d}" / "recipe.yaml", point["recipe"],
                        f"# torchslim auto, study {name}, trial {point['trial']}: drop {point['drop']}, latency "
                        f"{point['latency_ratio']}x, size {point['size_ratio']}x (validation split)\n"
                        f"# reproduce: torchslim compress THIS_FILE --out DIR\n")
        if report is None:
            report = {"schema": "torchslim.report/1", "recipe": recipe.to_dict(), "stages": [], "skipped": {},
                      "notes": [], "environment": environment(runner.threads)}
        report["search"] = section
        _write_files(tmp, recipe, report, points, payload["sensitivity"], journal, log)
    log(section["message"])
    return report


def _best(chosen: dict | None, section: dict, tmp: Path, log: Callable[[str], None]) -> dict | None:
    """The chosen point re-run by `compress` into ``tmp/best`` (its report), or None when it is not feasible
    or fails (the search's results are still written; the section says why)."""
    from torchslim.errors import describe
    from torchslim.pipeline import compress
    from torchslim.recipe import parse_recipe

    if chosen is None:
        return None
    if not chosen["feasible"]:
        section["chosen"]["recipe"] = f"front/trial-{chosen['trial']:04d}/recipe.yaml"
        return None
    log(f"best point: trial {chosen['trial']}; re-running its recipe as a full compress run into best/")
    try:
        return compress(parse_recipe(chosen["recipe"], source=f"trial {chosen['trial']}"), tmp / "best",
                        progress=False, log=log)
    except Exception as error:
        section["chosen"]["best"] = None
        section["chosen"]["best_error"] = describe(error)
        log(f"best/ could not be built: {describe(error)}")
        return None


def _write_files(tmp: Path, recipe, report: dict, points: list[dict], sensitivity: dict,
                 journal: Path | None, log: Callable[[str], None]) -> None:
    """front.json, trials.json, sensitivity.json, recipe.yaml, study.journal, report.json, report.md,
    report.html (it reads trials.json and sensitivity.json) and, last, manifest.json."""
    from torchslim.integrity import write_manifest
    from torchslim.report.html import write_report_html

    section = report["search"]
    trials = [{"trial": p["trial"], "params": p["params"],
               "figures": {k: v for k, v in p.items() if k not in ("params", "recipe")}} for p in points]
    (tmp / "front.json").write_text(json.dumps({"schema": SCHEMA, "front": section["front"],
                                                "constraints": section["constraints"],
                                                "chosen": section["chosen"]}, indent=1) + "\n")
    (tmp / "trials.json").write_text(json.dumps(trials, indent=1, default=str) + "\n")
    (tmp / "sensitivity.json").write_text(json.dumps(sensitivity, indent=1) + "\n")
    _write_yaml(tmp / "recipe.yaml", recipe.to_dict())
    if journal is not None and journal.is_file():
        shutil.copyfile(journal, tmp / "study.journal")
    (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (tmp / "report.md").write_text(to_markdown(section, report))
    write_report_html(tmp, report, log)
    write_manifest(tmp)  # last: it covers every file above, best/ included


def to_markdown(section: dict, report: dict) -> str:
    """The search's summary: constraints, the chosen point, the front, the proxy's rank correlation."""
    base = section["baseline"]
    lines = ["# torchslim auto", "", f"baseline on the {section['split']} split: {base['metric']} "
             f"{base['score']:.4f}, batched latency {base['latency_ms_batch']} ms @{base['batch_size']}", ""]
    lines += [f"- constraint `{c['name']}`: {c['key']} <= {c['limit']}" for c in section["constraints"]]
    trials = section["trials"]
    lines += ["", f"{trials['complete']} trials completed ({trials['failed']} failed, {trials['interrupted']} "
              f"interrupted) in {trials['seconds']} s; first feasible: trial {trials['first_feasible']}.",
              f"**{section['message']}**", ""]
    chosen = section["chosen"]
    if chosen:
        lines += [f"Chosen: trial {chosen['trial']} ({chosen['reason']}): drop {chosen['drop']}, latency "
                  f"{chosen['latency_ratio']}x, size {chosen['size_ratio']}x; recipe `{chosen['recipe']}`"
                  + ("; measured on the test split in `best/`" if chosen.get("best") else ""), ""]
    lines += ["| trial | feasible | drop | latency ms | latency x | size x | MACs x | runtime | recipe |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in section["front"]:
        lines.append(f"| {p['trial']} | {'yes' if p['feasible'] else 'no'} | {p['drop']:+.4f} | "
                     f"{p['latency_ms_batch']:.3f} | {p['latency_ratio']:.4f} | {p['size_ratio']:.4f} | "
                     f"{p['macs_ratio']:.4f} | {p['runtime']} | `{p['recipe']}` |")
    proxy = section["proxy"]
    lines += ["", f"Proxy (sensitivity pass, no training) vs measured drop, Spearman over {proxy['trials']} trials: "
              f"loss {proxy['loss']}, SQNR {proxy['sqnr']} (better: {proxy['better']}); predicted vs measured "
              f"latency {proxy['latency']}.", "", section["latency_note"], ""]
    if section["space"]["notes"]:
        lines += ["## Left out of the space", ""] + [f"- {n}" for n in section["space"]["notes"]]
    return "\n".join(lines) + "\n"
