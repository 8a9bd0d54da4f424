"""Turning raw samples (images as HWC arrays, sentences as strings) into a model's input batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ImagePreprocess:
    """Resize the shorter side to ``resize``, centre-crop ``size``, adapt channels, normalise.

    Raw images are HxWxC arrays: uint8 in [0, 255] or float in [0, 1]. Grey images are repeated to 3 channels
    (and RGB averaged to grey) to match ``channels``. Output: float32 NCHW ``(x - mean) / std`` with x in [0, 1].
    ``interpolation`` is "bilinear" or "bicubic" (antialiased when shrinking) or "nearest".

    ``pixel_grid``: a uint8 image stays on the 8-bit grid after resizing and channel averaging (values rounded to
    k / 255), as PIL, OpenCV and torchvision resize uint8 images: the model sees what a deployed pipeline feeds
    it, and an int8 model's first layer, whose input is quantized to 256 levels, can represent it exactly.
    Off the grid, the fp32 reference reads sub-pixel detail no camera pipeline delivers (measured on
    EfficientNet-Lite0 and builtin:images: rounding those inputs to 8 bits alone changes 7.7% of its top-1
    predictions).
    """

    size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    interpolation: str = "bilinear"
    pixel_grid: bool = True

    def describe(self) -> dict:
        """What this preprocessing does, as plain JSON (for artifacts' metadata)."""
        return {"kind": "image", "resize_shorter_side": self.resize, "center_crop": self.size,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std),
                "channels": self.channels, "pixel_scale": "x / 255, then (x - mean) / std", "layout": "NCHW",
                "pixel_grid": ("uint8 images rounded to the 8-bit grid after resizing" if self.pixel_grid
                               else "resized values kept as computed")}

    def overridden(self, overrides: dict) -> ImagePreprocess:
        """A copy with a `torchslim.zoo.config.ModelConfig`'s image overrides applied."""
        from dataclasses import replace

        size = overrides.get("input_size", self.size)
        crop = overrides.get("crop_pct", self.size / self.resize)
        mean, std = overrides.get("mean", self.mean), overrides.get("std", self.std)
        interpolation = overrides.get("interpolation", self.interpolation)
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            interpolation = "bicubic"  # torch resizes have no lanczos/box/hamming filter: the closest one
        return replace(self, size=size, resize=round(size / crop), mean=tuple(mean), std=tuple(std),
                       interpolation=interpolation)

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.stack([self._one(image) for image in images])

    def _one(self, image: np.ndarray) -> torch.Tensor:
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        # a copy: a decoded image is often a read-only view (PIL), which torch.from_numpy warns about
        x = torch.from_numpy(np.array(array, copy=True, order="C")).permute(2, 0, 1).float()
        if array.dtype == np.uint8:
            x = x / 255.0
        if x.shape[0] != self.channels:
            x = x.mean(0, keepdim=True).expand(self.channels, -1, -1) if self.channels in (1, 3) else x
        h, w = x.shape[1:]
        if (h, w) != (self.size, self.size):
            scale = self.resize / min(h, w)
            nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            smooth = self.interpolation != "nearest"
            x = F.interpolate(x[None], size=(nh, nw), mode=self.interpolation, antialias=smooth and scale < 1,
                              align_corners=False if smooth else None)[0]
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            x = x[:, top:top + self.size, left:left + self.size]
        if array.dtype == np.uint8 and self.pixel_grid:
            x = torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return ((x - mean) / std).contiguous()

    def example(self, batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, self.channels, self.size, self.size)


@dataclass
class TransformPreprocess:
    """Images through the model's own transform (torchvision weights' ``transforms()``, timm's
    ``create_transform``), applied to PIL images exactly as those libraries' data loaders do.

    Args:
        transform: PIL image -> CHW float tensor.
        size: the output side (for example inputs).
        settings: what the transform does, as plain JSON (see `describe`).
        channels: input channels of the model.
    """

    transform: Any
    size: int
    settings: dict
    channels: int = 3

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        return torch.stack([self.transform(to_pil(image)) for image in images])

    def describe(self) -> dict:
        return {"kind": "image", **self.settings, "channels": self.channels, "layout": "NCHW"}

    def example(self, batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, self.channels, self.size, self.size)


def to_pil(image: Any):
    """A raw image (PIL, or an HxW(xC) array: uint8, or float in [0, 1]) as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array).convert("RGB")


@dataclass
class TextPreprocess:
    """Tokenise sentences (or sentence pairs) to ``(input_ids, attention_mask)``, padded to the longest and
    truncated at ``max_length`` tokens."""

    tokenizer: Any
    max_length: int = 128

    def __call__(self, sentences: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        items = list(sentences)
        pairs = bool(items) and isinstance(items[0], (tuple, list))
        first = [s[0] for s in items] if pairs else items
        second = [s[1] for s in items] if pairs else None
        encoded = self.tokenizer(first, second, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    def describe(self) -> dict:
        return {"kind": "text", "max_length": self.max_length, "padding": "longest", "truncation": True,
                "inputs": ["input_ids", "attention_mask"]}

    def example(self, batch_size: int, sequence_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        vocab = int(getattr(self.tokenizer, "vocab_size", 1000))
        ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch_size, sequence_length), generator=generator)
        return ids, torch.ones_like(ids)


@dataclass
class TensorPreprocess:
    """Stack raw tensors/arrays into a batch (for `file:` models fed with tensors)."""

    shape: tuple[int, ...]

    def __call__(self, samples: Sequence[Any]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in samples])

    def example(self, batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, *self.shape)
