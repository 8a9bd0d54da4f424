"""What report.html shows, computed from report.json: the headline, the stage table, each stage's details, the
search, the environment (`torchslim.report.html` renders it through the templates)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from torchslim.report import _details, _figures
from torchslim.report import _format as fmt

def _card(key: str, factor, more: str, less: str, same: str, detail: str) -> dict:
    """A headline figure: a factor against the baseline (``more`` when >= 1, else its inverse with ``less``;
    ``same`` within half a percent of 1)."""
    if not _details.is_number(factor) or factor <= 0:
        return {"key": key, "value": "n/a", "label": more, "detail": detail, "tone": "neutral"}
    if abs(factor - 1) < 0.005:
        return {"key": key, "value": "1×", "label": same, "detail": detail, "tone": "neutral"}
    better = factor >= 1
    return {"key": key, "value": fmt.ratio(factor if better else 1 / factor), "label": more if better else less,
            "detail": detail, "tone": "good" if better else "bad"}


def _metric_card(metric: str, base, final, samples) -> dict:
    text, gain = fmt.score_change(metric, base, final)
    detail = f"{fmt.score(metric, base)} → {fmt.score(metric, final)}" + (f" on {samples:,} test samples"
                                                                           if isinstance(samples, int) else "")
    if gain is None:
        return {"key": "metric", "value": "n/a", "label": f"{metric} change", "detail": detail, "tone": "neutral"}
    if metric in fmt.FRACTIONS:
        value, label = f"{abs(gain):.2f} pts", f"{metric} {'lost' if gain < 0 else 'gained'}"
    else:
        value, label = text, f"{metric} change"
    tone = "bad" if gain < -1e-9 else "good" if gain > 1e-9 else "neutral"
    return {"key": "metric", "value": value, "label": label, "detail": detail, "tone": tone}


def headline(report: dict) -> list[dict]:
    """The four figures of the first screen: size, batched and batch-1 speed, the metric's change."""
    stages = report.get("stages") or []
    if not stages:
        return _search_headline(report.get("search") or {})
    base, final = stages[0], stages[-1]
    ratios, batch = final.get("ratios") or {}, final.get("batch_size")
    return [
        _card("size", ratios.get("size_reduction"), "smaller", "larger", "same size",
              f"{fmt.size(base.get('size_bytes'))} → {fmt.size(final.get('size_bytes'))} shipped"),
        _card("speed_batch", ratios.get("speedup_batch"), f"faster at batch {batch}", f"slower at batch {batch}",
              f"same speed at batch {batch}",
              f"{fmt.ms(base.get('latency_ms_batch'))} → {fmt.ms(final.get('latency_ms_batch'))} per batch"),
        _card("speed_bs1", ratios.get("speedup_bs1"), "faster at batch 1", "slower at batch 1",
              "same speed at batch 1",
              f"{fmt.ms(base.get('latency_ms_bs1'))} → {fmt.ms(final.get('latency_ms_bs1'))} per sample"),
        _metric_card(final.get("metric", "score"), base.get("score"), final.get("score"), final.get("eval_samples")),
    ]


def _search_headline(section: dict) -> list[dict]:
    """Without a best/ run (no point met the constraints) the closest point's validation figures stand in."""
    chosen = section.get("chosen") or {}
    inverse = {k: 1 / chosen[k] if _details.is_number(chosen.get(k)) and chosen[k] > 0 else None
               for k in ("size_ratio", "latency_ratio", "latency_ratio_bs1")}
    metric = (section.get("baseline") or {}).get("metric", "score")
    drop = chosen.get("drop")
    where = f"trial {chosen.get('trial')} (validation split)"
    return [_card("size", inverse["size_ratio"], "smaller", "larger", "same size", where),
            _card("speed_batch", inverse["latency_ratio"], "faster, batched", "slower, batched", "same speed, batched",
                  where),
            _card("speed_bs1", inverse["latency_ratio_bs1"], "faster at batch 1", "slower at batch 1",
                  "same speed at batch 1", where),
            {"key": "metric", "value": fmt.value(drop) if _details.is_number(drop) else "n/a",
             "label": f"{metric} drop", "detail": where, "tone": "bad" if (drop or 0) > 0 else "neutral"}]


# (field, header, formatter, ratio key, how the ratio reads, whether a larger ratio is better)
COLUMNS = (
    ("params", "Params", fmt.count, "params", "{} of baseline", False),
    ("macs", "MACs", fmt.count, "macs", "{} of baseline", False),
    ("size_bytes", "Size (shipped)", fmt.size, "size_reduction", "{} smaller", True),
    ("size_bytes_raw", "File", fmt.size, "size_reduction_raw", "{} smaller", True),
    ("latency_ms_bs1", "Latency bs1", fmt.ms, "speedup_bs1", "{} faster", True),
    ("latency_ms_batch", "Latency batch", fmt.ms, "speedup_batch", "{} faster", True),
    ("peak_memory_bytes", "Peak memory", fmt.size, None, "{} less", True),
)


