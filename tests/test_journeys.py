"""The four user journeys, each from the CLI with no Python written, on small data (tiny models built from configs,
data from examples/make_data.py), and every artifact they write loaded back by the library its users load it with.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from torchslim.cli import main
from torchslim.data import resolve_data
from torchslim._config import from_dict
from torchslim.data.config import DataConfig

from tiny_hf import bert_classifier, example_data, llama, run_snippet

FAST = {"batch_size": 8, "repeats": 1, "warmup": 0, "threads": 1}


def run(tmp_path, recipe: dict, name: str = "run") -> tuple[int, dict]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / f"{name}-out"
    code = main(["compress", str(path), "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text()) if code == 0 else {}
    return code, report


def test_hf_classifier_on_a_csv_fine_tuned_and_exported(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = bert_classifier(tmp_path / "classifier")
    csv = example_data().make_sentences_csv(tmp_path / "sentences.csv", rows=120)
    data = {"spec": f"csv:{csv}", "text": "sentence", "label": "topic"}
    code, report = run(tmp_path, {
        "model": {"spec": f"hf:{model}", "max_length": 32}, "data": data, "measure": FAST,
        "steps": [{"finetune": {"epochs": 2, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.005},
                                "distill": None}},
                  {"prune": {"method": "magnitude", "sparsity": 0.3}}],
        "export": ["huggingface", "onnx"]})
    assert code == 0
    assert report["data"]["sizes"]["test"] == 12 and report["data"]["class_names"] == ["errors", "other"]
    assert report["data"]["split_seed"] == 0 and report["data"]["columns"] == {"text": "sentence", "label": "topic"}
    out = tmp_path / "run-out"
    assert report["exports"]["huggingface"]["loads_with"].endswith("AutoModelForSequenceClassification.from_pretrained")
    loaded = AutoModelForSequenceClassification.from_pretrained(out / "huggingface").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "huggingface")
    assert loaded.config.id2label == {0: "errors", 1: "other"}
    test = resolve_data(DataConfig(**data))
    encoded = tokenizer(list(test.splits["test"]), padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.inference_mode():
        logits = loaded(**encoded).logits
    accuracy = float((logits.argmax(-1).numpy() == test.labels["test"]).mean())
    # the measured stage's accuracy (the report rounds scores to 6 digits)
    assert accuracy == pytest.approx(report["stages"][-1]["score"], abs=5e-7)
    nonzero = sum(int(p.count_nonzero()) for n, p in loaded.named_parameters() if "encoder" in n and "weight" in n
                  and p.ndim == 2)
    total = sum(p.numel() for n, p in loaded.named_parameters() if "encoder" in n and "weight" in n and p.ndim == 2)
    assert nonzero < 0.75 * total  # the pruned weights came back as zeros
    _check_onnx_folder(out / "onnx", tokenizer, encoded, logits)
    run_snippet("huggingface-classifier", out)
    run_snippet("onnx-folder", out)


def _check_onnx_folder(folder, tokenizer, encoded, logits) -> None:
    """The Optimum-style folder through onnxruntime (optimum's ORTModel needs transformers < 4.58, which this
    environment does not have): same logits as transformers, labels and preprocessing in the metadata."""
    import onnx
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    assert {"model.onnx", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert AutoConfig.from_pretrained(folder).id2label == {0: "errors", 1: "other"}
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    feed = {"input_ids": encoded["input_ids"].numpy(), "attention_mask": encoded["attention_mask"].numpy()}
    (onnx_logits,) = session.run(["logits"], feed)
    np.testing.assert_allclose(onnx_logits, logits.numpy(), atol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert json.loads(props["torchslim.labels"]) == ["errors", "other"]
    assert json.loads(props["torchslim.preprocessing"])["max_length"] == 32
    assert AutoTokenizer.from_pretrained(folder).vocab_size == tokenizer.vocab_size


# Slow: ~20 s, most of it deflating the 26-table model's artifact at level 9 for each stage's compressed size;
# parquet click columns stay in tests/data, the DLRM itself in test_clicks_dlrm.py.
@pytest.mark.slow
def test_click_log_in_parquet_with_builtin_dlrm(tmp_path):
    pytest.importorskip("pyarrow")
    parquet = example_data().make_click_log(tmp_path / "clicks.parquet", rows=3000)
    data = {"spec": f"parquet:{parquet}", "label": "label", "dense": [f"I{i}" for i in range(1, 14)],
            "categorical": [f"C{i}" for i in range(1, 27)], "split": {"fractions": [0.0, 0.0, 1.0]}}
    code, report = run(tmp_path, {"model": "builtin:dlrm", "data": data, "measure": {**FAST, "batch_size": 256},
                                  "steps": [{"compress_embeddings": {"method": "rowwise-int8"}}]})
    assert code == 0
    assert any("null values of dense column 'I3' filled with 0" in n for n in report["notes"])
    baseline, final = report["stages"][0], report["stages"][-1]
    assert baseline["metric"] == "roc_auc" and baseline["eval_samples"] == 3000
    # the hexadecimal ids decode to builtin:clicks' own ids: the same rows score the same through either spec
    from torchslim.zoo import resolve_model
    from torchslim.zoo.dlrm import click_preprocess
    from torchslim.measure.metrics import roc_auc

    clicks = resolve_data("builtin:clicks")
    dense, ids = (torch.from_numpy(a[:3000]) for a in (clicks.splits["test"].dense, clicks.splits["test"].ids))
    dense[torch.isnan(dense)] = 0
    parquet_data = resolve_data(from_dict(DataConfig, data))
    rows = parquet_data.splits["test"]
    with torch.inference_mode():
        model = resolve_model("builtin:dlrm").model
        direct = model(*click_preprocess()(rows))
    assert torch.equal(torch.from_numpy(rows.ids), ids)
    auc = roc_auc(direct, torch.from_numpy(parquet_data.labels["test"]))
    assert auc == pytest.approx(baseline["score"], abs=5e-7)  # the report rounds scores to 6 digits
    assert baseline["score"] > 0.75 and abs(final["score"] - baseline["score"]) < 0.01


def test_local_llm_on_your_own_text_with_a_context_length(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from torchslim.data.docs import load_corpus
    from torchslim.zoo.hub import CausalLMScorer

    folder = llama(tmp_path / "llm")
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(load_corpus()[:200]))
    data = {"spec": f"text:{notes}", "passage_words": 40}
    code, report = run(tmp_path, {"model": {"spec": f"hf:{folder}", "max_length": 48}, "data": data,
                                  "measure": {**FAST, "batch_size": 4},
                                  "steps": [{"quantize": {"method": "int4-weight", "group_size": 32}}]})
    assert code == 0
    final = report["stages"][-1]
    texts = resolve_data(DataConfig(**data)).splits["test"]
    assert final["metric"] == "perplexity" and report["data"]["sizes"]["test"] == len(texts) == 25
    exported = report["exports"]["huggingface"]
    assert exported["format"] == "compressed-tensors pack-quantized" and exported["quantized_layers"] == 14
    out = tmp_path / "run-out" / "huggingface"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    lm = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    assert encoded["input_ids"].shape[1] == 48  # the recipe's context length, not the default 128
    with torch.inference_mode():
        sums = CausalLMScorer(lm)(encoded["input_ids"], encoded["attention_mask"])
    perplexity = math.exp(float(sums[:, 0].double().sum() / sums[:, 1].double().sum()))
    assert perplexity == pytest.approx(final["score"], rel=1e-6)
    run_snippet("compressed-tensors", tmp_path / "run-out")


# Slow: ~25 s, most of it deflating resnet18's 45 MB at level 9 for each stage's compressed size; torchvision
# specs, their weights' transforms and train/val image folders stay in test_preprocessing.py, test_specs.py
# and tests/data.
@pytest.mark.slow
def test_torchvision_model_with_its_own_preprocessing_on_a_train_val_image_folder(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    photos = example_data().make_photo_folder(tmp_path / "photos", train_per_class=4, val_per_class=3)
    torch.manual_seed(3)  # no pretrained weights offline: a seeded random checkpoint stands for the user's own
    weights_file = tmp_path / "resnet18.safetensors"
    save_file(torchvision.models.resnet18(num_classes=4).state_dict(), str(weights_file))
    model = {"spec": "torchvision:resnet18", "checkpoint": str(weights_file), "num_classes": 4}
    code, report = run(tmp_path, {"model": model, "data": f"imagefolder:{photos}", "measure": {**FAST, "batch_size": 4},
                                  "steps": [{"prune": {"method": "magnitude", "sparsity": 0.2}}]})
    assert code == 0
    assert report["data"]["layout"] == ["train", "val"] and report["data"]["sizes"]["test"] == 12
    assert report["data"]["class_names"] == ["astronaut", "chelsea", "coffee", "rocket"]
    # torchvision's own pipeline on the same files: ImageFolder + the weights' transforms()
    reference = torchvision.models.resnet18(num_classes=4)
    from safetensors.torch import load_file

    reference.load_state_dict(load_file(str(weights_file)))
    dataset = torchvision.datasets.ImageFolder(str(photos / "val"),
                                               transform=torchvision.models.ResNet18_Weights.DEFAULT.transforms())
    with torch.inference_mode():
        theirs = reference.eval()(torch.stack([dataset[i][0] for i in range(len(dataset))])).argmax(-1)
    from torchslim.zoo import resolve_model

    bundle = resolve_model(_model_config(model))
    ours_data = resolve_data(f"imagefolder:{photos}")
    batch, labels = next(ours_data.batches("test", bundle.preprocess, 64))
    assert torch.equal(batch, torch.stack([dataset[i][0] for i in range(len(dataset))]))  # bit-identical inputs
    with torch.inference_mode():
        ours = bundle.model(batch).argmax(-1)
    assert torch.equal(ours, theirs)
    accuracy = float((theirs.numpy() == np.asarray(dataset.targets)).mean())
    assert accuracy == pytest.approx(report["stages"][0]["score"], abs=5e-7)  # scores are rounded to 6 digits
    run_snippet("torch-vision", tmp_path / "run-out")


def _model_config(raw: dict):
    from torchslim.zoo.config import ModelConfig

    return ModelConfig(**raw)
