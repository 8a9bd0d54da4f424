"""A user's ``nn.Module`` and iterable of batches, seen as the `ModelBundle` and `DataBundle` method handlers take.

A batch is one of:

- a tensor: the model's one input, no labels;
- a pair ``(inputs, labels)``: ``inputs`` a tensor or a tuple of tensors (passed positionally), ``labels`` a
  tensor of class indices (or 0/1 clicks) or None; this is what a ``DataLoader`` over a labelled data set yields;
- a mapping (a Hugging Face tokenizer's output): the model's keyword inputs, with ``labels``/``label`` as labels.

The batches are read once and cut into samples, so that each method draws batches of the size it needs (a
calibration pass, a fine-tuning epoch); a model from transformers is wrapped to return plain logits (see
`torchslim.zoo.hub`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from torchslim.data import DataBundle
from torchslim.errors import InputError, shorten
from torchslim.zoo import ModelBundle

TASKS = ("classification", "ctr", "embedding", "lm")
_LABEL_KEYS = ("labels", "label")


def is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def wrap_model(model: nn.Module) -> tuple[nn.Module, str | None]:
    """(the module handlers run, its task when the model's type says it): a transformers model is wrapped to take
    ``(input_ids, attention_mask)`` and return a tensor; any other module is used as it is."""
    if not is_transformers_model(model):
        return model, None
    from torchslim.zoo.hub import CausalLMScorer, LogitsOnly

    if _is_causal_lm(model):
        return CausalLMScorer(model), "lm"
    return LogitsOnly(model), None


def unwrap_model(module: nn.Module) -> nn.Module:
    """The user's own model inside the wrapper `wrap_model` put around it (the module itself when none)."""
    wrapper = type(module).__module__ == "torchslim.zoo.hub" and type(module).__name__ in ("CausalLMScorer",
                                                                                            "LogitsOnly")
    return module.model if wrapper else module


@dataclass
class Collate:
    """Samples (tensors, or tuples of tensors) -> one batch: stacked along a new first dimension."""

    positional: bool

    def __call__(self, samples: Sequence[Any]) -> Any:
        if not self.positional:
            return torch.stack(list(samples))
        return tuple(torch.stack([s[i] for s in samples]) for i in range(len(samples[0])))


def _positional(mapping: dict, model: nn.Module, where: str) -> tuple:
    """A mapping batch as the model's positional inputs, in the order of its forward's parameters."""
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = [k for k in mapping if k not in names]
    wrapped = getattr(model, "model", None)
    if unknown and not (wrapped is not None and is_transformers_model(wrapped)):
        raise InputError(f"{where}: batch keys {unknown} are not inputs of {type(model).__name__}.forward "
                         f"(it takes {names})")
    given = [n for n in names if n in mapping]
    if given != names[:len(given)]:
        raise InputError(f"{where}: batch keys {given} leave out an earlier input of "
                         f"{type(model).__name__}.forward {names}; give every input up to the last")
    return tuple(mapping[n] for n in given)


def split_batch(batch: Any, model: nn.Module, where: str) -> tuple[Any, Any]:
    """One batch -> (inputs: a tensor or a tuple of tensors, labels: a tensor or None)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        mapping = dict(batch)
        labels = next((mapping.pop(k) for k in _LABEL_KEYS if k in mapping), None)
        return _positional(mapping, model, where), labels
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
        if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs) and inputs:
            return tuple(inputs), labels
        if isinstance(inputs, torch.Tensor):
            return inputs, labels
    raise InputError(f"{where}: a batch must be a tensor, an (inputs, labels) pair or a mapping of named inputs, "
                     f"got {shorten(type(batch).__name__)}")


def read_batches(data: Iterable, model: nn.Module, where: str) -> tuple[list[Any], np.ndarray | None, bool]:
    """Every sample of ``data`` (its batches cut along the first dimension), the labels (or None where a batch
    has none) and whether the inputs are tuples (passed positionally)."""
    if isinstance(data, (torch.Tensor, dict)) or not hasattr(data, "__iter__"):
        raise InputError(f"{where}: expected a DataLoader or an iterable of batches, got {type(data).__name__}")
    samples, labels, positional, labelled = [], [], None, True
    for batch in data:
        inputs, target = split_batch(batch, model, where)
        is_tuple = isinstance(inputs, tuple)
        if positional is not None and is_tuple != positional:
            raise InputError(f"{where}: every batch must have the same form (a tensor, or a tuple of tensors)")
        positional = is_tuple
        tensors = inputs if is_tuple else (inputs,)
        count = tensors[0].shape[0] if tensors[0].dim() else 0
        if count == 0 or any(t.dim() == 0 or t.shape[0] != count for t in tensors):
            raise InputError(f"{where}: every input of a batch needs the same first (batch) dimension, got "
                             f"{[tuple(t.shape) for t in tensors]}")
        samples += [tuple(t[i] for t in tensors) if is_tuple else inputs[i] for i in range(count)]
        labelled = labelled and target is not None
        if target is not None:
            labels.append(torch.as_tensor(target).reshape(count, -1)[:, 0].detach().cpu())
    if not samples:
        raise InputError(f"{where}: no batches")
    return samples, (torch.cat(labels).numpy() if labelled else None), bool(positional)


def data_bundle(train: Iterable | None, validation: Iterable | None, model: nn.Module) -> tuple[DataBundle,
                                                                                                 Collate | None]:
    """The `DataBundle` of the user's batches: ``train`` feeds training and calibration, ``validation`` (else
    ``train``) early stopping and the methods' own scoring."""
    splits: dict[str, Sequence[Any]] = {name: [] for name in ("train", "val", "test", "calib")}
    labels: dict[str, np.ndarray | None] = {name: None for name in splits}
    collate = None
    for names, source, where in ((("train", "calib"), train, "data"), (("val", "test"), validation or train,
                                                                       "validation")):
        if source is None:
            continue
        if source is train and names[0] == "val" and splits["train"]:
            found, found_labels = splits["train"], labels["train"]
        else:
            found, found_labels, positional = read_batches(source, model, where)
            collate = collate or Collate(positional)
        for name in names:
            splits[name], labels[name] = found, found_labels
    described = {name: len(samples) for name, samples in splits.items()}
    return DataBundle(spec="python:batches", modality="tensor", splits=splits, labels=labels,
                      notes=[f"batches given from Python ({described['train']} samples)"]), collate


