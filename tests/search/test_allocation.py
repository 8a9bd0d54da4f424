"""Proxy predictions and the Lagrangian allocation, on a hand-made sensitivity result; the front's helpers."""

from __future__ import annotations

import math

import pytest

from torchslim.search.allocation import Predictor, allocate, cheapest
from torchslim.search.front import choose, hypervolume, pareto_front, spearman
from torchslim.search.space import Decision, SearchSpace


def _space() -> SearchSpace:
    return SearchSpace([Decision("prune:a", "prune", (0.0, 0.5), ("a",), 0.0, 100),
                        Decision("prune:b", "prune", (0.0, 0.5), ("b",), 0.0, 100),
                        Decision("precision", "precision", ("float", "int8-static"), (), "float", 200)])


def _sensitivity() -> dict:
    # Two layers of 10 ms each and 2 ms elsewhere; pruning group a halves layer a (and the layer reading it,
    # b, by its input side), group b halves layer b. Group a is the costlier one to prune.
    return {"leaves": {"a": {"ms": 10.0, "work": 1000.0, "params": 100},
                       "b": {"ms": 10.0, "work": 1000.0, "params": 100}},
            "total_ms": 22.0, "other_ms": 2.0,
            "options": {"prune:a": {"0.5": {"loss": 0.4, "sqnr": 10.0, "scale": {"a": 0.5, "b": 0.5},
                                            "params_scale": {"a": 0.5, "b": 0.5}}},
                        "prune:b": {"0.5": {"loss": 0.1, "sqnr": 20.0, "scale": {"b": 0.5},
                                            "params_scale": {"b": 0.5}}}},
            "precision": {"int8-static": {"loss": 0.05, "sqnr": 30.0, "latency_ratio": 0.5, "size_ratio": 0.25}},
            "float_layers": {}}


def test_predicted_costs_multiply_the_ratios_of_both_groups_and_losses_add():
    predictor = Predictor(_space(), _sensitivity())
    both = predictor.predict({"prune:a": 0.5, "prune:b": 0.5, "precision": "float"})
    assert both["latency"] == pytest.approx((2 + 10 * 0.5 + 10 * 0.25) / 22)  # layer b: 0.5 x 0.5
    assert both["loss"] == pytest.approx(0.5)
    assert both["noise"] == pytest.approx(10 ** -1 + 10 ** -2)
    quantized = predictor.predict({"prune:a": 0.0, "prune:b": 0.5, "precision": "int8-static"})
    assert quantized["latency"] == pytest.approx((2 + 10 + 5) / 22 * 0.5)
    assert quantized["size"] == pytest.approx(150 / 200 * 0.25) and quantized["loss"] == pytest.approx(0.15)


def test_allocation_within_a_budget_takes_the_plan_that_loses_least():
    plans = allocate(_space(), _sensitivity(), "latency", budget=0.45, count=2)
    # Within 0.45: pruning b alone and quantizing (17/22 x 0.5 = 0.386, loss 0.15) beats pruning a (loss 0.45+).
    assert plans[0] == {"prune:a": 0.0, "prune:b": 0.5, "precision": "int8-static"}
    assert len(plans) == 2 and plans[1] != plans[0]
    assert cheapest(_space(), _sensitivity(), "latency") == pytest.approx((2 + 5 + 2.5) / 22 * 0.5)


def test_allocation_without_a_budget_spreads_plans_along_the_predicted_front():
    predictor = Predictor(_space(), _sensitivity())
    plans = allocate(_space(), _sensitivity(), "latency", budget=None, count=3)
    costs = [predictor.predict(p)["latency"] for p in plans]
    assert len(plans) == 3 and costs == sorted(costs, reverse=True)  # from mild to strong compression


def _point(trial, drop, latency, size, excess):
    return {"trial": trial, "drop": drop, "latency_ratio": latency, "size_ratio": size,
            "constraint_excess": excess, "feasible": all(e <= 0 for e in excess)}


def test_front_choice_and_hypervolume():
    points = [_point(0, 0.0, 0.5, 0.5, [-0.005]), _point(1, 0.01, 0.2, 0.3, [0.005]),
              _point(2, 0.0, 0.6, 0.6, [-0.005]), _point(3, 0.002, 0.3, 0.4, [-0.003])]
    front = pareto_front(points, ["score", "latency", "size"])
    assert sorted(p["trial"] for p in front) == [0, 1, 3]  # 2 is dominated by 0
    chosen, reason = choose(points, {"max_drop": 0.005, "target": "latency", "budget": None}, ["score", "latency"])
    assert chosen["trial"] == 3 and reason.startswith("feasible")
    none_ok = [dict(p, feasible=False, constraint_excess=[p["drop"] + 0.001]) for p in points]
    closest, reason = choose(none_ok, {"max_drop": 0.005, "target": None, "budget": None}, ["score", "latency"])
    assert closest["trial"] in (0, 2) and reason.startswith("no point meets")
    square = [_point(0, 0.0, 0.5, 0.5, [])]
    assert hypervolume(square, ["latency", "size"], [1.0, 1.0]) == pytest.approx(0.25)
    assert hypervolume(square + [_point(1, 0, 0.25, 0.75, [])], ["latency", "size"], [1, 1]) == pytest.approx(0.3125)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    assert not math.isnan(spearman([1, 2, 3, 4], [1, 3, 2, 4]))


def test_each_precision_alone_is_a_plan_ordered_by_predicted_loss():
    from torchslim.search.allocation import precision_plans

    space = SearchSpace([Decision("prune:a", "prune", (0.0, 0.5), ("a",), 0.0, 100),
                         Decision("precision", "precision", ("float", "int8-static", "bf16"), (), "float", 200)])
    sensitivity = {**_sensitivity(), "precision": {
        "int8-static": {"loss": 0.05, "sqnr": 30.0, "latency_ratio": 0.5, "size_ratio": 0.25},
        "bf16": {"loss": 0.001, "sqnr": 50.0, "latency_ratio": 0.4, "size_ratio": 0.5}}}
    plans = precision_plans(space, sensitivity)
    assert plans == [{"prune:a": 0.0, "precision": "bf16"}, {"prune:a": 0.0, "precision": "int8-static"}]
