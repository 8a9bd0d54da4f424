"""ONNX artifacts other tools load: preprocessing and labels in the metadata of torchslim's own model.onnx, and the
Optimum-style folder (renamed inputs/outputs, config.json with id2label)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from torchslim.cli import main
from torchslim.data import resolve_data


def photo_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, level in (("dark", 40), ("light", 200)):
        (root / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.clip(rng.normal(level, 30, (20, 20)), 0, 255).astype(np.uint8)).save(
                root / label / f"{i}.png")
    return root


def test_onnx_stage_carries_labels_and_preprocessing_and_the_folder_round_trips(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    folder = photo_folder(tmp_path / "imgs")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": "builtin:tiny-test-cnn", "data": f"imagefolder:{folder}",
        "steps": [{"quantize": {"method": "int8-static", "runtime": "onnxruntime"}}],
        "measure": {"batch_size": 8, "repeats": 1, "warmup": 0}, "export": ["onnx"]}))
    out = tmp_path / "out"
    assert main(["compress", str(recipe), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["artifact"] == "model.onnx" and report["exports"]["onnx"]["inputs"] == ["pixel_values"]
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["torchslim.labels"]) == ["dark", "light"]
    assert json.loads(props["torchslim.preprocessing"])["center_crop"] == 16
    assert (out / "model.onnx").stat().st_size == report["stages"][-1]["size_bytes_raw"]  # measured as shipped
    config = json.loads((out / "onnx" / "config.json").read_text())
    assert config["id2label"] == {"0": "dark", "1": "light"} and config["torchslim"]["task"] == "classification"
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    from conftest import TINY_PREPROCESS

    data = resolve_data(f"imagefolder:{folder}")
    pixels = TINY_PREPROCESS(list(data.splits["test"])).numpy()
    (logits,) = session.run(None, {"pixel_values": pixels})
    accuracy = float((logits.argmax(-1) == data.labels["test"]).mean())
    assert accuracy == pytest.approx(report["stages"][-1]["score"], abs=5e-7)  # scores are rounded to 6 digits
    from tiny_hf import run_snippet

    run_snippet("onnx-image", out)
