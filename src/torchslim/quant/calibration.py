"""Calibration input shared by every int8 backend: the data's ``calib`` split, preprocessed for the model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterator

import torch

from torchslim.errors import InputError


def _shapes(inputs: Any) -> list[tuple[int, ...]]:
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return [tuple(t.shape[1:]) if torch.is_tensor(t) else () for t in items]


def calibration_batches(context, config) -> Iterator[Any]:
    """Yield ``config.calibration_batches`` input batches of ``config.calibration_batch_size`` samples.

    Raises:
        InputError: the ``calib`` split is empty, or a batch's sample shape is not the model's (a grayscale
            folder for an RGB model, say), named before any quantization work is done.
    """
    if len(context.data.splits.get("calib", [])) == 0:
        raise InputError(f"{context.where}: the data has no calibration samples (its 'calib' split is empty)")
    expected = _shapes(context.example_inputs(1))
    limit = config.calibration_batches * config.calibration_batch_size
    for inputs, _ in context.data.batches("calib", context.bundle.preprocess, config.calibration_batch_size,
                                          limit=limit):
        found = _shapes(inputs)
        # Sequence models take any length: only the number of inputs and their ranks must match.
        comparable = [len(e) for e in expected] == [len(f) for f in found]
        if not comparable or (context.bundle.modality == "image" and found != expected):
            raise InputError(f"{context.where}: calibration samples have shape {found}, the model takes "
                             f"{expected} (per sample): the data does not fit the model")
        yield inputs


def check_calibration(context, config) -> None:
    """Fail early (before any export or training) if the calibration data is empty or does not fit the model."""
    next(calibration_batches(context, SimpleNamespace(calibration_batches=1, calibration_batch_size=1)))


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
        raise InputError(f"{where}.calibration_batches: {method} got {count} calibration samples/tokens, fewer than "
                         f"the {MIN_CALIBRATION_TOKENS} it needs; use more calibration_batches or a larger "
                         f"calib split")
    return count
