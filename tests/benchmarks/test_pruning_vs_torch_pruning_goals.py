"""The goal lines of benchmarks/pruning_vs_torch_pruning.py, judged on made-up rows (no model is timed here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import pruning_vs_torch_pruning as bench  # noqa: E402


def _rows(model: str, speedups: dict[str, tuple[float, float]]) -> list[dict]:
    return [{"model": model, "tool": tool, "speedup_bs1": bs1, "speedup_batch": batch,
             "latency_ms_bs1": 10.0 / bs1, "latency_ms_batch": 100.0 / batch}
            for tool, (bs1, batch) in speedups.items()]


def test_goal_tool_prefers_auto_and_its_batch_table():
    pair = {name: {} for name in ("unpruned", "torchslim", "torchslim round_to=auto",
                                  "torchslim round_to=auto (table at batch 32)", "torch-pruning")}
    assert bench.goal_tool(pair, False, 32) == "torchslim round_to=auto"
    assert bench.goal_tool(pair, True, 32) == "torchslim round_to=auto (table at batch 32)"
    assert bench.goal_tool({"torchslim": {}}, True, 32) == "torchslim"
    assert bench.goal_tool({"torch-pruning": {}}, False, 32) is None


def test_latency_goals_cover_every_row_the_geometric_mean_and_resnet50():
    rows = (_rows("resnet50", {"unpruned": (1, 1), "torchslim round_to=auto": (1.5, 1.9),
                               "torch-pruning": (1.2, 1.8)})
            + _rows("mobilenet_v2", {"unpruned": (1, 1), "torchslim round_to=auto": (1.1, 1.5),
                                     "torch-pruning": (0.9, 1.5)})
            + _rows("regnet_x_400mf", {"unpruned": (1, 1), "torchslim round_to=auto": (0.95, 1.4),
                                       "torch-pruning": (1.0, 1.2)}))
    goals = {g["goal"]: g for g in bench.latency_goals(rows, ["resnet50", "mobilenet_v2", "regnet_x_400mf"], 0.5, 32)}
    resnet = goals["resnet50 at 50% MACs, batch 32 speed-up, torchslim round_to=auto (x)"]
    assert (resnet["value"], resnet["met"]) == (1.9, True)
    per_row = [g for name, g in goals.items() if ": torchslim round_to=auto speed-up / torch-pruning's" in name]
    assert len(per_row) == 6
    assert [g["met"] for g in per_row] == [True, True, True, True, False, True]
    mean = goals["geometric mean over 6 rows: torchslim speed-up / torch-pruning's"]
    ratios = [1.5 / 1.2, 1.9 / 1.8, 1.1 / 0.9, 1.0, 0.95, 1.4 / 1.2]
    product = 1.0
    for ratio in ratios:
        product *= ratio
    assert mean["value"] == pytest.approx(product ** (1 / 6), abs=1e-3) == pytest.approx(1.102, abs=1e-3)
    assert mean["met"] is False
    slow = goals["regnet_x_400mf torchslim round_to=auto: batch-1 speed-up over unpruned (x)"]
    assert (slow["value"], slow["met"]) == (0.95, False)


def test_latency_goals_without_torch_pruning_judge_only_torchslim():
    rows = _rows("resnet50", {"unpruned": (1, 1), "torchslim": (1.4, 1.7)})
    goals = bench.latency_goals(rows, ["resnet50"], 0.5, 32)
    assert [(g["goal"], g["met"]) for g in goals] == [
        ("resnet50 at 50% MACs, batch 32 speed-up, torchslim (x)", False),
        ("resnet50 torchslim: batch-1 speed-up over unpruned (x)", True)]
