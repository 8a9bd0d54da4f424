"""The benchmarks' one JSON layout, one flag vocabulary and the markdown renderer (no benchmark is run here)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402
import render  # noqa: E402

SCRIPTS = ("auto", "compact", "deep_compression", "demo", "embeddings", "fidelity_floor", "fuzz", "llm",
           "profile_models", "pruning_coverage", "pruning_vs_torch_pruning", "quantization", "recovery",
           "weight_only_linear")


def _payload(**changes) -> dict:
    payload = {
        "benchmark": "demo", "date": "2026-12-07T10:00:00+00:00",
        "environment": {"cpu": "Intel Test CPU", "isa_flags": ["amx_int8", "avx2", "avx512_vnni", "avx512f"],
                        "threads": 2, "torch": "2.14.1", "torchslim": "0.1.0", "cpus": 2,
                        "load_average": {"start": [0.5, 0.4, 0.3], "end": [3.25, 1.0, 0.5]}},
        "args": {"json": "out.json", "threads": 2, "seed": 0, "quick": True, "parts": ["a", "b"]},
        "rows": [{"part": "stages", "stage": "baseline", "latency_ms": 392.0, "speedup": 1.0},
                 {"part": "stages", "stage": "int8", "latency_ms": 29.5, "speedup": 13.29},
                 {"part": "reference", "stage": "fp32 onnxruntime", "latency_ms": 47.25}],
        "goals": [{"goal": "accuracy drop (points)", "value": 0.37, "target": "<= 0.5", "met": True},
                  {"goal": "wall time (s)", "value": 301.0, "target": "< 300", "met": False}],
    }
    payload.update(changes)
    return payload


# ---------------------------------------------------------------------------------------------------- the writer
def test_results_have_the_layout_with_flat_rows():
    args = argparse.Namespace(json=None, threads=2, seed=7, parts=["digits"])
    goals = [_common.goal("speed-up (x)", 13.3, ">= 2", True)]
    rows = [{"name": "int8", "ratios": {"speedup_batch": 13.3, "size": {"raw": 11.0}}, "spread": (1.0, 2.5)}]
    payload = _common.results("demo", args, rows, goals, {"seconds": 71.0}, threads=2)

    assert list(payload) == ["benchmark", "date", "environment", "args", "rows", "goals", "details"]
    assert payload["benchmark"] == "demo"
    date = datetime.fromisoformat(payload["date"])
    assert date.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - date) < timedelta(minutes=5)
    env = payload["environment"]
    assert env["threads"] == 2
    assert {"cpu", "isa_flags", "python", "torch", "torchslim", "os"} <= set(env)
    assert env["cpus"] == os.cpu_count()
    assert env["load_average"]["start"] == _common.LOAD_AT_START
    assert len(env["load_average"]["end"]) == 3 and all(value >= 0 for value in env["load_average"]["end"])
    assert payload["args"] == {"json": None, "threads": 2, "seed": 7, "parts": ["digits"]}
    assert payload["rows"] == [{"name": "int8", "ratios.speedup_batch": 13.3, "ratios.size.raw": 11.0,
                                "spread": [1.0, 2.5]}]
    assert payload["goals"] == [{"goal": "speed-up (x)", "value": 13.3, "target": ">= 2", "met": True}]
    assert payload["details"] == {"seconds": 71.0}
    assert _common.layout_problems(json.loads(json.dumps(payload))) == []


def test_write_results_writes_the_file_whole(tmp_path, capsys):
    path = tmp_path / "results" / "demo.json"
    args = argparse.Namespace(json=str(path), threads=1)
    payload = _common.write_results(args, [{"row": "fp32", "ms": 1.5}], [], benchmark="fuzz", threads=1)
    assert json.loads(path.read_text()) == payload
    assert payload["benchmark"] == "fuzz" and "details" not in payload
    assert sorted(p.name for p in path.parent.iterdir()) == ["demo.json"]  # no .partial left behind
    assert capsys.readouterr().out.strip().endswith(f"wrote {path}")


def test_results_refuse_a_row_that_stays_nested():
    args = argparse.Namespace(json=None, threads=1)
    with pytest.raises(ValueError, match=r"rows\[0\]\['layers'\] is nested"):
        _common.results("llm", args, [{"row": "fp32", "layers": [{"name": "fc"}]}], [], threads=1)


def test_layout_problems_name_what_is_wrong():
    assert _common.layout_problems(_payload()) == []
    assert _common.layout_problems([]) == ["not a JSON object"]
    broken = _payload(date="yesterday", extra=1)
    del broken["goals"]
    assert _common.layout_problems(broken) == ["missing 'goals'", "unknown key 'extra'"]
    assert _common.layout_problems(_payload(date="yesterday")) == ["'date' is not an ISO date: 'yesterday'"]
    assert _common.layout_problems(_payload(goals=[{"goal": "g", "value": 1, "met": "yes"}])) == [
        "goals[0] is not {goal, value, target, met} with a boolean 'met'"]
    assert _common.layout_problems(_payload(rows=[{"a": {"b": 1}}, 3])) == ["rows[0]['a'] is nested",
                                                                            "rows[1] is not an object"]


# ---------------------------------------------------------------------------------------------------- the flags
def test_parser_has_the_shared_flags_and_their_defaults():
    p = _common.parser("x", threads=1, seed=3, parts=("digits", "minilm"))
    args = p.parse_args([])
    assert vars(args) == {"json": None, "threads": 1, "seed": 3, "parts": ["digits", "minilm"]}
    args = p.parse_args(["--json", "a.json", "--threads", "0", "--seed", "5", "--parts", "minilm"])
    assert vars(args) == {"json": "a.json", "threads": 0, "seed": 5, "parts": ["minilm"]}
    assert vars(_common.parser("y", threads=None).parse_args([])) == {"json": None, "threads": None}


def test_a_bad_flag_is_one_line_and_exit_2(capsys):
    p = _common.parser("x", parts=("digits", "minilm"))
    with pytest.raises(SystemExit) as exit_info:
        p.parse_args(["--parts", "digits,lite0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "argument --parts: unknown part lite0 (choose from digits, minilm)" in err


def test_a_deprecated_alias_sets_the_new_flag_and_says_so(capsys):
    p = _common.parser("x")
    p.add_argument("--rows", type=_common.comma_list(), default=[])
    _common.deprecated_alias(p, "--only", "--rows", type=_common.comma_list())
    assert p.parse_args(["--only", "a,b"]).rows == ["a", "b"]
    assert capsys.readouterr().err == "note: --only is deprecated, use --rows\n"
    assert p.parse_args([]).rows == []
    assert "--only" not in p.format_help()


# ---------------------------------------------------------------------------------------------------- the renderer
def test_cells_format_numbers_for_reading():
    assert render.cell(392242) == "392,242"
    assert render.cell(4297) == "4,297"
    assert render.cell(256) == "256"
    assert render.cell(0.996312) == "0.9963"
    assert render.cell(4105.25) == "4,105.2"
    assert render.cell(None) == "—"
    assert render.cell(True) == "yes"
    assert render.cell([1.0, 2.5]) == "1, 2.5"
    assert render.cell("a|b") == "a\\|b"


def test_isa_summary_groups_the_flags():
    assert render.isa_summary(["amx_int8", "amx_tile", "avx2", "avx512_vnni", "avx512bw", "avx512f",
                               "avx_vnni"]) == "AVX2, AVX-VNNI, AVX-512 F/BW/VNNI, AMX INT8/TILE"
    assert render.isa_summary(["avx2"]) == "AVX2"
    assert render.isa_summary([]) == "no AVX2/AVX-512/AMX"


def test_render_heads_each_table_with_benchmark_date_and_machine():
    page = render.render([("bench-results/demo.json", _payload())])
    assert page.startswith("# Benchmark results\n")
    assert "## demo\n" in page
    assert ("**2026-12-07 10:00 UTC** · Intel Test CPU · AVX2, AVX-512 F/VNNI, AMX INT8 · 2 threads · torch 2.14.1"
            " · torchslim 0.1.0 · load 0.5 → 3.25 on 2 CPUs (start → end)\n") in page
    assert "`python benchmarks/demo.py --threads 2 --seed 0 --quick --parts a,b` (from `bench-results/demo.json`)" \
        in page
    assert "### demo: stages\n\n| stage | latency_ms | speedup |\n|---|---|---|\n" in page
    assert "| int8 | 29.5 | 13.29 |" in page
    assert "### demo: reference\n\n| stage | latency_ms |\n|---|---|\n| fp32 onnxruntime | 47.25 |" in page
    assert "| accuracy drop (points) | 0.37 | <= 0.5 | met |" in page
    assert "| wall time (s) | 301 | < 300 | **missed** |" in page


def test_render_columns_picks_and_orders_them():
    page = render.render([("r.json", _payload(rows=[{"stage": "int8", "latency_ms": 29.5, "speedup": 13.29}]))],
                         columns=["speedup", "stage"])
    assert "| speedup | stage |\n|---|---|\n| 13.29 | int8 |" in page


def test_render_main_writes_the_page_and_refuses_a_file_not_in_the_layout(tmp_path, capsys):
    good, bad, out = tmp_path / "demo.json", tmp_path / "old.json", tmp_path / "results.md"
    good.write_text(json.dumps(_payload()))
    render.main([str(good), "--out", str(out)])
    assert "| int8 | 29.5 | 13.29 |" in out.read_text()
    bad.write_text(json.dumps({"benchmark": "demo", "models": []}))
    with pytest.raises(SystemExit) as exit_info:
        render.main([str(good), str(bad)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"render.py: {bad}: not a benchmark JSON file (missing 'date'; "
                                       "missing 'environment'; missing 'args')\n")


# ---------------------------------------------------------------------------------------------------- the scripts
def _script(name: str) -> ast.Module:
    return ast.parse((BENCHMARKS / f"{name}.py").read_text())


def _calls(tree: ast.Module, name: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == name]


def test_the_benchmark_scripts_are_the_known_ones():
    found = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.stem.startswith("_") and p.stem != "render")
    assert found == sorted(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_uses_the_shared_parser_and_writer(name):
    tree = _script(name)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "_common"
                for alias in node.names}
    assert {"parser", "write_results"} <= imported
    assert len(_calls(tree, "parser")) == 1
    assert len(_calls(tree, "write_results")) == 1
    assert _calls(tree, "ArgumentParser") == [] and _calls(tree, "write_json") == []
    own_flags = {arg.value for call in _calls(tree, "add_argument") for arg in call.args[:1]
                 if isinstance(arg, ast.Constant)}
    assert own_flags.isdisjoint({"--json", "--threads", "--seed", "--parts"})  # those come from parser()


def _parser_keywords(name: str) -> dict:
    (call,) = _calls(_script(name), "parser")
    return {keyword.arg: keyword.value for keyword in call.keywords}


def test_which_scripts_take_seed_and_parts():
    seeded = sorted(name for name in SCRIPTS if "seed" in _parser_keywords(name))
    assert seeded == sorted(set(SCRIPTS) - {"deep_compression", "profile_models"})  # deep_compression: --seeds
    with_parts = sorted(name for name in SCRIPTS if "parts" in _parser_keywords(name))
    assert with_parts == ["auto", "compact", "fuzz", "pruning_coverage", "pruning_vs_torch_pruning", "recovery"]


def test_thread_defaults_are_what_each_script_used_before():
    defaults = {name: ast.literal_eval(_parser_keywords(name).get("threads", ast.Constant(0))) for name in SCRIPTS}
    assert defaults == {"auto": 0, "compact": None, "deep_compression": 0, "demo": 0, "embeddings": 1,
                        "fidelity_floor": 0, "fuzz": None,
                        "llm": 2, "profile_models": 0, "pruning_coverage": None, "pruning_vs_torch_pruning": 0,
                        "quantization": 0, "recovery": None, "weight_only_linear": 2}


def test_auto_results_become_flat_rows_per_part():
    import auto  # imports nothing heavy at module level: its parts run in subprocesses

    final = {"speedup_batch": 13.3, "speedup_bs1": 14.0, "score": 0.9926, "score_delta": -0.0037,
             "runtime": "onnxruntime", "latency_ms_batch": 29.5, "size_reduction": 13.3}
    results = {
        "digits": {"demo": final, "auto": {**final, "speedup_batch": 18.0}, "seconds": 900.0,
                   "repro": {"again": {**final, "speedup_batch": 17.5}}, "goals": []},
        "lite0": {"error": "Traceback ...\nMemoryError"},
        "minilm": {"best": None, "seconds": 50.0, "goals": [],
                   "fastest_feasible": {"trial": 3, "latency_ratio": 0.25, "recipe": "t3.yaml", "figures": {"a": 1}}},
        "quality": {"runs": {"tpe": [{"seed": 0, "hypervolume": 0.5}], "random": [{"seed": 0, "hypervolume": 0.4}]}},
    }
    rows = auto.rows_of(results)
    assert [(r["part"], r.get("row", r.get("sampler"))) for r in rows] == [
        ("digits", "demo recipe"), ("digits", "auto best"), ("digits", "auto best, rerun"), ("lite0", None),
        ("minilm", "fastest feasible point"), ("quality", "tpe"), ("quality", "random")]
    assert rows[1]["speedup_batch"] == 18.0 and rows[1]["seconds"] == 900.0
    assert rows[3] == {"part": "lite0", "error": "Traceback ...\nMemoryError"}
    assert rows[4] == {"part": "minilm", "row": "fastest feasible point", "trial": 3,
                       "latency_ratio": 0.25, "recipe": "t3.yaml"}
    assert _common.layout_problems(_payload(rows=rows)) == []
