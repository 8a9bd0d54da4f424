"""The embedded default end to end, on the real built-in model (trained and cached on first use)."""

import json

import pytest

from torchslim.cli import main


def test_demo_prunes_distils_and_quantizes_without_losing_accuracy(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--quiet", "--set", "measure.repeats=3", "--set", "measure.warmup=1",
                 "--set", "measure.batch_size=64"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    base, pruned, tuned, final = report["stages"]
    assert base["score"] >= 0.98  # the built-in model is well trained
    assert pruned["params_nonzero"] == pytest.approx(0.5 * base["params_nonzero"], rel=0.01)
    assert tuned["score"] >= base["score"] - 0.005  # distillation wins the pruning loss back
    assert final["runtime"] == "onnxruntime" and final["artifact"] == "model.onnx"
    assert final["score"] >= base["score"] - 0.005
    assert final["metrics"]["agreement"] >= 0.99
    assert final["ratios"]["size_reduction"] >= 4.0  # int8 + 50% zeros, as shipped
    assert final["ratios"]["size_reduction_raw"] >= 3.5  # int8 alone, as written (graph and int32 biases cost the rest)
    assert final["details"]["calibration_samples"] == 256
    assert "3-quantize:int8-static" in capsys.readouterr().out
