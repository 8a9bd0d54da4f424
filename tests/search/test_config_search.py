"""The recipe's search: section: validation with the file and field named, round trip, durations, light import."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from torchslim.errors import InputError
from torchslim.recipe import parse_recipe
from torchslim.search.config import SearchConfig, parse_duration

BASE = {"model": "builtin:tiny-test-cnn", "data": "builtin:digits"}


def test_search_section_validates_and_round_trips():
    raw = {**BASE, "search": {"space": {"ratios": [0.0, 0.5], "epochs": [2, 4]}, "objectives": ["score", "latency"],
                              "constraints": {"max_drop": 0.005, "target": "latency", "budget": 0.25},
                              "time_budget": "30m", "trials": 12}}
    recipe = parse_recipe(raw, "r.yaml")
    assert isinstance(recipe.search, SearchConfig)
    assert recipe.search.seconds == 1800 and recipe.search.constraints.budget == 0.25
    again = parse_recipe(recipe.to_dict(), "again")
    assert again.search == recipe.search
    assert parse_recipe(BASE).search is None and "search" not in parse_recipe(BASE).to_dict()


@pytest.mark.parametrize("search, message", [
    ({"constraints": {"budget": 1.5, "target": "latency"}}, "r.yaml: search.constraints.budget: must be a fraction"),
    ({"constraints": {"budget": 0.5}}, "search.constraints.budget: needs a target"),
    ({"space": {"ratios": [1.0]}}, "search.space.ratios[0]: must be in [0, 1)"),
    ({"space": {"precision": ["int3"]}}, "search.space.precision[0]: expected one of float"),
    ({"objectives": ["speed"]}, "search.objectives[0]: expected one of score"),
    ({"time_budget": "soon"}, "search.time_budget: expected seconds or a duration"),
    ({"workers": 0}, "search.workers: must be in [1, 256]"),
    ({"colour": "red"}, "search.colour: unknown key"),
])
def test_bad_search_fields_name_the_file_and_field(search, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_recipe({**BASE, "search": search}, "r.yaml")


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("1.5h") == 5400 and parse_duration(12) == 12
    assert parse_duration("2m") == 120 and parse_duration("0") == 0


def test_import_torchslim_and_a_search_recipe_load_no_optuna():
    code = ("import sys, torchslim; from torchslim.recipe import parse_recipe; "
            "parse_recipe({'model': 'builtin:digits-cnn', 'data': 'builtin:digits', 'search': {}}); "
            "import torchslim.search; print('optuna' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_example_search_recipe_loads():
    from pathlib import Path

    from torchslim.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parents[2] / "examples" / "search" / "digits-cnn.yaml")
    assert not recipe.steps and recipe.search.constraints.max_drop == 0.005 and recipe.search.seconds == 1800
    assert recipe.search.finetune.optimizer.lr == 0.02 and recipe.measure.batch_size == 256
