"""``builtin:digits-cnn``: a small residual CNN for scikit-learn's digits, upscaled to 32x32.

About 0.7 M parameters and 0.11 GMACs per image: enough compute that latency at the measured batch sizes is
dominated by convolutions, not by framework overhead. Trained once (seeded; about four minutes on the 2-core
development machine) and cached as safetensors.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._cache import cache_dir
from torchslim.zoo.preprocess import ImagePreprocess

VERSION = 2  # 2: trained by recover.trainer.Trainer (DistributedSampler data order)
PREPROCESS = ImagePreprocess(size=32, resize=32, mean=(0.3,), std=(0.4,), channels=1)
WIDTHS = (24, 48, 96)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a (projected when the shape changes) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class DigitsCNN(nn.Module):
    """Stem, three stages of two residual blocks (32, 64, 128 channels), global pooling, a linear classifier."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = WIDTHS):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths):
            blocks += [ResidualBlock(channels, width, 1 if stage == 0 else 2), ResidualBlock(width, width)]
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift (up to 3 px), scale (+-10%) and rotation (+-10 degrees) per image."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * (2 * math.pi / 18)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (6 / 16)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background


def train_digits_cnn(seed: int = 0, epochs: int = 30, progress: bool = True) -> tuple[DigitsCNN, dict]:
    """Train a DigitsCNN on builtin:digits (train split), report validation accuracy; deterministic for a seed."""
    from torchslim.data import resolve_data
    from torchslim.recover.trainer import (OptimizerConfig, ScheduleConfig, SplitDataset, TrainConfig, Trainer,
                                           batch_collate)

    torch.manual_seed(seed)
    data = resolve_data("builtin:digits", seed)
    model = DigitsCNN()
    generator = torch.Generator().manual_seed(seed)
    plain = batch_collate(PREPROCESS, labelled=True)

    def augmented(items):
        inputs, labels = plain(items)
        return augment(inputs, generator), labels

    def loss_fn(outputs, inputs, labels):
        return {"cross_entropy": F.cross_entropy(outputs, labels, label_smoothing=0.05)}

    config = TrainConfig(epochs=epochs, batch_size=64, optimizer=OptimizerConfig(name="sgd", lr=0.1, weight_decay=5e-4),
                         schedule=ScheduleConfig(name="cosine", warmup_fraction=0.05), device="cpu")
    Trainer(model, loss_fn, SplitDataset(data.splits["train"], data.labels["train"]), augmented, config, seed=seed,
            description="training builtin:digits-cnn (once, then cached)", progress=progress).fit()
    correct = total = 0
    with torch.inference_mode():
        for inputs, labels in data.batches("val", PREPROCESS, 256):
            correct += int((model(inputs).argmax(1) == labels).sum())
            total += len(labels)
    return model, {"val_accuracy": correct / total, "epochs": epochs, "seed": seed, "version": VERSION}


def load_digits_cnn(progress: bool = True) -> DigitsCNN:
    """The cached trained model (trained and cached on first use)."""
    from safetensors.torch import load_file, save_file

    path = cache_dir("models") / f"digits-cnn-v{VERSION}.safetensors"
    model = DigitsCNN()
    if path.exists():
        model.load_state_dict(load_file(path))
    else:
        model, info = train_digits_cnn(progress=progress)
        tmp = path.with_suffix(".tmp")
        save_file(model.state_dict(), tmp, metadata={"torchslim": json.dumps(info)})
        tmp.replace(path)
    return model.eval()
