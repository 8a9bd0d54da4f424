"""Model specs: strings such as ``builtin:digits-cnn`` or ``torchvision:resnet50`` resolved to a `ModelBundle`.

Each prefix has a resolver in a public registry (`register_model_prefix`); a resolver imports its heavy
dependency (torchvision, timm, transformers) only when it runs.

Example:
    >>> bundle = resolve_model("torchvision:resnet18")
    >>> bundle.model(bundle.example_inputs(1)).shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from torchslim.errors import InputError


@dataclass
class ModelBundle:
    """A resolved model with what torchslim needs to feed, evaluate and describe it.

    Attributes:
        model: the module, in eval mode. Its forward takes the tensors of one batch positionally.
        spec: the spec string it came from.
        task: "classification" (outputs logits) or "embedding" (outputs one vector per sample).
        modality: "image", "text" or "tensor": which data it can take.
        preprocess: raw samples -> one input batch (a tensor or a tuple of tensors).
        example_inputs: batch size -> a synthetic input batch of the right shape.
        notes: facts worth reporting (e.g. "random weights: no pretrained file available offline").
    """

    model: nn.Module
    spec: str
    task: str
    modality: str
    preprocess: Callable[[Any], Any]
    example_inputs: Callable[[int], Any]
    notes: list[str] = field(default_factory=list)


_RESOLVERS: dict[str, Callable[[str], ModelBundle]] = {}
_BUILTINS: dict[str, Callable[[], ModelBundle]] = {}


def register_model_prefix(prefix: str) -> Callable:
    """Register ``resolver(rest_of_spec) -> ModelBundle`` for specs ``prefix:rest``."""

    def decorate(resolver: Callable[[str], ModelBundle]) -> Callable[[str], ModelBundle]:
        _RESOLVERS[prefix] = resolver
        return resolver

    return decorate


def register_builtin_model(name: str) -> Callable:
    """Register a zero-argument factory for ``builtin:name``."""

    def decorate(factory: Callable[[], ModelBundle]) -> Callable[[], ModelBundle]:
        _BUILTINS[name] = factory
        return factory

    return decorate


def _load() -> None:
    from torchslim.zoo import builtin, hub  # noqa: F401  (registers the resolvers)


def list_model_prefixes() -> list[str]:
    _load()
    return sorted(_RESOLVERS)


def list_builtin_models() -> list[str]:
    _load()
    return sorted(_BUILTINS)


def check_spec(spec: str) -> None:
    """Cheap syntactic check of a model spec (no model is built). Raises InputError."""
    _load()
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in _RESOLVERS:
        known = ", ".join(f"{p}:" for p in sorted(_RESOLVERS))
        raise InputError(f"model: unknown model spec {spec!r} (known prefixes: {known})")
    if not rest:
        raise InputError(f"model: spec {spec!r} names no model after '{prefix}:'")
    if prefix == "builtin" and rest not in _BUILTINS:
        raise InputError(f"model: unknown built-in model {rest!r} (known: {', '.join(sorted(_BUILTINS))})")


def resolve_model(spec: str) -> ModelBundle:
    """Build the model a spec names, in eval mode on the CPU. Raises InputError for a bad spec."""
    check_spec(spec)
    prefix, _, rest = spec.partition(":")
    bundle = _RESOLVERS[prefix](rest)
    bundle.model.eval()
    return bundle


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run ``model`` on one batch: a tuple is passed positionally, anything else as the single argument."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


__all__ = [
    "ModelBundle", "call_model", "check_spec", "list_builtin_models", "list_model_prefixes",
    "register_builtin_model", "register_model_prefix", "resolve_model",
]
