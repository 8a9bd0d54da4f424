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
    """

    spec: str
    modality: str
    splits: dict[str, Sequence[Any]]
    labels: dict[str, np.ndarray | None]
    num_classes: int | None = None
    notes: list[str] = field(default_factory=list)

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
    from torchslim.data import clicks, digits, docs, imagefolder, images, sentences  # noqa: F401  (registers resolvers)


_DATA = SpecRegistry("data", "built-in data set", _load)
register_data_prefix = _DATA.register_prefix  # resolver(rest_of_spec, seed) -> DataBundle
register_builtin_data = _DATA.register_builtin  # factory(seed) -> DataBundle
list_data_prefixes = _DATA.prefixes
list_builtin_data = _DATA.builtin_names


def check_spec(spec: str) -> None:
    """Cheap syntactic check of a data spec (nothing is loaded). Raises InputError."""
    _DATA.check(spec)


def resolve_data(spec: str, seed: int = 0) -> DataBundle:
    """Load the data a spec names, split with ``seed``. Raises InputError for a bad spec."""
    return _DATA.resolve(spec, seed)


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
                      notes=[describe(digest, (len(train), len(val), len(test)))])


__all__ = [
    "DataBundle", "SPLITS", "check_spec", "list_builtin_data", "list_data_prefixes", "register_builtin_data",
    "register_data_prefix", "resolve_data", "split_indices", "text_bundle",
]