def _ratio_note(factor, template: str, larger_is_better: bool) -> tuple[str, str]:
    """How a stage's figure compares with the baseline's, and whether that is good, bad or neutral."""
    if not _details.is_number(factor) or factor <= 0:
        return "", "neutral"
    if abs(factor - 1) < 0.005:
        return "same as baseline", "neutral"
    if larger_is_better and factor < 1:
        worse = template.replace("smaller", "larger").replace("faster", "slower").replace("less", "more")
        return worse.format(fmt.ratio(1 / factor)), "bad"
    good = factor > 1 if larger_is_better else factor < 1
    return template.format(fmt.ratio(factor)), "good" if good else "bad"


def stage_rows(report: dict) -> list[dict]:
    """The stage table: per stage, one cell per column with its raw value, the text shown and the ratio note."""
    stages = report.get("stages") or []
    rows = []
    for index, stage in enumerate(stages):
        base, ratios = stages[0], stage.get("ratios") or {}
        cells = []
        for field, _, formatter, ratio_key, template, larger in COLUMNS:
            value = stage.get(field)
            factor = ratios.get(ratio_key) if ratio_key else (
                base.get(field) / value if _details.is_number(value) and value and
                _details.is_number(base.get(field)) else None)
            note, tone = _ratio_note(factor, template, larger) if index else ("", "neutral")
            cells.append({"field": field, "value": value, "raw": json.dumps(value), "text": formatter(value),
                          "note": note, "tone": tone})
        if stage.get("params_nonzero") not in (None, stage.get("params")):
            cells[0]["note"] = f"{fmt.count(stage['params_nonzero'])} nonzero" + (
                f" · {cells[0]['note']}" if cells[0]["note"] else "")
        metric = stage.get("metric", "score")
        change, gain = fmt.score_change(metric, base.get("score"), stage.get("score"))
        cells.append({"field": "score", "value": stage.get("score"), "raw": json.dumps(stage.get("score")),
                      "text": fmt.score(metric, stage.get("score")),
                      "note": change if index else metric, "tone": "neutral" if not index or gain is None or
                      abs(gain) < 1e-9 else "good" if gain > 0 else "bad"})
        rows.append({"name": stage.get("name", f"stage {index}"), "runtime": stage.get("runtime", ""),
                     "cells": cells, "final": index == len(stages) - 1 and index > 0})
    return rows


def stage_headers() -> list[str]:
    return [header for _, header, *_ in COLUMNS] + ["Metric"]


def stage_sections(stages: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(training curves, per-layer sections, bytes-by-component figures), each entry for one stage."""
    curves, layers, components = [], [], []
    for index, stage in enumerate(stages):
        name = stage.get("name", f"stage {index}")
        blocks = _details.classify(stage.get("details"))
        if blocks["curves"]:
            curves.append({"stage": name, "figure": _figures.training(name, index, blocks["curves"])})
        bars = [_figures.bars(name, f"fig-layers-{index}-{i}", block) for i, block in enumerate(blocks["bars"])]
        components += [_figures.components(name, f"fig-bytes-{index}-{i}", block)
                       for i, block in enumerate(blocks["sizes"])]
        if index and (blocks["facts"] or bars or blocks["tables"] or blocks["rest"]):
            layers.append({"stage": name, "facts": blocks["facts"], "figures": bars, "tables": blocks["tables"],
                           "rest": blocks["rest"], "seconds": stage.get("step_seconds")})
    return curves, layers, components


def environment_rows(report: dict) -> list[tuple[str, str]]:
    """The machine and software the figures were measured with."""
    env = report.get("environment") or {}
    names = (("cpu", "CPU"), ("isa_flags", "ISA flags"), ("cpu_int8_features", "ISA flags (int8)"),
             ("threads", "threads"), ("os", "OS"), ("python", "Python"), ("torch", "PyTorch"),
             ("onnxruntime", "ONNX Runtime"),
             ("torchslim", "torchslim"), ("git_commit", "git commit"))
    rows = [(title, ", ".join(map(str, env[key])) or "none" if isinstance(env[key], list) else fmt.value(env[key]))
            for key, title in names if key in env]
    rows += [(fmt.label(k), fmt.value(v) if not isinstance(v, (list, dict)) else json.dumps(v))
             for k, v in env.items() if k not in dict(names)]
    if report.get("processes", 1) != 1:
        rows.append(("training processes", fmt.value(report["processes"])))
    return rows


def _read_json(folder: Path | None, name: str):
    """A sibling file of report.json the page can use (trials.json, sensitivity.json), or None."""
    if folder is None or not (folder / name).is_file():
        return None
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None


def sensitivity_scores(payload) -> list[dict]:
    """``[{"name", "loss"}]`` per option measured by a search's proxy pass (sensitivity.json: ``options`` per
    decision, ``precision`` and ``float_layers`` options)."""
    scores = []

    def walk(name: str, entry, depth: int) -> None:
        if isinstance(entry, dict) and _details.is_number(entry.get("loss")):
            scores.append({"name": name, "loss": entry["loss"]})
        elif isinstance(entry, dict) and depth < 2:
            for key, inner in entry.items():
                walk(f"{name} = {key}" if depth else str(key), inner, depth + 1)

    for section in ("options", "precision", "float_layers"):
        walk("", payload.get(section) if isinstance(payload, dict) else None, 0)
    return scores


def search_view(section: dict, folder: Path | None) -> dict:
    """The search: its summary, the front as a table, the plots in ratio space and the proxy's sensitivities."""
    trials = _read_json(folder, "trials.json")
    points = [{**t.get("figures", {}), "trial": t.get("trial")} for t in trials or [] if isinstance(t, dict)]
    counts = section.get("trials") or {}
    chosen = section.get("chosen") or {}
    facts = [("result", section.get("message", "")),
             ("trials", f"{counts.get('complete', 0)} complete, {counts.get('failed', 0)} failed, "
                        f"{counts.get('interrupted', 0)} interrupted in {counts.get('seconds', '?')} s"),
             ("objectives", ", ".join(o.get("name", "?") for o in section.get("objectives", [])))]
    facts += [(f"constraint {c.get('name')}", f"{c.get('key')} ≤ {c.get('limit')}")
              for c in section.get("constraints", [])]
    if chosen:
        facts.append(("chosen", f"trial {chosen.get('trial')}: {chosen.get('reason', '')} — recipe "
                                f"{chosen.get('recipe', '')}"))
    keys = ("trial", "feasible", "drop", "latency_ms_batch", "latency_ratio", "size_ratio", "macs_ratio", "runtime")
    rows = [[fmt.value(p.get(k)) for k in keys] + [p.get("recipe", "")] for p in section.get("front", [])]
    figures = _figures.search(section, points)
    sensitivity = _figures.sensitivity(sensitivity_scores(_read_json(folder, "sensitivity.json")))
    return {"facts": facts, "columns": [fmt.label(k) for k in keys] + ["recipe"], "rows": rows,
            "chosen": chosen.get("trial"), "figures": figures + ([sensitivity] if sensitivity else []),
            "note": section.get("latency_note", "")}