def example_function(example_inputs: Any, collate: Collate | None, data: DataBundle) -> Any:
    """batch size -> an input batch: rows of ``example_inputs`` (repeated as needed), else of the data."""
    if example_inputs is not None:
        tensors = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
            raise InputError("example_inputs: expected a batch: a tensor or a tuple of tensors")

        def example(batch_size: int) -> Any:
            rows = [t[torch.arange(batch_size) % t.shape[0]] for t in tensors]
            return tuple(rows) if isinstance(example_inputs, (tuple, list)) else rows[0]

        return example
    if collate is None:
        raise InputError("example_inputs: required when no data is given (one input batch of the model)")
    samples = data.splits["train"]
    return lambda batch_size: collate([samples[i % len(samples)] for i in range(batch_size)])


def model_bundle(model: nn.Module, *, task: str | None, data: DataBundle, collate: Collate | None,
                 example_inputs: Any) -> ModelBundle:
    """The `ModelBundle` of a user's module (already wrapped by `wrap_model`)."""
    if task is not None and task not in TASKS:
        raise InputError(f"task: expected one of {', '.join(TASKS)}, got {shorten(task)}")
    example = example_function(example_inputs, collate, data)
    first = example(1)
    image = isinstance(first, torch.Tensor) and first.dim() == 4 and first.is_floating_point()
    inner = getattr(model, "model", None)
    text = inner is not None and is_transformers_model(inner)
    return ModelBundle(model=model, spec=f"python:{type(model).__name__}", task=task or "classification",
                       modality="image" if image else "text" if text else "tensor",
                       preprocess=collate or Collate(isinstance(first, tuple)), example_inputs=example)
