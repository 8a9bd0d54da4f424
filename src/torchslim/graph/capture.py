"""Capturing a model's graph with torch.export, with a clear error when a model cannot be captured."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from torchslim.errors import InputError, describe


def capture(model: nn.Module, example_inputs: Any) -> torch.export.ExportedProgram:
    """torch.export of ``model`` (eval mode, on a copy) for ``example_inputs`` (a tensor or a tuple of tensors).

    Raises:
        InputError: the model cannot be captured; the message names the reason.
    """
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, args, strict=False)
    except Exception as error:
        raise InputError(f"model cannot be captured by torch.export: {describe(error)}") from None
    finally:
        model.train(was_training)
