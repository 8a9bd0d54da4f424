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
    """

    size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.stack([self._one(image) for image in images])

    def _one(self, image: np.ndarray) -> torch.Tensor:
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()
        if array.dtype == np.uint8:
            x = x / 255.0
        if x.shape[0] != self.channels:
            x = x.mean(0, keepdim=True).expand(self.channels, -1, -1) if self.channels in (1, 3) else x
        h, w = x.shape[1:]
        if (h, w) != (self.size, self.size):
            scale = self.resize / min(h, w)
            nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=scale < 1, align_corners=False)[0]
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            x = x[:, top:top + self.size, left:left + self.size]
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return ((x - mean) / std).contiguous()

    def example(self, batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, self.channels, self.size, self.size)


@dataclass
class TextPreprocess:
    """Tokenise sentences to ``(input_ids, attention_mask)`` padded to the longest (at most ``max_length``)."""

    tokenizer: Any
    max_length: int = 128

    def __call__(self, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

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
