"""First plans from the proxy: predict a plan's loss and cost from the sensitivity pass, and allocate options
per budget by a Lagrangian sweep (each decision takes the option minimising ``loss + lambda * cost``).

Predictions: the loss of a plan is the sum of its options' losses (ModelOpt's additive assumption; noise
powers add for SQNR); its cost multiplies each leaf layer's measured time (or parameters, or MACs) by the work
ratios its options cause — pruning a group scales the layers on both sides of it, so the ratios of two groups
multiply — and by the precision's measured factor.
"""

from __future__ import annotations

import math

import numpy as np

from torchslim.search.space import EPOCHS, FLOAT, PRECISION, PRUNE, RANK, SearchSpace


class Predictor:
    """Predicted loss, SQNR noise and cost ratios (latency, size, macs) of plans, from a sensitivity result."""

    def __init__(self, space: SearchSpace, sensitivity: dict):
        self.space, self.sensitivity = space, sensitivity
        self.leaves = sensitivity["leaves"]
        self.total_ms = sensitivity["total_ms"] or 1e-9
        self.total_params = sum(v["params"] for v in self.leaves.values()) or 1
        self.total_macs = sum(v["work"] for v in self.leaves.values() if v["ms"] >= 0 and v["work"]) or 1

    def option(self, decision: str, value) -> dict | None:
        """The sensitivity entry of one option (None when it was not measured or failed)."""
        entry = self.sensitivity["options"].get(decision, {}).get(str(value))
        return None if entry is None or "error" in entry else entry

    def usable(self, decision: str, value) -> bool:
        d = self.space[decision]
        if value == d.neutral or d.kind == EPOCHS:
            return True
        if d.kind == PRECISION:
            entry = self.sensitivity["precision"].get(value)
            return entry is not None and "error" not in entry
        if d.kind == FLOAT:
            entry = self.sensitivity["float_layers"].get(d.layers[0])
            return entry is not None and "error" not in entry
        return self.option(decision, value) is not None

    def predict(self, plan: dict) -> dict:
        """``{"loss", "noise", "latency", "size", "macs"}`` of a complete plan (costs as baseline fractions)."""
        work, params = {}, {}
        loss = noise = 0.0
        for d in self.space.active(plan):
            value = plan.get(d.name, d.neutral)
            if d.kind not in (PRUNE, RANK) or value == d.neutral:
                continue
            entry = self.option(d.name, value)
            if entry is None:
                return {"loss": math.inf, "noise": math.inf, "latency": math.inf, "size": math.inf, "macs": math.inf}
            loss += entry["loss"]
            noise += 10 ** (-entry["sqnr"] / 10)
            for leaf, ratio in entry["scale"].items():
                work[leaf] = work.get(leaf, 1.0) * ratio
            for leaf, ratio in entry["params_scale"].items():
                params[leaf] = params.get(leaf, 1.0) * ratio
        time_ms = self.sensitivity["other_ms"] + sum(v["ms"] * work.get(k, 1.0) for k, v in self.leaves.items())
        kept_params = sum(v["params"] * params.get(k, 1.0) for k, v in self.leaves.items())
        macs = sum(v["work"] * work.get(k, 1.0) for k, v in self.leaves.items())
        latency, size = time_ms / self.total_ms, kept_params / self.total_params
        precision = plan.get(PRECISION, "float")
        if precision != "float":
            entry = self.sensitivity["precision"][precision]
            loss += entry["loss"]
            noise += 10 ** (-entry["sqnr"] / 10)
            base_latency = entry["latency_ratio"]
            for d in self.space.active(plan):
                if d.kind == FLOAT and plan.get(d.name):
                    layer = self.sensitivity["float_layers"][d.layers[0]]
                    loss += layer["loss"] - entry["loss"]  # keeping it float wins back this much
                    noise += max(0.0, 10 ** (-layer["sqnr"] / 10) - 10 ** (-entry["sqnr"] / 10))
                    base_latency += layer["latency_ratio"] - entry["latency_ratio"]
            latency *= base_latency
            size *= entry["size_ratio"]
        return {"loss": max(0.0, loss), "noise": noise, "latency": latency, "size": size,
                "macs": macs / self.total_macs}

    def proxy(self, plan: dict, kind: str) -> float:
        """The plan's predicted drop proxy: "loss", or "sqnr" (the predicted output SQNR's noise power)."""
        prediction = self.predict(plan)
        return prediction["loss"] if kind == "loss" else prediction["noise"]


