"""Calibration input shared by every int8 backend: the data's ``calib`` split, preprocessed for the model."""

from __future__ import annotations

from typing import Any, Iterator


def calibration_batches(context, config) -> Iterator[Any]:
    """Yield ``config.calibration_batches`` input batches of ``config.calibration_batch_size`` samples."""
    limit = config.calibration_batches * config.calibration_batch_size
    for inputs, _ in context.data.batches("calib", context.bundle.preprocess, config.calibration_batch_size,
                                          limit=limit):
        yield inputs
