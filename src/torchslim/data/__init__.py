"""Data specs: strings such as ``builtin:digits`` or ``imagefolder:PATH`` resolved to a `DataBundle`.

A bundle holds raw samples per split (``train``, ``val``, ``test``, ``calib``); a model's preprocess turns
them into input batches, so one data set can feed different models.

Example:
    >>> data = resolve_data("builtin:digits")
    >>> len(data.splits["test"]), data.num_classes
    (540, 10)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from torchslim._spec import SpecRegistry
from torchslim.errors import InputError

SPLITS = ("train", "val", "test", "calib")


@dataclass
class DataBundle:
    """Raw samples per split, with labels where the data set has them.

    Attributes:
        spec: the spec string it came from.
        modality: "image" (HxWxC arrays) or "text" (strings).
        splits: split name -> sequence of raw samples (``calib`` feeds quantizer calibration).
        labels: split name -> int64 array of class labels, or None where the data set has no labels.
        num_classes: number of classes for labelled classification data, else None.
        notes: facts worth reporting (sizes, sources).
        class_names: the name of each class index, where the data names them (folder names, string labels).
        split_info: how the splits were made (source, seed, sizes), recorded in the report's ``data``.
    """

    spec: str
    modality: str
    splits: dict[str, Sequence[Any]]
    labels: dict[str, np.ndarray | None]
    num_classes: int | None = None
    notes: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    split_info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """The report's ``data`` entry: spec, modality, split sizes, classes and how the splits were made."""
        sizes = {name: len(samples) for name, samples in self.splits.items()}
        return {"spec": self.spec, "modality": self.modality, "sizes": sizes, "num_classes": self.num_classes,
                "class_names": self.class_names, **self.split_info}

    @property
    def has_labels(self) -> bool:
        return self.labels.get("test") is not None

    def batches(self, split: str, preprocess: Callable, batch_size: int, *, shuffle: bool = False,
                seed: int = 0, limit: int = 0) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """Yield ``(inputs, labels)`` batches of ``split`` (labels None where there are none).

        Args:
            shuffle: draw a seeded permutation (``seed``) instead of the stored order.
            limit: use at most this many samples (0: all).
        """
        samples = self.splits[split]
        labels = self.labels.get(split)
        count = len(samples) if limit <= 0 else min(limit, len(samples))
        order = np.arange(len(samples))
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(samples))
        order = order[:count]
        for start in range(0, count, batch_size):
            index = order[start:start + batch_size]
            inputs = preprocess([samples[i] for i in index])
            target = torch.from_numpy(labels[index]).long() if labels is not None else None
            yield inputs, target

    def fill_batch(self, split: str, preprocess: Callable, size: int) -> Any:
        """One input batch of exactly ``size`` samples of ``split``, cycling through it if it is smaller
        (latency is timed on real samples, the same for every stage and runtime)."""
        samples = self.splits[split]
        return preprocess([samples[i % len(samples)] for i in range(size)])


def _load() -> None:
    from torchslim.data import (clicks, digits, docs, imagefolder, images, sentences, tables,  # noqa: F401
                                text, user)  # (registers resolvers)


_DATA = SpecRegistry("data", "built-in data set", _load)
register_data_prefix = _DATA.register_prefix  # resolver(rest_of_spec, seed) -> DataBundle
register_builtin_data = _DATA.register_builtin  # factory(seed) -> DataBundle
list_data_prefixes = _DATA.prefixes
list_builtin_data = _DATA.builtin_names


def check_spec(spec) -> None:
    """Cheap check of a data spec or `DataConfig` (nothing is loaded): the prefix is known, and a column mapping
    is only given to a prefix that reads one. Raises InputError."""
    from torchslim.data.config import as_data_config

    config = as_data_config(spec)
    _DATA.check(config.spec)
    if not _DATA.accepts_options(config.spec) and config.to_recipe() != config.spec:
        raise InputError(f"data: {config.spec} takes no column mapping or split settings (only the spec); "
                         f"those are for csv:, jsonl:, parquet:, datasets:, imagefolder:, text: and file:")


def resolve_data(spec, seed: int = 0) -> DataBundle:
    """Load the data a spec (a string or a `torchslim.data.config.DataConfig`) names; ``seed`` draws the
    calibration samples. Raises InputError for a bad spec, a missing column or an unreadable file."""
    from torchslim.data.config import as_data_config

    config = as_data_config(spec)
    check_spec(config)
    return _DATA.resolve(config.spec, seed, config=config)


