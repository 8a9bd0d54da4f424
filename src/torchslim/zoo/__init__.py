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

from torch import nn

from torchslim._spec import SpecRegistry
from torchslim.core.modules import call_model  # noqa: F401  (re-exported: the model-spec helpers' caller)


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
        origin: the library the model comes from ("transformers", "torchvision", "timm", "torchslim", "file"),
            which picks the artifacts other tools load (see `torchslim.export`).
        source: where it was loaded from (a Hugging Face folder, a checkpoint), or None.
    """

    model: nn.Module
    spec: str
    task: str
    modality: str
    preprocess: Callable[[Any], Any]
    example_inputs: Callable[[int], Any]
    notes: list[str] = field(default_factory=list)
    origin: str = "torchslim"
    source: str | None = None


def _load() -> None:
    from torchslim.zoo import builtin, hub, vision  # noqa: F401  (registers the resolvers)


_MODELS = SpecRegistry("model", "built-in model", _load)
register_model_prefix = _MODELS.register_prefix  # resolver(rest_of_spec) -> ModelBundle
register_builtin_model = _MODELS.register_builtin  # factory() -> ModelBundle
list_model_prefixes = _MODELS.prefixes
list_builtin_models = _MODELS.builtin_names


def check_spec(spec) -> None:
    """Cheap syntactic check of a model spec or `torchslim.zoo.config.ModelConfig` (no model is built).
    Raises InputError."""
    from torchslim.zoo.config import as_model_config

    _MODELS.check(as_model_config(spec).spec)


def resolve_model(spec) -> ModelBundle:
    """Build the model a spec (a string or a `torchslim.zoo.config.ModelConfig`) names, in eval mode on the CPU,
    with the config's checkpoint and preprocessing overrides applied. Raises InputError for a bad spec."""
    from torchslim.zoo.config import as_model_config

    config = as_model_config(spec)
    bundle = _MODELS.resolve(config.spec, config=config)
    if not _MODELS.accepts_options(config.spec):
        _apply_options(bundle, config)
    bundle.model.eval()
    return bundle


def _apply_options(bundle: ModelBundle, config) -> None:
    """A `ModelConfig`'s checkpoint and overrides, for resolvers that do not read it themselves (builtins,
    plugins): weights are loaded strictly, overrides apply to torchslim's own image and text preprocessing."""
    from dataclasses import replace

    from torchslim.errors import InputError
    from torchslim.zoo.preprocess import ImagePreprocess, TextPreprocess

    if config.checkpoint:
        from torchslim.zoo.vision import load_checkpoint

        load_checkpoint(bundle.model, config.checkpoint, f"model: {config.spec}")
        bundle.notes.append(f"{config.spec}: weights from {config.checkpoint}")
    if config.num_classes is not None:
        raise InputError(f"model: {config.spec}: num_classes applies to torchvision: and timm: models only")
    overrides = config.image_overrides
    if overrides and isinstance(bundle.preprocess, ImagePreprocess):
        bundle.preprocess = bundle.preprocess.overridden(overrides)
        bundle.example_inputs = bundle.preprocess.example
    elif overrides:
        raise InputError(f"model: {config.spec}: {', '.join(overrides)}: this model's preprocessing is not "
                         f"an image resize/crop/normalise to override")
    if config.max_length is not None:
        if not isinstance(bundle.preprocess, TextPreprocess):
            raise InputError(f"model: {config.spec}: max_length applies to text models only")
        bundle.preprocess = replace(bundle.preprocess, max_length=config.max_length)


__all__ = [
    "ModelBundle", "call_model", "check_spec", "list_builtin_models", "list_model_prefixes",
    "register_builtin_model", "register_model_prefix", "resolve_model",
]
