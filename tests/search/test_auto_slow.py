"""A real search on builtin:digits-cnn (slow: minutes): the proxy's first plans meet the constraints and best/
is faster than the baseline at the allowed drop. The goals' full runs are in benchmarks/auto.py."""

from __future__ import annotations

import pytest

from torchslim.search import auto


@pytest.mark.slow
def test_a_digits_search_finds_a_feasible_faster_point_early(tmp_path):
    recipe = {"model": "builtin:digits-cnn", "data": "builtin:digits", "measure": {"batch_size": 256},
              "search": {"space": {"epochs": [8]}, "trials": 6, "sensitivity": {"plans": 3}}}
    report = auto(recipe=recipe, out=tmp_path / "out", max_drop=0.005, target="latency", log=lambda message: None)
    search = report["search"]
    assert search["feasible"] and search["trials"]["first_feasible"] is not None
    assert search["trials"]["first_feasible"] < 6
    final = report["stages"][-1]
    assert final["ratios"]["speedup_batch"] > 2.0
    assert final["ratios"]["score_delta"] >= -0.01  # within a point on the test split
    assert search["proxy"]["enqueued"] == 3
