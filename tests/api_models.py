"""Three small models that between them give every registered method something to change (see test_api.py):
a CNN (convolutions, batch norm, linear head), a transformer classifier over token ids (embedding, attention and
MLP linear layers) and a click model with large embedding-bag tables, each with a DataLoader of its batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Block(nn.Module):
    """Pre-norm attention (separate q/k/v/o projections) and an MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attended.transpose(1, 2).reshape(b, t, w))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Token ids [batch, tokens] -> class logits [batch, classes] (mean over tokens)."""

    def __init__(self, vocab: int = 300, width: int = 64, layers: int = 2, heads: int = 4, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


class ClickModel(nn.Module):
    """Dense features and one id per table -> one click logit per row (a small DLRM-like model)."""

    def __init__(self, rows: tuple[int, ...] = (12000, 1024, 512), dim: int = 16, dense: int = 4):
        super().__init__()
        self.bags = nn.ModuleList(nn.EmbeddingBag(r, dim, mode="sum") for r in rows)
        self.bottom = nn.Linear(dense, dim)
        self.top = nn.Sequential(nn.Linear(dim * (len(rows) + 1), 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        pooled = [bag(ids[:, t:t + 1]) for t, bag in enumerate(self.bags)]
        return self.top(torch.cat([self.bottom(dense), *pooled], dim=1)).squeeze(-1)


@dataclass
class Case:
    """A model, the batches to give `torchslim.apply`, and one input batch to compare outputs on."""

    name: str
    model: nn.Module
    data: DataLoader
    inputs: Any
    task: str = "classification"

    def fresh(self) -> nn.Module:
        """A new instance of the model's class, with other weights (`torchslim.load` replaces them)."""
        torch.manual_seed(123)
        return type(self.model)().eval()


def cnn_case() -> Case:
    torch.manual_seed(0)
    images, labels = torch.randn(96, 3, 16, 16), torch.randint(0, 4, (96,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=32)
    return Case("cnn", SmallCNN().eval(), loader, images[:8])


def transformer_case() -> Case:
    torch.manual_seed(0)
    ids, labels = torch.randint(0, 300, (64, 16)), torch.randint(0, 4, (64,))
    return Case("transformer", TinyTransformer().eval(), DataLoader(TensorDataset(ids, labels), batch_size=16),
                ids[:8])


def click_case() -> Case:
    torch.manual_seed(0)
    dense = torch.randn(512, 4)
    ids = torch.stack([torch.randint(0, r, (512,)) for r in (12000, 1024, 512)], dim=1)
    batches = [((dense[i:i + 128], ids[i:i + 128]), None) for i in range(0, 512, 128)]
    return Case("clicks", ClickModel().eval(), batches, (dense[:8], ids[:8]), task="ctr")


CASES = (cnn_case, transformer_case, click_case)
