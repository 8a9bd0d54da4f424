"""The embedded default end to end, on the real built-in model (trained and cached on first use)."""

import json

import pytest
import yaml

from torchslim.cli import main


@pytest.mark.slow  # twelve epochs of distillation of the 59 M-MAC built-in CNN and two int8 runtimes timed: minutes
def test_demo_prunes_channels_distils_and_quantizes_without_losing_accuracy(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--quiet", "--set", "measure.repeats=3", "--set", "measure.warmup=1",
                 "--set", "measure.batch_size=64"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    base, pruned, tuned, final = report["stages"]
    assert base["score"] >= 0.98  # the built-in model is well trained
    assert pruned["step"] == "prune:channel"
    assert 0.25 <= pruned["macs"] / base["macs"] <= 0.4  # half of every group's channels: about a third of MACs
    assert pruned["params"] < 0.35 * base["params"]
    assert pruned["details"]["removed_channels"]["stem.0"] == 8  # 24 -> 16 (round_to 8)
    assert tuned["score"] >= base["score"] - 0.005  # distillation wins the pruning loss back
    assert final["runtime"] == "onnxruntime" and final["artifact"] == "model.onnx"
    assert final["score"] >= base["score"] - 0.005
    assert final["metrics"]["agreement"] >= 0.99
    assert final["ratios"]["size_reduction"] >= 8.0  # a third of the weights, in int8
    assert final["ratios"]["size_reduction_raw"] >= 8.0
    assert final["details"]["calibration_samples"] == 256
    assert "3-quantize:int8-static" in capsys.readouterr().out


def test_the_demos_prune_step_cuts_the_built_in_model_to_a_third(tmp_path):
    """The demo's first step as the demo runs it, through the pipeline on the built-in model, measured briefly:
    the structural figures of the slow test above, in seconds."""
    from torchslim.defaults import DEMO_RECIPE
    from torchslim.pipeline import compress
    from torchslim.recipe import parse_recipe

    raw = yaml.safe_load(DEMO_RECIPE)
    raw["steps"] = raw["steps"][:1]
    raw["measure"] = {"batch_size": 64, "warmup": 0, "repeats": 1, "max_eval_samples": 128, "threads": 1}
    report = compress(parse_recipe(raw, "demo"), tmp_path / "demo", progress=False, log=lambda m: None)
    base, pruned = report["stages"]
    assert base["score"] >= 0.98  # the built-in model is well trained
    assert pruned["step"] == "prune:channel"
    assert 0.25 <= pruned["macs"] / base["macs"] <= 0.4  # half of every group's channels: about a third of MACs
    assert pruned["params"] < 0.35 * base["params"]
    assert pruned["details"]["removed_channels"]["stem.0"] == 8  # 24 -> 16 (round_to 8)
    assert pruned["ratios"]["size_reduction_raw"] > 2.5  # a dense file of a third of the weights
