import copy
import json

import pytest
import yaml

from torchslim.pipeline import compress
from torchslim.recipe import parse_recipe

from conftest import TINY_RECIPE

REQUIRED = {"name", "params", "macs", "size_bytes", "latency_ms_bs1", "latency_ms_batch", "batch_size", "runtime",
            "metric", "score"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    report = compress(parse_recipe(copy.deepcopy(TINY_RECIPE), "tiny.yaml"), out, progress=False, log=lambda m: None)
    return report, out


def test_report_contract(tiny_run):
    report, out = tiny_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["schema"] == "torchslim.report/1"
    assert on_disk["recipe"]["model"] == "builtin:tiny-test-cnn"
    names = [s["name"] for s in on_disk["stages"]]
    assert names == ["baseline", "1-prune:magnitude", "2-finetune:distill", "3-quantize:int8-static"]
    for stage in on_disk["stages"]:
        assert REQUIRED <= set(stage), stage["name"]
        assert stage["metric"] == "accuracy" and 0.0 <= stage["score"] <= 1.0
        assert stage["batch_size"] == 32 and stage["latency_ms_bs1"] > 0 and stage["latency_ms_batch"] > 0
        assert stage["eval_samples"] == 128
    base, pruned, final = on_disk["stages"][0], on_disk["stages"][1], on_disk["stages"][-1]
    assert base["ratios"]["speedup_batch"] == 1.0 and base["metrics"]["agreement"] == 1.0
    assert base["metrics"]["top5_agreement"] == 1.0 and base["metrics"]["kl"] == pytest.approx(0.0, abs=1e-9)
    # (the tiny model is untrained: its softmax margins are small, so few or no samples count as confident)
    confident = final["metrics"]["confident_samples"]
    assert 0 <= confident <= 128 and ("confident_agreement" in final["metrics"]) == (confident > 0)
    assert "top-5" in (out / "report.md").read_text()
    assert pruned["params_nonzero"] < 0.6 * base["params_nonzero"]
    assert final["runtime"] == "onnxruntime" and final["macs"] == base["macs"] > 0
    assert final["size_bytes_raw"] == (out / "model.onnx").stat().st_size  # the file itself, measured
    assert final["ratios"]["size_reduction"] == pytest.approx(base["size_bytes"] / final["size_bytes"], rel=1e-3)


def test_outputs_are_complete_and_the_artifact_reproduces_the_score(tiny_run):
    import onnxruntime as ort

    from conftest import TINY_PREPROCESS
    from torchslim.data import resolve_data

    report, out = tiny_run
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "recipe.yaml", "report.html",
                                                     "report.json", "report.md"]
    assert parse_recipe(yaml.safe_load((out / "recipe.yaml").read_text())).to_dict() == report["recipe"]
    assert "| 3-quantize:int8-static | onnxruntime |" in (out / "report.md").read_text()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    data = resolve_data("builtin:digits")
    correct = 0
    for x, y in data.batches("test", TINY_PREPROCESS, 64, limit=128):
        correct += int((session.run(None, {"input_0": x.numpy()})[0].argmax(1) == y.numpy()).sum())
    assert correct / 128 == pytest.approx(report["stages"][-1]["score"], abs=1e-6)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_a_failing_run_leaves_no_output_folder(tmp_path):
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"] = "builtin:sentences"  # text data for an image model: rejected before anything is written
    from torchslim.errors import InputError

    with pytest.raises(InputError, match="gives text samples but builtin:tiny-test-cnn takes image input"):
        compress(parse_recipe(raw), tmp_path / "run", progress=False, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_rerun_replaces_a_previous_runs_folder_and_overwrite_a_foreign_one(tmp_path):
    from torchslim.errors import InputError

    raw = copy.deepcopy(TINY_RECIPE)
    raw["steps"] = []
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(InputError, match="was not written by torchslim"):  # a folder of the user's
        compress(parse_recipe(raw), out, progress=False, log=lambda m: None)
    assert (out / "stale.txt").read_text() == "old"
    compress(parse_recipe(raw), out, progress=False, log=lambda m: None, overwrite=True)
    assert not (out / "stale.txt").exists()
    raw["steps"] = [{"prune": {"method": "magnitude", "sparsity": 0.3}}]
    report = compress(parse_recipe(raw), out, progress=False, log=lambda m: None)  # a previous run's: replaced
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "model.safetensors", "model.shapes.json", "recipe.yaml", "report.html", "report.json",
        "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock, no .run.old-PID, no partial folder
    assert report["stages"][-1]["runtime"] == "torch"
    prunable = 8 * 9 + 8 * 8 * 9 + 128 * 10  # conv1, conv2 and fc weights
    assert report["stages"][0]["params_nonzero"] - report["stages"][-1]["params_nonzero"] == int(0.3 * prunable)


def test_a_classifier_with_too_few_classes_for_the_data_is_rejected(tmp_path):
    from torch import nn

    from torchslim.errors import InputError
    from torchslim.zoo import ModelBundle, register_builtin_model
    from conftest import TINY_PREPROCESS

    @register_builtin_model("tiny-three-classes")
    def three_classes():
        model = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))
        return ModelBundle(model=model, spec="builtin:tiny-three-classes", task="classification", modality="image",
                           preprocess=TINY_PREPROCESS, example_inputs=TINY_PREPROCESS.example)

    raw = copy.deepcopy(TINY_RECIPE)
    raw["model"] = "builtin:tiny-three-classes"
    with pytest.raises(InputError, match="builtin:digits has 10 classes but builtin:tiny-three-classes predicts 3"):
        compress(parse_recipe(raw), tmp_path / "run", progress=False, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_without_steps_measures_the_baseline_alone(tmp_path):
    raw = copy.deepcopy(TINY_RECIPE)
    raw["steps"] = []
    report = compress(parse_recipe(raw), tmp_path / "run", progress=False, log=lambda m: None)
    assert [s["name"] for s in report["stages"]] == ["baseline"]
    assert report["artifact"] == "model.safetensors"
    assert report["stages"][0]["ratios"]["size_reduction"] == 1.0
