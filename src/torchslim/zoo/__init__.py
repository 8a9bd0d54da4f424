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

from torchslim._spec import SpecRegistry


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


def _load() -> None:
    from torchslim.zoo import builtin, hub  # noqa: F401  (registers the resolvers)


_MODELS = SpecRegistry("model", "built-in model", _load)
register_model_prefix = _MODELS.register_prefix  # resolver(rest_of_spec) -> ModelBundle
register_builtin_model = _MODELS.register_builtin  # factory() -> ModelBundle
list_model_prefixes = _MODELS.prefixes
list_builtin_models = _MODELS.builtin_names


def check_spec(spec: str) -> None:
    """Cheap syntactic check of a model spec (no model is built). Raises InputError."""
    _MODELS.check(spec)


def resolve_model(spec: str) -> ModelBundle:
    """Build the model a spec names, in eval mode on the CPU. Raises InputError for a bad spec."""
    bundle = _MODELS.resolve(spec)
    bundle.model.eval()
    return bundle


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run ``model`` on one batch: a tuple is passed positionally, anything else as the single argument."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


__all__ = [
    "ModelBundle", "call_model", "check_spec", "list_builtin_models", "list_model_prefixes",
    "register_builtin_model", "register_model_prefix", "resolve_model",
]
