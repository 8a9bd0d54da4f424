"""The recipe's ``model:`` entry: a spec string, or a mapping with local weights and preprocessing overrides.

    model: timm:resnet50                                         # the string form
    model: {spec: timm:resnet50, checkpoint: weights/resnet50.safetensors, input_size: 288, interpolation: bicubic}
    model: {spec: hf:models/my-llm, max_length: 512}

Preprocessing comes from the model's own source (torchvision weights' ``transforms()``, timm's data config, a
Hugging Face tokenizer or image processor); the fields here override it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torchslim._config import check

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class ModelConfig:
    """A model spec with local weights and preprocessing overrides.

    Args:
        spec: the model spec, e.g. ``torchvision:resnet50``, ``timm:convnext_tiny``, ``hf:path/to/folder``.
        checkpoint: a local weights file loaded into the model (``.safetensors``, or a PyTorch file read with
            ``torch.load(weights_only=True)``; a ``state_dict``/``model`` entry and ``module.`` prefixes are unwrapped).
        input_size: the image side the model sees (the centre crop).
        crop_pct: the crop's fraction of the resized image (resize = input_size / crop_pct).
        mean: per-channel normalisation mean (of pixels in [0, 1]).
        std: per-channel normalisation standard deviation.
        interpolation: the resize filter.
        max_length: the most tokens of a text sample the model sees (its context length for language models).
        num_classes: build the classifier head for this many classes (torchvision, timm; a new, untrained head
            unless ``checkpoint`` holds one).
    """

    spec: str
    checkpoint: str | None = None
    input_size: int | None = None
    crop_pct: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] | None = None
    max_length: int | None = None
    num_classes: int | None = None
    version: int = 1

    def __post_init__(self) -> None:
        check(bool(self.spec), "spec", "required, e.g. torchvision:resnet18")
        check(self.input_size is None or 8 <= self.input_size <= 4096, "input_size",
              f"must be in [8, 4096], got {self.input_size}")
        check(self.crop_pct is None or 0.1 <= self.crop_pct <= 1.0, "crop_pct",
              f"must be in [0.1, 1], got {self.crop_pct}")
        check(self.num_classes is None or self.num_classes >= 1, "num_classes",
              f"must be >= 1, got {self.num_classes}")
        check(self.max_length is None or self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            check(values is None or len(values) in (1, 3), name, f"expected 1 or 3 values, got {values}")
        check(self.std is None or all(v > 0 for v in self.std), "std", f"must be > 0, got {self.std}")

    def __str__(self) -> str:
        return self.spec

    @property
    def image_overrides(self) -> dict:
        """The image preprocessing fields set (name -> value)."""
        names = ("input_size", "crop_pct", "mean", "std", "interpolation")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def to_recipe(self) -> str | dict:
        """The recipe form: the plain spec string when nothing but the spec is set."""
        from torchslim._config import to_dict

        plain = to_dict(self)
        return self.spec if plain == to_dict(ModelConfig(spec=self.spec)) else plain


def as_model_config(value) -> ModelConfig:
    """A `ModelConfig` from a spec string or a `ModelConfig`."""
    return value if isinstance(value, ModelConfig) else ModelConfig(spec=str(value))
