"""The embedded default end to end, on the real built-in model (trained and cached on first use)."""

import json

import pytest

from torchslim.cli import main


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