def title_of(report: dict) -> tuple[str, str]:
    """(model spec, data spec) of the run."""
    from torchslim.report import spec_of

    recipe = report.get("recipe") or {}
    return spec_of(recipe.get("model", "?")), spec_of(recipe.get("data", "?"))


def page(report: dict, folder: Path | None = None) -> dict:
    """Everything the report template shows, with the plots as figure specifications in ``figures``."""
    stages = report.get("stages") or []
    model, data = title_of(report)
    curves, layers, components = stage_sections(stages)
    search = search_view(report["search"], folder) if isinstance(report.get("search"), dict) else None
    sizes = _figures.stage_sizes(stages) if stages else None
    if isinstance(report.get("size_breakdown"), dict):
        components = _figures.breakdown(report["size_breakdown"], report.get("artifact") or "artifact") + components
    tradeoffs = _figures.tradeoffs(stages)
    figures = tradeoffs + [c["figure"] for c in curves] + [f for s in layers for f in s["figures"]] + \
        ([sizes] if sizes else []) + components + (search["figures"] if search else [])
    final = stages[-1] if stages else {}
    return {
        "model": model, "data": data, "steps": [s.get("name", "") for s in stages[1:]],
        "runtime": final.get("runtime", ""), "threads": (report.get("environment") or {}).get("threads"),
        "cpu": (report.get("environment") or {}).get("cpu", ""), "headline": headline(report),
        "headers": stage_headers(), "rows": stage_rows(report), "tradeoffs": tradeoffs, "curves": curves,
        "layers": layers, "components": components, "sizes": sizes, "search": search,
        "skipped": sorted((report.get("skipped") or {}).items()), "notes": report.get("notes") or [],
        "data_facts": [(fmt.label(k), fmt.value(v) if not isinstance(v, (list, dict)) else json.dumps(v))
                       for k, v in (report.get("data") or {}).items()],
        "environment": environment_rows(report), "artifact": report.get("artifact"),
        "recipe": yaml.safe_dump(report.get("recipe") or {}, sort_keys=False), "figures": figures,
        "schema": report.get("schema", ""), "eval_samples": final.get("eval_samples"),
        "batch_size": final.get("batch_size"),
    }


def comparison_page(runs: list[tuple[str, dict]]) -> dict:
    """Several runs side by side: one row per run (its final stage against its baseline), one scatter with every
    run's stages, and each run's stage table."""
    summary = []
    for label, report in runs:
        model, data = title_of(report)
        cards = {card["key"]: card for card in headline(report)}
        stages = report.get("stages") or []
        final = stages[-1] if stages else {}
        summary.append({"label": label, "model": model, "data": data, "steps": [s.get("name", "") for s in
                                                                              stages[1:]],
                        "runtime": final.get("runtime", ""), "cards": [cards[k] for k in
                                                                      ("size", "speed_batch", "speed_bs1", "metric")],
                        "score": fmt.score(final.get("metric", "score"), final.get("score")),
                        "cpu": (report.get("environment") or {}).get("cpu", ""),
                        "threads": (report.get("environment") or {}).get("threads")})
    figures = _figures.comparison(runs)
    return {"runs": summary, "figures": figures, "headers": stage_headers(),
            "tables": [{"label": label, "rows": stage_rows(report)} for label, report in runs]}
