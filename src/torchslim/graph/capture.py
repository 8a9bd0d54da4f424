"""Capturing a model's graph: torch.export first, a traced run of the model when export fails."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn

from torchslim.core.modules import output_tensors
from torchslim.errors import InputError, describe


def _flat_forward(forward):
    @functools.wraps(forward)
    def flat(*args, **kwargs):
        return tuple(output_tensors(forward(*args, **kwargs)))

    return flat


def capture(model: nn.Module, example_inputs: Any, how: str = "auto") -> Any:
    """The graph of ``model`` (in eval mode) for ``example_inputs`` (a tensor or a tuple of tensors):
    torch.export's ExportedProgram, or a graph recorded by running the model (`torchslim.graph.trace.trace`).
    ``how``: "auto" (export, tracing when export fails or the model holds an ``nn.MultiheadAttention``),
    "export" or "trace".

    Raises:
        InputError: the model cannot be captured either way; the message names the reasons.
    """
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if how == "trace":
        return _trace(model, args, "tracing was requested")
    if how == "auto" and any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        # torch.export decomposes it into reshapes that mix batch and heads; a traced run records one call.
        return _trace(model, args, "nn.MultiheadAttention is analysed as one call, which a traced run records")
    was_training = model.training
    model.eval()
    # torch.export returns only pytree-registered types: flatten the output (a dataclass, a ModelOutput, a dict
    # of tuples) to its tensors, the only part the analysis reads, by shadowing forward for the capture.
    shadowed = model.__dict__.get("forward")
    try:
        model.forward = _flat_forward(model.forward)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, args, strict=False)
    except Exception as error:
        reason = describe(error, 200)
    finally:
        model.__dict__.pop("forward", None)
        if shadowed is not None:
            model.forward = shadowed
        model.train(was_training)
    if how == "export":
        raise InputError(f"model cannot be captured by torch.export: {reason}")
    return _trace(model, args, f"torch.export failed ({reason})")


def _trace(model: nn.Module, args: tuple, why: str) -> Any:
    from torchslim.graph.trace import trace

    try:
        return trace(model, args, why)
    except Exception as error:
        raise InputError(f"model cannot be captured: {why}, and running it to trace its graph failed too "
                         f"({describe(error, 200)})") from None
