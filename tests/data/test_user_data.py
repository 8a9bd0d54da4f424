"""Data specs for user data (csv:, jsonl:, parquet:, datasets:, text:, file:, imagefolder: train/val) and the one-line
errors of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from torchslim.cli import main
from torchslim.data import resolve_data
from torchslim.data.config import DataConfig


def write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def test_csv_text_pairs_with_string_labels_split_by_seed(tmp_path):
    rows = [(f"first {i}", f"second {i}", "yes" if i % 3 else "no") for i in range(50)]
    path = write_csv(tmp_path / "pairs.csv", ["a", "b", "same"], rows)
    config = DataConfig(spec=f"csv:{path}", text="a", text_pair="b", label="same")
    data = resolve_data(config)
    assert data.modality == "text" and data.class_names == ["no", "yes"] and data.num_classes == 2
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [40, 5, 5]
    assert data.splits["test"][0][0].startswith("first") and data.splits["test"][0][1].startswith("second")
    assert resolve_data(config).splits["test"] == data.splits["test"]  # seeded: the same split every run
    from dataclasses import replace

    from torchslim.data.config import SplitConfig

    other = resolve_data(replace(config, split=SplitConfig(seed=5)))
    assert other.splits["test"] != data.splits["test"]


def test_text_pairs_tokenise_as_pairs():
    from tiny_hf import tokenizer

    from torchslim.zoo.preprocess import TextPreprocess

    ids, mask = TextPreprocess(tokenizer(), max_length=16)([("a cat", "a dog"), ("one", "two words here")])
    sep = tokenizer().sep_token_id
    assert ids.shape[0] == 2 and int((ids[0] == sep).sum()) == 2  # [CLS] a [SEP] b [SEP]


def test_jsonl_and_default_text_and_label_columns(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"review {i}", "label": i % 2}) for i in range(20)))
    data = resolve_data(f"jsonl:{path}")
    assert data.modality == "text" and data.num_classes == 2 and data.class_names is None
    assert data.split_info["columns"] == {"text": "text", "label": "label"}  # the conventional names, none given
    assert set(np.concatenate([data.labels[s] for s in ("train", "val", "test")])) == {0, 1}


def test_a_folder_with_train_and_test_files_keeps_them_and_carves_val(tmp_path):
    write_csv(tmp_path / "train.csv", ["text", "label"], [(f"t{i}", i % 2) for i in range(40)])
    write_csv(tmp_path / "test.csv", ["text", "label"], [(f"s{i}", i % 2) for i in range(10)])
    data = resolve_data(f"csv:{tmp_path}")
    assert len(data.splits["test"]) == 10 and all(s.startswith("s") for s in data.splits["test"])
    assert len(data.splits["val"]) == 4 and len(data.splits["train"]) == 36  # 0.1 / (0.8 + 0.1) of train
    assert "val: 4 rows carved from train" in data.describe()["split"]


def test_parquet_image_paths_and_click_columns(tmp_path):
    pandas = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from PIL import Image

    for i in range(12):
        Image.fromarray(np.full((20, 24, 3), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
    frame = pandas.DataFrame({"file": [f"{i}.png" for i in range(12)], "kind": ["a", "b"] * 6,
                              "d1": [*range(5), None, *range(6, 12)], "c1": [f"{i:x}" for i in range(12)],
                              "c2": ["x", "y"] * 6,
                              "click": [0, 1] * 6})
    frame.to_parquet(tmp_path / "t.parquet")
    images = resolve_data(DataConfig(spec=f"parquet:{tmp_path / 't.parquet'}", image="file", label="kind"))
    assert images.modality == "image" and images.splits["test"][0].shape == (20, 24, 3)
    clicks = resolve_data(DataConfig(spec=f"parquet:{tmp_path / 't.parquet'}", dense=["d1"],
                                     categorical=["c1", "c2"], label="click"))
    dense, ids = clicks.splits["train"][0]
    assert clicks.modality == "clicks" and dense.shape == (1,) and ids.dtype == np.int64
    all_ids = np.concatenate([clicks.splits[s].ids for s in ("train", "val", "test")])
    assert set(all_ids[:, 0]) <= set(range(12))  # hexadecimal strings read as numbers
    assert len(set(all_ids[:, 1])) == 2  # other strings hashed, stably
    all_dense = np.concatenate([clicks.splits[s].dense for s in ("train", "val", "test")])
    assert not np.isnan(all_dense).any() and int((all_dense == 0).sum()) == 2  # the null became a 0, reported:
    assert "t.parquet: 1 null values of dense column 'd1' filled with 0" in clicks.notes


def test_hugging_face_datasets_from_save_to_disk_and_from_local_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": [f"a{i}" for i in range(30)],
                                             "label": [i % 3 for i in range(30)]}),
        "validation": datasets.Dataset.from_dict({"sentence": ["v1", "v2"], "label": [0, 1]}),
        "test": datasets.Dataset.from_dict({"sentence": ["t1", "t2", "t3"], "label": [0, 1, 2]})})
    splits.save_to_disk(str(tmp_path / "saved"))
    data = resolve_data(DataConfig(spec=f"datasets:{tmp_path / 'saved'}", text="sentence"))
    assert data.splits["test"] == ["t1", "t2", "t3"] and data.splits["val"] == ["v1", "v2"] and data.num_classes == 3
    path = write_csv(tmp_path / "local.csv", ["text", "label"], [(f"x{i}", i % 2) for i in range(20)])
    local = resolve_data(f"datasets:{path}")
    assert sum(len(local.splits[s]) for s in ("train", "val", "test")) == 20


def test_text_files_become_passages(tmp_path):
    (tmp_path / "a.txt").write_text("word " * 130 + "\n\n" + "Short paragraph here.\n")
    (tmp_path / "b.md").write_text("\n\n".join(f"Paragraph {i} of the notes." for i in range(30)))
    data = resolve_data(DataConfig(spec=f"text:{tmp_path}", passage_words=50))
    passages = [p for s in ("train", "val", "test") for p in data.splits[s]]
    assert len(passages) == 3 + 1 + 30 and max(len(p.split()) for p in passages) == 50
    assert data.labels["test"] is None and data.split_info["sha256"]


def test_file_data_factories_splits_or_one_dataset(tmp_path):
    module = tmp_path / "my_data.py"
    module.write_text(
        "import torch\n"
        "def splits():\n"
        "    return {'train': [('good', 1), ('bad', 0)] * 20, 'test': [('fine', 1), ('poor', 0)] * 5}\n"
        "class Tensors(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 30\n"
        "    def __getitem__(self, i): return torch.full((4,), float(i)), i % 3\n"
        "def tensors():\n"
        "    return Tensors()\n")
    text = resolve_data(f"file:{module}:splits")
    assert text.modality == "text" and len(text.splits["test"]) == 10 and text.num_classes == 2
    assert len(text.splits["val"]) + len(text.splits["train"]) == 40
    tensors = resolve_data(f"file:{module}:tensors")
    assert tensors.modality == "tensor" and tensors.splits["test"][0].shape == (4,)
    assert tensors.num_classes == 3 and len(tensors.labels["test"]) == len(tensors.splits["test"])


def test_imagefolder_with_train_and_val_folders(tmp_path):
    from PIL import Image

    for split, count in (("train", 10), ("val", 4)):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((20, 30, 3), 9 * i, np.uint8)).save(tmp_path / split / label / f"{i}.png")
    data = resolve_data(f"imagefolder:{tmp_path}")
    assert data.class_names == ["cat", "dog"] and len(data.splits["test"]) == 8  # val/ is the held-out set
    assert len(data.splits["train"]) + len(data.splits["val"]) == 20
    assert all("/val/" in str(p) for p in data.splits["test"].paths)


def test_file_model_with_an_example_image_combines_with_imagefolder(tmp_path):
    from PIL import Image

    from torchslim.zoo import resolve_model

    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((40, 50, 3), 30 * i, np.uint8)).save(tmp_path / "imgs" / label / f"{i}.png")
    module = tmp_path / "net.py"
    module.write_text("import torch\n\ndef build():\n    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), "
                      "torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))\n"
                      "    return net, torch.zeros(1, 3, 32, 32)\n")
    bundle = resolve_model(f"file:{module}:build")
    assert bundle.modality == "image"
    data = resolve_data(f"imagefolder:{tmp_path / 'imgs'}")
    batch, _ = next(data.batches("test", bundle.preprocess, 4))
    assert batch.shape[1:] == (3, 32, 32) and bundle.model(batch).shape[1] == 2


# --- bad input: one line naming the file and the column, exit 2 -------------------------------------------------

def _cli_error(tmp_path, data, capsys, model: str = "builtin:tiny-test-cnn") -> str:
    import yaml

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"model": model, "data": data}))
    assert main(["compress", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("torchslim: error:")]
    assert len(errors) == 1 and "Traceback" not in err  # (library progress bars may precede it on stderr)
    return errors[0]


@pytest.mark.parametrize("rows, mapping, message", [
    ([("hi", 1)] * 20, {"text": "sentence"}, "no column 'sentence' for text (columns: text, label)"),
    ([(1, 1)] * 20, {}, "column 'text' (text) holds int values such as 1, expected strings"),
    ([("hi", 0.5)] * 20, {}, "column 'label' (label) holds 0.5: expected class labels"),
    ([("hi", 1)] * 3, {}, "the val split is empty (3 rows split [0.8, 0.1, 0.1])"),
])
def test_bad_tables_name_the_file_and_column(tmp_path, capsys, rows, mapping, message):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], rows)
    error = _cli_error(tmp_path, {"spec": f"csv:{path}", **mapping}, capsys, model="builtin:minilm")
    assert message in error and (str(path) in error or "csv:" in error)


def test_a_parquet_column_of_nulls_is_named(tmp_path, capsys):
    pandas = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    frame = pandas.DataFrame({"label": [0, 1] * 10, "I1": [None] * 20, "C1": ["a"] * 20})
    path = tmp_path / "log.parquet"
    frame.to_parquet(path)
    error = _cli_error(tmp_path, {"spec": f"parquet:{path}", "dense": ["I1"], "categorical": ["C1"]}, capsys,
                       model="builtin:dlrm")
    assert f"{path}: column 'I1' (dense) is all null" in error


def test_an_unreadable_image_is_named_before_any_work(tmp_path, capsys):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "imgs" / label / f"{i}.png")
    broken = tmp_path / "imgs" / "b" / "broken.png"
    broken.write_bytes(b"not an image at all")
    error = _cli_error(tmp_path, f"imagefolder:{tmp_path / 'imgs'}", capsys)
    assert f"{broken}: unreadable image" in error


@pytest.mark.parametrize("data, message", [
    ({"spec": "builtin:digits", "colour": "red"}, "data.colour: unknown key"),
    ({"spec": "builtin:digits", "text": "x"}, "builtin:digits takes no column mapping"),
    ({"spec": "csv:x.csv", "split": {"fractions": [0.5, 0.5, 0.5]}}, "data.split.fractions: must be three fractions"),
    ({"text": "x"}, "data.spec: required"),
])
def test_bad_data_mappings_are_recipe_errors(tmp_path, capsys, data, message):
    assert message in _cli_error(tmp_path, data, capsys)


def test_bad_model_mappings_and_checkpoints(tmp_path, capsys):
    assert "model.size: unknown key" in _cli_error(tmp_path, "builtin:digits", capsys,
                                                   model={"spec": "builtin:digits-cnn", "size": 3})
    bad = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    model = {"spec": "builtin:tiny-test-cnn", "checkpoint": str(bad)}
    error = _cli_error(tmp_path, "builtin:digits", capsys, model=model)
    assert f"checkpoint {bad} does not fit the model" in error
