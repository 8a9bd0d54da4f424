"""The results a user acts on: the Pareto front of the measured trials, the point chosen under the constraints
(or, when none meets them, the closest one), how well the proxy ranked the measured drops, the hypervolume.

A point is one completed trial: its plan, its recipe and its measured figures (validation split). All objectives
are minimised (the score's drop, cost ratios to the baseline).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from torchslim.search.worker import OBJECTIVE_KEYS, TARGET_KEYS

SCHEMA = "torchslim.search/1"


def points_of(trials: Iterable) -> list[dict]:
    """One point per completed trial that has figures (Optuna FrozenTrials in, plain dicts out)."""
    points = []
    for trial in trials:
        figures = trial.user_attrs.get("figures")
        if trial.state.name != "COMPLETE" or figures is None:
            continue
        constraints = trial.user_attrs.get("constraints", [])
        points.append({"trial": trial.number, "params": dict(trial.params), "recipe": trial.user_attrs["recipe"],
                       "feasible": all(v <= 0 for v in constraints), "constraint_excess": constraints,
                       "enqueued": bool(trial.system_attrs.get("fixed_params")), **figures})
    return points


def dominates(a: dict, b: dict, keys: list[str]) -> bool:
    return all(a[k] <= b[k] for k in keys) and any(a[k] < b[k] for k in keys)


def pareto_front(points: list[dict], objectives: list[str]) -> list[dict]:
    """The points no other point dominates on ``objectives`` (by their figures; duplicates kept once)."""
    keys = [OBJECTIVE_KEYS[o] for o in objectives]
    front, seen = [], set()
    for p in points:
        if any(dominates(q, p, keys) for q in points):
            continue
        signature = tuple(p[k] for k in keys)
        if signature not in seen:
            seen.add(signature)
            front.append(p)
    return sorted(front, key=lambda p: tuple(p[k] for k in keys[::-1]))


def choose(points: list[dict], constraints: dict, objectives: list[str]) -> tuple[dict | None, str]:
    """The best feasible point — the smallest target ratio (latency unless told), then the smallest drop —
    or, when none is feasible, the one that misses the constraints least (``(point, reason)``)."""
    key = TARGET_KEYS.get(constraints.get("target") or "", None)
    if key is None:
        key = next((OBJECTIVE_KEYS[o] for o in objectives if o != "score"), "latency_ratio")
    feasible = [p for p in points if p["feasible"]]
    if feasible:
        best = min(feasible, key=lambda p: (p[key], p["drop"]))
        return best, f"feasible, smallest {key.replace('_', ' ')} ({best[key]:.4f}), then smallest drop"
    if not points:
        return None, "no trial completed"
    limits = [constraints.get("max_drop"), constraints.get("budget")]
    limits = [abs(v) if v else 1.0 for v in limits if v is not None]

    def violation(p: dict) -> float:
        return sum(max(0.0, e) / (limit or 1.0) for e, limit in zip(p["constraint_excess"], limits))

    closest = min(points, key=lambda p: (violation(p), p[key]))
    return closest, "no point meets the constraints: the one that misses them least (relative excess)"


def hypervolume(points: list[dict], objectives: list[str], reference: list[float]) -> float:
    """The volume the points dominate up to ``reference`` (all objectives minimised), via Optuna's exact WFG."""
    from optuna._hypervolume import compute_hypervolume

    keys = [OBJECTIVE_KEYS[o] for o in objectives]
    values = np.array([[p[k] for k in keys] for p in points], dtype=float).reshape(-1, len(keys))
    if not len(values):
        return 0.0
    values = np.minimum(values, np.array(reference))  # points beyond the reference add nothing
    return float(compute_hypervolume(values, np.array(reference, dtype=float)))


def default_reference(objectives: list[str], constraints: dict) -> list[float]:
    """The hypervolume's reference point: the baseline's cost (1.0) and the allowed drop (or 0.05)."""
    drop = constraints.get("max_drop")
    return [max(drop, 1e-4) * 2 if (o == "score" and drop is not None) else (0.05 if o == "score" else 1.0)
            for o in objectives]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of two equally long lists (None with fewer than 3 pairs or no variation)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    value = spearmanr(a, b).statistic
    return None if math.isnan(value) else round(float(value), 4)


def proxy_quality(points: list[dict], predictor) -> dict:
    """How well each proxy ranked the measured drops of the completed trials (Spearman), and which did best."""
    drops = [p["drop"] for p in points]
    result = {"trials": len(points)}
    for kind in ("loss", "sqnr"):
        predicted = [predictor.proxy(p["params"], kind) for p in points]
        usable = [(x, y) for x, y in zip(predicted, drops) if math.isfinite(x)]
        result[kind] = spearman([x for x, _ in usable], [y for _, y in usable])
    latency = [predictor.predict(p["params"])["latency"] for p in points]
    result["latency"] = spearman(latency, [p["latency_ratio"] for p in points])
    scores = {k: result[k] for k in ("loss", "sqnr") if result[k] is not None}
    result["better"] = max(scores, key=scores.get) if scores else None
    return result
