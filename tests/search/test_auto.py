"""`torchslim.auto` end to end on the tiny model and a tiny space: the output folder, the report's search
section, runnable front recipes, best/ reproduced by compress, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import yaml

from torchslim import cli
from torchslim.errors import InputError
from torchslim.pipeline import compress
from torchslim.recipe import load_recipe
from torchslim.search import auto

TINY_SEARCH = {
    "model": "builtin:tiny-test-cnn", "data": "builtin:digits", "seed": 0,
    "measure": {"batch_size": 16, "warmup": 1, "repeats": 2, "max_eval_samples": 64, "threads": 1},
    "search": {"space": {"ratios": [0.0, 0.5], "precision": ["float"], "epochs": [1], "round_to": 1},
               "finetune": {"epochs": 1, "batch_size": 128, "optimizer": {"name": "adamw", "lr": 0.003}},
               "constraints": {"max_drop": 0.5}, "trials": 3, "repeats": 2,
               "sensitivity": {"calibration": {"samples": 32}, "plans": 1}},
}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "out"
    report = auto(recipe=TINY_SEARCH, out=out, log=lambda message: None)
    return out, report


def test_the_output_folder_holds_the_front_recipes_and_best(searched):
    out, report = searched
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"report.json", "report.md", "report.html", "front.json", "trials.json", "sensitivity.json", "recipe.yaml",
            "study.journal", "best/report.json", "best/report.html", "best/model.safetensors"} <= files
    page = (out / "report.html").read_text()
    assert '"name": "Pareto front"' in page and "fig-search-latency" in page and "fig-sensitivity" in page
    assert not out.with_name("out.search").exists()  # the work folder goes once the results are written
    section = json.loads((out / "report.json").read_text())["search"]
    assert section["schema"] == "torchslim.search/1" and section["trials"]["complete"] == 3
    assert section["constraints"] == [{"name": "max_drop", "objective": "score", "key": "drop", "limit": 0.5,
                                       "relative": False, "metric": "accuracy"}]
    assert section["feasible"] and section["chosen"]["best"] == "best"
    assert section["trials"]["first_feasible"] == 0 and section["proxy"]["enqueued"] == 1
    for point in section["front"]:
        assert (out / point["recipe"]).is_file()
        assert {"drop", "latency_ms_batch", "latency_ratio", "size_bytes", "size_ratio", "macs"} <= set(point)
    assert "one worker at a time" in section["latency_note"]
    assert report["stages"][0]["name"] == "baseline" and report["search"] == section


def test_the_best_recipe_reproduces_best_with_compress(searched, tmp_path):
    out, report = searched
    chosen = report["search"]["chosen"]
    recipe = load_recipe(out / chosen["recipe"])
    again = compress(recipe, tmp_path / "again", progress=False, log=lambda message: None)
    best = json.loads((out / "best" / "report.json").read_text())
    assert again["stages"][-1]["score"] == pytest.approx(best["stages"][-1]["score"], abs=0.005)
    kinds = [next(iter(step)) for step in yaml.safe_load((out / chosen["recipe"]).read_text())["steps"]]
    assert kinds == [next(iter(step)) for step in best["recipe"]["steps"]]  # best/ ran exactly that recipe


def test_a_time_budget_spent_by_the_sensitivity_pass_says_so(tmp_path):
    recipe = {**TINY_SEARCH, "search": {**TINY_SEARCH["search"], "time_budget": 0.001}}
    report = auto(recipe=recipe, out=tmp_path / "out", log=lambda message: None)
    section = report["search"]
    assert section["trials"]["complete"] == 0 and section["trials"]["seconds"] == 0.0
    assert section["message"].startswith("no trial ran: the sensitivity pass took")
    assert "raise search.time_budget" in section["message"] and not section["feasible"]


def test_an_unreachable_budget_stops_before_any_trial_and_leaves_nothing(tmp_path):
    raw = {**TINY_SEARCH, "search": {**TINY_SEARCH["search"],
                                     "constraints": {"target": "macs", "budget": 0.01}}}
    with pytest.raises(InputError, match="search.constraints.budget: 0.01 of the baseline's macs is out of reach"):
        auto(recipe=raw, out=tmp_path / "out", log=lambda message: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("storage, message", [
    ("sqlite:////nonexistent/folder/study.db", "--storage sqlite:////nonexistent/folder/study.db: cannot open"),
    ("postgresql://user:secret@127.0.0.1:1/db", "--storage postgresql://user:***@127.0.0.1:1/db: "),
    ("/nonexistent/folder/journal.log", "--storage /nonexistent/folder/journal.log: folder /nonexistent/folder"),
])
def test_a_storage_that_cannot_be_reached_is_one_line_and_exit_2(tmp_path, capsys, storage, message):
    code = cli.main(["auto", "builtin:tiny-test-cnn", "builtin:digits", "--out", str(tmp_path / "out"),
                     "--max-drop", "0.01", "--storage", storage, "--quiet"])
    error = capsys.readouterr().err
    assert code == 2 and message in error and "secret" not in error and len(error.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_missing_runtime_constraints_and_arguments_are_input_errors(tmp_path, capsys, monkeypatch):
    from torchslim.quant import onnx_backend

    monkeypatch.setattr(onnx_backend, "available", lambda: "ONNX Runtime is not installed (pip install x)")
    assert cli.main(["auto", "builtin:tiny-test-cnn", "builtin:digits", "--runtime", "onnxruntime",
                     "--max-drop", "0.01", "--out", str(tmp_path / "a")]) == 2
    assert "search.runtime: onnxruntime: ONNX Runtime is not installed" in capsys.readouterr().err
    assert cli.main(["auto", "builtin:tiny-test-cnn", "builtin:digits", "--out", str(tmp_path / "b")]) == 2
    assert "give max_drop (--max-drop) and/or a budget (--budget)" in capsys.readouterr().err
    assert cli.main(["auto", "builtin:tiny-test-cnn", "builtin:digits", "--budget", "2", "--out",
                     str(tmp_path / "c")]) == 2
    assert "search.constraints.budget: must be a fraction of the baseline in (0, 1]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