def _sweep(space: SearchSpace, predictor: Predictor, base: dict, target: str, proxy: str) -> list[dict]:
    """Plans along the Lagrangian path for one precision: from no compression to the most compressing
    (``proxy``: "loss" or "noise", the prediction's key the losses come from)."""
    decisions = [d for d in space.active(base) if d.kind in (PRUNE, RANK, FLOAT)]
    neutral = predictor.predict(base)
    table = []  # per decision: [(option, loss delta, cost delta)]
    for d in decisions:
        rows = []
        for value in d.options:
            if not predictor.usable(d.name, value):
                continue
            trial = predictor.predict({**base, d.name: value})
            rows.append((value, trial[proxy] - neutral[proxy], trial[target] - neutral[target]))
        table.append((d, rows))
    losses = [abs(r[1]) for _, rows in table for r in rows if r[1]]
    costs = [abs(r[2]) for _, rows in table for r in rows if r[2]]
    if not losses or not costs:
        return [base]
    scale = float(np.median(losses)) / float(np.median(costs))
    plans = []
    for lam in np.logspace(-3, 3, 49) * scale:
        plan = dict(base)
        for d, rows in table:
            plan[d.name] = min(rows, key=lambda r: (r[1] + lam * r[2], r[1]))[0]
        plan = space.complete(plan)
        if plan not in plans:
            plans.append(plan)
    return plans


def allocate(space: SearchSpace, sensitivity: dict, target: str, budget: float | None, count: int,
             proxy: str = "loss") -> list[dict]:
    """Up to ``count`` first plans: for a budget, the plans predicted to lose least within it (one per
    precision first, then more compressing ones in case the prediction is optimistic); without one, plans
    spread from mild to strong compression along the predicted front. Epochs: the largest option.
    ``proxy``: what predicts the loss, "loss" or "sqnr"."""
    proxy = "noise" if proxy == "sqnr" else "loss"
    if count <= 0:
        return []
    predictor = Predictor(space, sensitivity)
    base = space.neutral_plan()
    if EPOCHS in space.names():
        base[EPOCHS] = max(space[EPOCHS].options)
    precisions = list(space[PRECISION].options) if PRECISION in space.names() else [None]
    candidates = []
    for precision in precisions:
        if precision is not None and not predictor.usable(PRECISION, precision):
            continue
        start = space.complete({**base, PRECISION: precision} if precision is not None else base)
        for plan in _sweep(space, predictor, start, target, proxy):
            prediction = predictor.predict(plan)
            if math.isfinite(prediction[target]):
                candidates.append((plan, prediction))
    candidates = [c for c in candidates if c[0] != space.complete(base) or len(candidates) == 1]
    front = _predicted_front(candidates, target, proxy)
    if budget is not None:
        within = sorted([c for c in front if c[1][target] <= budget], key=lambda c: c[1][proxy])
        beyond = sorted([c for c in front if c[1][target] > budget], key=lambda c: c[1][target])
        ordered = within[:1] + beyond[:1] + within[1:] + beyond[1:]
        ordered = within[:max(1, count - 1)] + [c for c in ordered if c not in within[:max(1, count - 1)]]
    else:
        front.sort(key=lambda c: c[1][target])
        picks = np.unique(np.linspace(0, len(front) - 1, min(count, len(front))).round().astype(int))
        ordered = [front[i] for i in reversed(picks)]
    return [plan for plan, _ in ordered[:count]]


def precision_plans(space: SearchSpace, sensitivity: dict) -> list[dict]:
    """One plan per usable precision other than float, with nothing else compressed, ordered by predicted loss.

    Under a drop limit these are the points most likely to be feasible (a quantized model without pruning), and
    the ones the Lagrangian sweep skips when pruning looks cheaper in the proxy than it is after recovery: on
    all-MiniLM-L6-v2 (cosine >= 0.99) 15 of 17 trials that pruned were infeasible. Enqueued before the allocated
    plans, they anchor the front in its feasible corner."""
    if PRECISION not in space.names():
        return []
    predictor = Predictor(space, sensitivity)
    neutral = space[PRECISION].neutral
    plans = [(space.complete({PRECISION: precision}), precision) for precision in space[PRECISION].options
             if precision != neutral and predictor.usable(PRECISION, precision)]
    plans.sort(key=lambda item: predictor.predict(item[0])["loss"])
    return [plan for plan, _ in plans]


def _predicted_front(candidates: list[tuple[dict, dict]], target: str, proxy: str) -> list[tuple[dict, dict]]:
    front = []
    for plan, p in candidates:
        dominated = any(q[proxy] <= p[proxy] and q[target] <= p[target] and (q[proxy], q[target]) !=
                        (p[proxy], p[target]) for _, q in candidates)
        if not dominated and all(plan != f[0] for f in front):
            front.append((plan, p))
    return front


def cheapest(space: SearchSpace, sensitivity: dict, target: str) -> float:
    """The smallest predicted ``target`` fraction any plan in the space reaches (for the budget check)."""
    predictor = Predictor(space, sensitivity)
    best = math.inf
    precisions = list(space[PRECISION].options) if PRECISION in space.names() else [None]
    for precision in precisions:
        if precision is not None and not predictor.usable(PRECISION, precision):
            continue
        plan = space.complete({PRECISION: precision} if precision is not None else {})
        for d in space.active(plan):
            if d.kind in (PRUNE, RANK):
                usable = [v for v in d.options if predictor.usable(d.name, v)]
                plan[d.name] = min(usable, key=lambda v: predictor.predict({**plan, d.name: v})[target])
        best = min(best, predictor.predict(plan)[target])
    return best
