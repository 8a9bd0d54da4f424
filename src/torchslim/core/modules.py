"""The layer-level helpers every method uses, each written once: calling a model on one batch, the tensors of its
output, linear-layer views (``nn.Linear`` and transformers' ``Conv1D``), layer selection by name pattern, tied
modules, a model's repeated blocks, swapping a submodule, and finding the layer whose code raised an error.

Light to import: torch only.

Example:
    >>> layers = linear_layers(model)
    >>> [name for name in layers if matches(name, ["*.fc*"])]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Sequence

import torch
from torch import Tensor, nn


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on one batch: a tuple or list is passed positionally, anything else as the single argument."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def output_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output, in a fixed order: a tensor, or tuples, lists, dicts (transformers'
    ``ModelOutput`` is an OrderedDict) and dataclasses of them, nested; anything else (None, numbers, caches
    of other types) holds none."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (tuple, list)):
        items = list(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name) for f in dataclasses.fields(value)]
    else:
        return []
    return [t for item in items for t in output_tensors(item)]


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a module name matches any of the shell-style patterns (``fnmatch``: ``*``, ``?``, ``[...]``)
    the configs' ``skip``/``layers`` fields hold, e.g. ``matches("blocks.3.fc1", ["blocks.*.fc*"])``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule called ``name`` (a dotted path; ``""`` is not allowed)."""
    if not name:
        raise ValueError("the root module cannot be replaced in place")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def failing_layer(model: nn.Module, error: BaseException) -> str | None:
    """The name of the innermost submodule of ``model`` whose own code was running when ``error`` was raised
    (read from the traceback's frames), or None when the error came from outside every submodule."""
    names = {id(m): name for name, m in model.named_modules()}
    where, trace = None, error.__traceback__
    while trace is not None:
        owner = trace.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and names.get(id(owner)):
            where = names[id(owner)]
        trace = trace.tb_next
    return where


def forward_shapes(model: nn.Module, inputs: Any) -> tuple[tuple | None, str | None, str | None]:
    """Run ``model`` (in eval mode, without gradients) on one batch to see whether it still works after a change.

    Returns:
        ``(the shape of every output tensor, None, None)``, or ``(None, the error in one line, the innermost
        layer whose code raised it)`` — the caller decides whether undoing that layer's change can fix it.
    """
    from torchslim.errors import describe

    try:
        with torch.no_grad():
            outputs = output_tensors(call_model(model.eval(), inputs))
        if not outputs:
            raise ValueError("the model's output holds no tensor")
        return tuple(tuple(t.shape) for t in outputs), None, None
    except Exception as error:  # reported to the caller, which restores or re-raises
        return None, describe(error, 200), failing_layer(model, error)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D (y = x @ W + b, W stored (in, out)); matched by name so transformers stays unloaded
    return type(module).__name__ == "Conv1D" and getattr(getattr(module, "weight", None), "ndim", 0) == 2


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution: one group per channel, as many outputs as inputs (its groups follow its width)."""
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (a linear layer with its weight stored transposed)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight of a linear-like layer as an ``(out, in)`` matrix (a view: transposed for ``Conv1D``).

    Args:
        module: an ``nn.Linear`` or a transformers ``Conv1D``.

    Returns:
        The weight tensor, ``(out_features, in_features)``, sharing storage with the parameter.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if _is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D layer")


def set_weight_matrix_(module: nn.Module, w: Tensor) -> None:
    """Copy an ``(out, in)`` matrix into a linear-like layer's weight, in place (transposing for ``Conv1D``).

    Args:
        module: an ``nn.Linear`` or a transformers ``Conv1D``.
        w: the new weight, ``(out_features, in_features)``; cast to the parameter's dtype and device.
    """
    target = weight_matrix(module)
    if tuple(w.shape) != tuple(target.shape):
        raise ValueError(f"weight of shape {tuple(w.shape)} does not fit {type(module).__name__} "
                         f"{tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(w)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``full module name -> module`` of every linear-like layer of ``model``, in registration order."""
    return {name: module for name, module in model.named_modules() if is_linear_like(module)}


def tied_modules(model: nn.Module) -> dict[str, str]:
    """``module name -> name of another module holding the same parameter`` (e.g. GPT-2's lm_head and wte).

    Pruning or quantizing such a layer would change the other module too (an embedding, usually).
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    return {name: next(n for n in names if n != name) for names in owners.values() if len(names) > 1
            for name in names}


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``name -> tensor`` for every parameter and buffer under every name it has: tied weights (an LM head
    sharing the embedding) answer to each alias."""
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def output_head(model: nn.Module) -> tuple[str | None, str | None]:
    """Names of the output head and of the input embedding tied to it (None where there is none)."""
    owners = [m for m in model.modules() if callable(getattr(m, "get_output_embeddings", None))]
    if not owners:
        return None, None
    head, embedding = owners[0].get_output_embeddings(), owners[0].get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    tied = (head is not None and embedding is not None and getattr(head, "weight", None) is not None
            and head.weight is getattr(embedding, "weight", None))
    return names.get(id(head)), (names.get(id(embedding)) if tied else None)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The repeated blocks of a transformer: GPT-2 ``transformer.h``, Llama ``model.layers``, BERT ``encoder.layer``.

    The candidate containers are ``nn.ModuleList`` (and ``nn.Sequential``, e.g. timm's ViT ``blocks``) whose
    children all share one class and are not themselves linear layers; the one holding the most linear-like
    layers wins (so a Mixtral block's list of experts loses to the list of decoder layers around it).

    Args:
        model: any module; the whole tree is searched (a wrapper around a Hugging Face model is fine).

    Returns:
        ``(dotted name, container)`` or None when the model has no such container (e.g. a plain MLP).
    """
    best: tuple[int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        children = list(module)
        if len({type(child) for child in children}) != 1 or is_linear_like(children[0]):
            continue
        count = sum(is_linear_like(m) for child in children for m in child.modules())
        if count and (best is None or count > best[0]):
            best = (count, name, module)
    return None if best is None else (best[1], best[2])


__all__ = [
    "call_model", "failing_layer", "find_blocks", "forward_shapes", "is_depthwise", "is_linear_like", "linear_layers", "matches", "named_tensors", "output_head",
    "output_tensors", "replace_module", "set_weight_matrix_", "tied_modules", "weight_matrix",
]