def split_rows(count: int, config, seed: int, where: str) -> dict[str, np.ndarray]:
    """``train``/``val``/``test`` row indices of ``count`` rows cut by ``config.fractions`` (a permutation seeded
    with ``config.seed``), and ``calib``: ``config.calibration_samples`` of train drawn with ``seed``.

    Raises:
        InputError: a split would be empty (too few rows for the fractions).
    """
    parts = dict(zip(("train", "val", "test"), split_indices(count, config.fractions, config.seed)))
    for name, fraction in zip(("train", "val", "test"), config.fractions):
        if fraction > 0 and len(parts[name]) == 0:
            raise InputError(f"{where}: the {name} split is empty ({count} rows split {config.fractions}); "
                             f"add rows or change split.fractions")
    parts["calib"] = calibration_rows(parts["train"], config.calibration_samples, seed)
    return parts


def assign_splits(given: dict[str, np.ndarray], config, seed: int, where: str) -> tuple[dict[str, np.ndarray], dict]:
    """Train/val/test/calib row indices from a source's own splits, and how they were made (for the report).

    ``given`` maps the source's split names (``all``, or ``train`` with ``val`` and/or ``test``) to row indices.
    ``all`` is cut by ``config.fractions``. With given splits, a missing test split is the given val split (the
    held-out set of a train/val layout), and a missing val split is carved from train by the fractions' ratio.
    """
    if set(given) == {"all"}:
        rows = given["all"]
        parts = {name: rows[index] for name, index in split_rows(len(rows), config, seed, where).items()}
        return parts, {"split": f"seeded split {config.fractions} of {len(rows)} rows", "split_seed": config.seed,
                       "calibration_seed": seed}
    if "train" not in given:
        raise InputError(f"{where}: found splits {sorted(given)} but no train split")
    parts, how = {"train": given["train"]}, []
    parts["test"] = given.get("test", given.get("val"))
    if parts["test"] is None:
        raise InputError(f"{where}: found a train split but no val or test split to score on")
    how.append("test: the source's " + ("test" if "test" in given else "val") + " split")
    if "val" in given and "test" in given:
        parts["val"] = given["val"]
        how.append("val: the source's val split")
    else:
        train, val_fraction = parts["train"], config.fractions[1] / max(config.fractions[0] + config.fractions[1], 1e-9)
        order = np.random.default_rng(config.seed).permutation(len(train))
        cut = round(val_fraction * len(train))
        parts["train"], parts["val"] = np.sort(train[order[cut:]]), np.sort(train[order[:cut]])
        how.append(f"val: {cut} rows carved from train (seed {config.seed})")
    for name in ("train", "test"):
        if len(parts[name]) == 0:
            raise InputError(f"{where}: the {name} split is empty")
    parts["calib"] = calibration_rows(parts["train"], config.calibration_samples, seed)
    return parts, {"split": "; ".join(how), "split_seed": config.seed, "calibration_seed": seed}


def calibration_rows(train: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """``samples`` indices of ``train`` drawn with ``seed`` (all of them when train is smaller), sorted."""
    return np.sort(train[np.random.default_rng(seed).permutation(len(train))[:samples]])


def split_indices(count: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """A seeded permutation of ``range(count)`` cut into consecutive parts of the given fractions."""
    order = np.random.default_rng(seed).permutation(count)
    bounds = np.cumsum([0] + [round(f * count) for f in fractions[:-1]] + [count])
    bounds[-1] = count
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def text_bundle(spec: str, corpus: Sequence[str], fractions: Sequence[float], seed: int, describe) -> DataBundle:
    """An unlabelled text bundle: ``corpus`` split by fixed fractions (split seed 7, the same for every run) and
    256 calibration samples drawn from train with ``seed``. ``describe(digest, counts)`` gives the note, with
    the corpus's sha256 prefix and the (train, val, test) sizes."""
    import hashlib

    train, val, test = split_indices(len(corpus), fractions, 7)
    calib = train[np.random.default_rng(seed).permutation(len(train))[:256]]
    parts = {"train": train, "val": val, "test": test, "calib": calib}
    digest = hashlib.sha256("\n".join(corpus).encode()).hexdigest()[:12]
    splits = {name: [corpus[i] for i in index] for name, index in parts.items()}
    return DataBundle(spec=spec, modality="text", splits=splits, labels={name: None for name in parts},
                      notes=[describe(digest, (len(train), len(val), len(test)))],
                      split_info={"split": f"fixed split {list(fractions)}", "split_seed": 7, "calibration_seed": seed,
                                  "sha256": digest})


__all__ = [
    "DataBundle", "SPLITS", "check_spec", "list_builtin_data", "list_data_prefixes", "register_builtin_data",
    "register_data_prefix", "resolve_data", "assign_splits", "split_indices", "split_rows", "text_bundle",
]
