"""Calibration input shared by every method that reads it from a `CalibrationConfig` (the int8 backends,
Wanda/SparseGPT, GPTQ/AWQ): its split, preprocessed for the model."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch

from torchslim.errors import InputError


def _shapes(inputs: Any) -> list[tuple[int, ...]]:
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return [tuple(t.shape[1:]) if torch.is_tensor(t) else () for t in items]


def calibration_batches(context, config) -> Iterator[Any]:
    """Yield the first ``samples`` samples of the calibration split, as input batches of ``batch_size``.

    Args:
        config: a `CalibrationConfig`, or a method config holding one as ``calibration``.

    Raises:
        InputError: the split is empty, or a batch's sample shape is not the model's (a grayscale folder for an
            RGB model, say), named before any quantization work is done.
    """
    calibration = getattr(config, "calibration", config)
    split = calibration.split
    if len(context.data.splits.get(split, [])) == 0:
        raise InputError(f"{context.where}: the data has no calibration samples (its {split!r} split is empty)")
    expected = _shapes(context.example_inputs(1))
    for inputs, _ in context.data.batches(split, context.bundle.preprocess, calibration.batch_size,
                                          limit=calibration.samples):
        found = _shapes(inputs)
        # Sequence models take any length: only the number of inputs and their ranks must match.
        comparable = [len(e) for e in expected] == [len(f) for f in found]
        if not comparable or (context.bundle.modality == "image" and found != expected):
            raise InputError(f"{context.where}: calibration samples have shape {found}, the model takes "
                             f"{expected} (per sample): the data does not fit the model")
        yield inputs


def check_calibration(context, config) -> None:
    """Fail early (before any export or training) if the calibration data is empty or does not fit the model."""
    calibration = getattr(config, "calibration", config)
    next(calibration_batches(context, dataclasses.replace(calibration, samples=1, batch_size=1)))


MIN_CALIBRATION_TOKENS = 64


def calibration_tokens(batches: list) -> int:
    """Samples the calibration batches hold: real tokens (attention-mask ones) for ``(input_ids,
    attention_mask)`` batches, else rows of the first input."""
    count = 0
    for batch in batches:
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        mask = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        text = torch.is_tensor(mask) and mask.shape == first.shape and not mask.is_floating_point()
        count += int(mask.sum()) if text else int(first.shape[0])
    return count


def require_calibration_tokens(batches: list, where: str, method: str) -> int:
    """The calibration token count; InputError when it is below `MIN_CALIBRATION_TOKENS` (statistics from fewer
    samples than that describe the calibration text, not the layer's inputs)."""
    count = calibration_tokens(batches)
    if count < MIN_CALIBRATION_TOKENS:
        raise InputError(f"{where}.calibration.samples: {method} got {count} calibration samples/tokens, fewer "
                         f"than the {MIN_CALIBRATION_TOKENS} it needs; use more calibration.samples or a larger "
                         f"calibration split")
    return count
