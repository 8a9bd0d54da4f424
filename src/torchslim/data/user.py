"""``file:path/to/module.py:factory`` data: your own Python returns the samples (the file's code runs).

``factory()`` returns one of:

- a `DataBundle` (used as it is);
- a mapping of split names (``train``, ``val``/``validation``, ``test``) to datasets;
- one dataset, split by the recipe's ``split.fractions``.

A dataset is a torch ``Dataset`` or any sequence. Its items are ``(sample, label)`` pairs (an integer label) or
bare samples. The kind of sample is read from the first one: a string or a pair of strings is text; a PIL image
or an HxW(xC) uint8 array is an image; a pair ``(dense float vector, integer ids)`` is a click-log row; anything
else is a tensor the model takes as it is (a ``file:`` model with an example input).

Example (``my_data.py``):
    >>> def splits():
    ...     return {"train": [("good film", 1), ("dull", 0)] * 50, "test": [("great", 1), ("bad", 0)] * 10}
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from torchslim._spec import load_factory
from torchslim.data import DataBundle, assign_splits, register_data_prefix
from torchslim.data.config import DataConfig
from torchslim.errors import InputError
from torchslim.data.tables import SPLIT_NAMES


def _is_label(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return torch.is_tensor(value) and value.ndim == 0 and not value.is_floating_point()


def _split_item(item: Any) -> tuple[Any, int | None]:
    if isinstance(item, (tuple, list)) and len(item) == 2 and _is_label(item[1]):
        return item[0], int(item[1])
    return item, None


def sample_modality(sample: Any) -> str:
    """"text", "image", "clicks" or "tensor" for one raw sample (see the module docstring)."""
    if isinstance(sample, str) or (isinstance(sample, (tuple, list)) and len(sample) == 2
                                   and all(isinstance(s, str) for s in sample)):
        return "text"
    if type(sample).__module__.startswith("PIL."):
        return "image"
    if isinstance(sample, np.ndarray) and sample.dtype == np.uint8 and (sample.ndim == 2 or (
            sample.ndim == 3 and sample.shape[-1] in (1, 3, 4))):
        return "image"
    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        dense, ids = (np.asarray(s) for s in sample)
        if dense.ndim == 1 and ids.ndim == 1 and dense.dtype.kind == "f" and ids.dtype.kind in "iu":
            return "clicks"
    return "tensor"


class Samples(Sequence):
    """The samples of a dataset's items (labels dropped), read on access; PIL images become RGB arrays."""

    def __init__(self, dataset: Any, index: np.ndarray):
        self.dataset, self.index = dataset, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        sample, _ = _split_item(self.dataset[int(self.index[i])])
        if type(sample).__module__.startswith("PIL."):
            return np.asarray(sample.convert("RGB"))
        return sample


def _labels(dataset: Any, where: str) -> np.ndarray | None:
    targets = getattr(dataset, "targets", None)  # torchvision datasets keep them: no decoding needed
    if targets is not None and len(targets) == len(dataset):
        return np.asarray(targets, dtype=np.int64)
    labels = [_split_item(dataset[i])[1] for i in range(len(dataset))]
    if all(label is None for label in labels):
        return None
    if any(label is None for label in labels):
        raise InputError(f"{where}: some items are (sample, label) pairs and some are not")
    return np.asarray(labels, dtype=np.int64)


def _datasets(made: Any, where: str) -> dict[str, Any]:
    if isinstance(made, dict):
        found = {}
        for name, dataset in made.items():
            ours = SPLIT_NAMES.get(str(name).lower())
            if ours is None:
                raise InputError(f"{where}: unknown split {name!r} (use train, val or test)")
            found[ours] = dataset
        return found
    if isinstance(made, torch.utils.data.Dataset) or isinstance(made, Sequence):
        return {"all": made}
    raise InputError(f"{where}: the factory returned {type(made).__name__}; expected a DataBundle, a dataset or "
                     f"a mapping of split names to datasets")


@register_data_prefix("file")
def load_file_data(target: str, seed: int = 0, config: DataConfig | None = None) -> DataBundle:
    """``file:path/to/module.py:factory``: your own Python returns the samples (the file's code runs)."""
    config = config or DataConfig(spec=f"file:{target}")
    where = f"data: file:{target}"
    factory, _ = load_factory(target, "data")
    made = factory()
    if isinstance(made, DataBundle):
        return made
    datasets = _datasets(made, where)
    for name, dataset in datasets.items():
        if len(dataset) == 0:
            raise InputError(f"{where}: the {name} split is empty")
    offsets, given, total = {}, {}, 0
    for name, dataset in datasets.items():
        offsets[name] = total
        given[name] = np.arange(total, total + len(dataset))
        total += len(dataset)
    parts, split_info = assign_splits(given, config.split, seed, where)
    first = next(iter(datasets.values()))
    modality = sample_modality(_split_item(first[0])[0])
    labels = {name: _labels(dataset, f"{where} ({name})") for name, dataset in datasets.items()}
    splits, split_labels = {}, {}
    for part, index in parts.items():
        # every part's rows come from one dataset, except where val is carved from train (the same dataset)
        source = next(name for name in datasets if offsets[name] <= index.min(initial=total) < offsets[name]
                      + len(datasets[name])) if len(index) else next(iter(datasets))
        local = index - offsets[source]
        splits[part] = Samples(datasets[source], local)
        split_labels[part] = None if labels[source] is None else labels[source][local]
    known = [l for l in labels.values() if l is not None]
    classes = int(max(l.max() for l in known)) + 1 if known and modality != "clicks" else None
    sizes = " / ".join(f"{len(splits[n])} {n}" for n in ("train", "val", "test"))
    return DataBundle(spec=config.spec, modality=modality, splits=splits, labels=split_labels, num_classes=classes,
                      notes=[f"{config.spec}: {total} {modality} samples from your factory ({sizes}; "
                             f"{split_info['split']})"], split_info=split_info)
