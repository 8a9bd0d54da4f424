"""The commands that run nothing (--version, list, check, compress --dry-run, schema), -v/--quiet and the
multi-problem error format, each through the real entry point (a subprocess running ``python -m torchslim.cli``)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from torchslim.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = "model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - prune: {method: magnitude, sparsity: 0.5}\n"


def cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "torchslim.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=dict(os.environ), timeout=timeout)


def write(tmp_path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_version_prints_torchslim_and_torch_versions():
    import torch

    from torchslim import __version__

    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"torchslim {re.escape(__version__)} \(torch {re.escape(torch.__version__)}, "
                        rf"Python \d+\.\d+\.\d+\)\n", result.stdout), result.stdout


def test_list_methods_json_has_every_registered_method_with_its_fields_and_defaults():
    from torchslim.registry import list_methods

    result = cli("list", "methods", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [(m["kind"], m["method"]) for m in listed] == [(e.kind, e.name) for e in list_methods()]
    by_name = {(m["kind"], m["method"]): m for m in listed}
    magnitude = {f["name"]: f for f in by_name[("prune", "magnitude")]["fields"]}
    assert magnitude["scope"]["default"] == "global" and magnitude["scope"]["type"] == "'global' | 'local'"
    assert magnitude["sparsity"]["help"].startswith("fraction of the selected weights set to zero")
    assert by_name[("finetune", "distill")]["default"] is True and by_name[("prune", "magnitude")]["default"] is False
    for entry in list_methods():  # every field of every config is listed (the version stamp left out)
        names = [f.name for f in dataclasses.fields(entry.config_cls) if f.init and f.name != "version"]
        assert [f["name"] for f in by_name[(entry.kind, entry.name)]["fields"]] == names
        assert by_name[(entry.kind, entry.name)]["help"], entry.name


def test_list_methods_text_of_one_kind():
    result = cli("list", "methods", "--kind", "quantize")
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line and not line.startswith(" ")]
    assert headers == ["quantize: {method: auto}", "quantize: {method: bf16}", "quantize: {method: int4-weight}",
                       "quantize: {method: int8-dynamic}", "quantize: {method: int8-static}",
                       "quantize: {method: int8-weight}", "quantize: {method: qat}"]
    assert "    runtime: 'auto' | 'onnxruntime' | 'torchinductor' = auto" in result.stdout



def test_list_refuses_an_unknown_kind_with_did_you_mean(capsys):
    assert main(["list", "methods", "--kind", "quantise"]) == 2
    assert capsys.readouterr().err.strip() == (
        "torchslim: error: --kind: unknown step kind 'quantise', did you mean 'quantize'? (known: prune, factorize, "
        "share_weights, compress_embeddings, finetune, materialize, quantize)")
    assert main(["list", "models", "--kind", "prune"]) == 2
    assert "--kind: lists methods only" in capsys.readouterr().err


@pytest.mark.parametrize("what, prefixes, builtin", [
    ("models", ["builtin:", "file:", "hf:", "timm:", "torchvision:"], "builtin:digits-cnn"),
    ("data", ["builtin:", "csv:", "datasets:", "file:", "imagefolder:", "jsonl:", "parquet:", "text:"],
     "builtin:digits"),
])
def test_list_models_and_data_show_prefixes_and_builtins(what, prefixes, builtin, capsys):
    result = cli("list", what)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{'model' if what == 'models' else 'data'} spec prefixes:\n  builtin:  ")
    assert re.search(rf"^  {builtin} +\S", result.stdout, re.MULTILINE), result.stdout
    # a fresh process: tests running in this one register models and prefixes of their own
    result = cli("list", what, "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [p["prefix"] for p in listed["prefixes"]] == prefixes
    assert builtin in [b["name"] for b in listed["builtins"]]
    assert all(b["help"] for b in listed["builtins"])  # each with a line of help
    assert all(p["help"] for p in listed["prefixes"])


def test_check_prints_the_resolved_recipe_and_loads_nothing(tmp_path, capsys):
    from torchslim.recipe import load_recipe

    # a file: model that does not exist: check never imports or builds the model
    recipe = write(tmp_path, TINY.replace("builtin:digits-cnn", "file:absent.py:make") + "seed: 3\n")
    result = cli("check", recipe, "--set", "steps.0.prune.sparsity=0.7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved == load_recipe(recipe, ["steps.0.prune.sparsity=0.7"]).to_dict()
    assert resolved["steps"][0]["prune"] == {"method": "magnitude", "sparsity": 0.7, "scope": "global", "skip": [],
                                             "pattern": "unstructured", "version": 1}
    assert result.stderr.strip() == (f"torchslim: {recipe}: valid (file:absent.py:make on builtin:digits; "
                                     f"prune:magnitude)")
    assert main(["check", str(recipe), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and yaml.safe_load(quiet.out)["seed"] == 3


def test_check_reports_every_problem_at_once(tmp_path):
    recipe = write(tmp_path, "model: builtin:digits-cn\ndata: builtin:digits\nsteps:\n"
                             "  - prune: {method: magnitude, sparsty: 0.5}\n  - quantise: {}\n"
                             "measure: {batch_size: 0}\n")
    result = cli("check", recipe)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines[0] == f"torchslim: error: 4 problems in {recipe}:"
    assert lines[1].startswith("  model: unknown built-in model 'digits-cn', did you mean 'digits-cnn'? (known: ")
    assert lines[2].startswith("  steps[0].prune.sparsty: unknown key, did you mean 'sparsity'? (known: ")
    assert lines[3].startswith("  steps[1]: unknown step kind 'quantise', did you mean 'quantize'? (known: ")
    assert lines[4] == "  measure.batch_size: must be >= 1, got 0"
    assert len(lines) == 5


def test_one_problem_is_one_line(tmp_path, capsys):
    recipe = write(tmp_path, TINY.replace("magnitude", "magnitud"))
    assert main(["check", str(recipe)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"torchslim: error: {recipe}: steps[0].prune.method: unknown prune method 'magnitud', did you mean "
        f"'magnitude'? (known: channel, magnitude, sparsegpt, wanda)"]


def test_compress_dry_run_validates_and_writes_nothing(tmp_path, capsys):
    recipe = write(tmp_path, TINY)
    out = tmp_path / "out"
    result = cli("compress", recipe, "--out", out, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["steps"][0]["prune"]["sparsity"] == 0.5
    assert f"dry run: {recipe} is valid; it would write {out}" in result.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
    bad = write(tmp_path, TINY + "mesure: {}\n", "bad.yaml")
    assert main(["compress", str(bad), "--out", str(out), "--dry-run"]) == 2
    assert "mesure: unknown key, did you mean 'measure'?" in capsys.readouterr().err
    assert main(["compress", str(recipe), "--out", str(tmp_path), "--dry-run", "--overwrite"]) == 2
    assert "holds the recipe" in capsys.readouterr().err and not out.exists()  # the recipe's own folder


def test_verbose_adds_details_and_works_before_or_after_the_command(tmp_path, capsys):
    recipe = write(tmp_path, TINY)
    result = cli("-v", "check", recipe, "--no-plugins")
    assert result.returncode == 0, result.stderr
    assert "torchslim: plugins loaded: none" in result.stderr.splitlines()
    for args in (["check", str(recipe), "-v"], ["check", str(recipe), "--verbose"]):
        assert main([*args, "--no-plugins"]) == 0
        assert "torchslim: plugins loaded: none" in capsys.readouterr().err.splitlines()
    assert main(["check", str(recipe)]) == 0
    plain = capsys.readouterr().err
    assert "plugins loaded" not in plain and "valid" in plain
    assert main(["--quiet", "check", str(recipe)]) == 0 and capsys.readouterr().err == ""


def test_schema_matches_the_checked_in_copy_and_accepts_every_example():
    jsonschema = pytest.importorskip("jsonschema")
    result = cli("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    checked_in = json.loads((ROOT / "docs" / "recipe.schema.json").read_text())
    assert schema == checked_in, "docs/recipe.schema.json is stale: torchslim schema > docs/recipe.schema.json"
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    examples = sorted((ROOT / "examples").rglob("*.yaml"))
    assert len(examples) >= 20
    for path in examples:
        errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(
            yaml.safe_load(path.read_text()))]
        assert not errors, (path.name, errors)


def test_schema_refuses_what_the_recipe_loader_refuses():
    jsonschema = pytest.importorskip("jsonschema")
    from torchslim.defaults import DEMO_RECIPE
    from torchslim.recipe import parse_recipe
    from torchslim.schema import recipe_schema

    validator = jsonschema.Draft202012Validator(recipe_schema())
    demo = yaml.safe_load(DEMO_RECIPE)
    assert not list(validator.iter_errors(demo)) and not list(validator.iter_errors(parse_recipe(demo).to_dict()))
    bad = [
        {**demo, "colour": "red"},
        {**demo, "steps": [{"prune": {"method": "magnitude", "sparsty": 0.5}}]},
        {**demo, "steps": [{"prune": {"method": "nonsense"}}]},
        {**demo, "steps": [{"prune": {"sparsity": 0.5}}]},  # prune names its method
        {**demo, "steps": [{"squash": {}}]},
        {**demo, "steps": [{"finetune": {"epochs": "three"}}]},
        {**demo, "measure": {"batch_size": 1 << 20}},
        {**demo, "export": ["onnx", "pdf"]},
    ]
    for recipe in bad:
        assert list(validator.iter_errors(recipe)), recipe
    assert not list(validator.iter_errors({**demo, "steps": [{"finetune": None}, {"finetune": {"epochs": 2}}]}))


@pytest.mark.slow
def test_a_run_logs_progress_lines_details_with_v_and_nothing_with_quiet(tmp_path):
    recipe = write(tmp_path, "model: builtin:tiny-test-cnn\ndata: builtin:digits\nsteps:\n"
                             "  - prune: {method: magnitude, sparsity: 0.5}\n"
                             "measure: {batch_size: 16, warmup: 0, repeats: 1, max_eval_samples: 64}\n")
    plugin = Path(__file__).parent / "conftest.py"  # registers builtin:tiny-test-cnn
    runs = {flag: cli("compress", recipe, "--out", tmp_path / flag.strip("-"), "--import", plugin, flag)
            for flag in ("--verbose", "--quiet")}
    for result in runs.values():
        assert result.returncode == 0, result.stderr[-2000:]
        assert "1-prune:magnitude" in result.stdout
    verbose = runs["--verbose"].stderr.splitlines()
    assert "torchslim: step 1/1: prune:magnitude" in verbose
    assert any(re.fullmatch(r"torchslim: prune:magnitude took \d+\.\d s; result on torch", line) for line in verbose)
    assert runs["--quiet"].stderr == ""


def test_a_closed_stdout_ends_quietly_with_141():
    read_end, write_end = os.pipe()
    os.close(read_end)  # `torchslim list methods | head` once head has exited
    try:
        result = subprocess.run([sys.executable, "-m", "torchslim.cli", "list", "methods"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""
