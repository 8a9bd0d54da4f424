import json
import os
import subprocess
import sys

import pytest

from torchslim.cli import main


def run_cli(args, cwd=None):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "torchslim.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


@pytest.mark.parametrize("content, message", [
    (None, "recipe file not found"),
    ("model: [oops", "malformed YAML"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - prune: {method: magnitude, sparsity: 1.5}\n",
     "steps[0].prune.sparsity: must be in [0, 1), got 1.5"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - quantize: {method: int4-magic}\n",
     "unknown quantize method 'int4-magic'"),
    ("model: zoo:thing\ndata: builtin:digits\n", "unknown model spec 'zoo:thing'"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - prune: {method: magnitude, amount: 1}\n",
     "steps[0].prune.amount: unknown key"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nmeasure: {batch_size: many}\n",
     "measure.batch_size: expected int, got 'many'"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, content, message):
    recipe = tmp_path / "bad.yaml"
    if content is not None:
        recipe.write_text(content)
    out = tmp_path / "out"
    assert main(["compress", str(recipe), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchslim: error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_bad_override_and_bad_spec_exit_2(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--set", "steps.0.prune.ratio=2", "--quiet"]) == 2
    assert "demo: steps[0].prune.ratio: must be in [0, 1), got 2" in capsys.readouterr().err
    assert main(["profile", "nowhere:model", "--json"]) == 2
    assert "known prefixes: builtin:, file:, hf:, timm:, torchvision:" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_argparse_usage_errors_exit_2():
    result = run_cli(["compress"])
    assert result.returncode == 2 and "usage:" in result.stderr


def test_profile_json_prints_the_measures(capsys):
    assert main(["profile", "builtin:tiny-test-cnn", "--batch-size", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"params", "macs", "size_bytes", "latency_ms_bs1", "latency_ms_batch"} <= set(result)
    assert result["params"] == 8 * 9 + 16 + 8 * 8 * 9 + 8 + 128 * 10 + 10
    assert result["macs"] == 16 * 16 * 8 * 9 + 16 * 16 * 8 * 8 * 9 + 128 * 10
    assert result["batch_size"] == 8 and result["threads"] >= 1


def test_compress_runs_a_recipe_and_prints_the_table(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny-test-cnn\ndata: builtin:digits\nsteps:\n"
                      "  - prune: {method: magnitude, sparsity: 0.4}\n"
                      "measure: {batch_size: 16, repeats: 2, warmup: 1, max_eval_samples: 64}\n")
    assert main(["compress", str(recipe), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1-prune:magnitude" in out and "baseline" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["recipe"]["steps"][0]["prune"]["sparsity"] == 0.4
