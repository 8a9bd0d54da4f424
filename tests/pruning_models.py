"""Small models with the structures structured pruning must handle: grouped convolutions inside residual blocks,
channel split/concat/shuffle, squeeze-excite gates, transposed convolutions, GroupNorm, several inputs and
outputs that are tuples, dicts or dataclasses. Shared by the tests and benchmarks/pruning_coverage.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class GroupedBlock(nn.Module):
    """ResNeXt/RegNet bottleneck: 1x1 -> grouped 3x3 -> squeeze-excite -> 1x1, added to the stream."""

    def __init__(self, channels: int, width: int, groups: int):
        super().__init__()
        self.reduce = conv_bn(channels, width)
        self.grouped = conv_bn(width, width, 3, groups)
        self.se = SqueezeExcite(width, width // 4)
        self.expand = conv_bn(width, channels)

    def forward(self, x):
        y = F.relu(self.grouped(F.relu(self.reduce(x))))
        return F.relu(x + self.expand(self.se(y)))


class SplitShuffleBlock(nn.Module):
    """ShuffleNet-style: half the channels pass, the other half goes through a branch, concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(conv_bn(half, half), nn.ReLU(), conv_bn(half, half, 3, groups=half),
                                    conv_bn(half, half), nn.ReLU())

    def forward(self, x):
        keep, work = x.chunk(2, dim=1)
        y = torch.cat([keep, self.branch(work)], dim=1)
        b, c, h, w = y.shape
        return y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


class GroupedResNet(nn.Module):
    """A small CNN of grouped residual blocks with squeeze-excite gates and a split/shuffle block."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 32, 3), nn.ReLU())
        self.blocks = nn.Sequential(GroupedBlock(32, 64, 8), GroupedBlock(32, 64, 8), SplitShuffleBlock(32),
                                    GroupedBlock(32, 96, 4))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _stage(cin: int, cout: int, group_norm: bool) -> nn.Sequential:
    norm = (lambda c: nn.GroupNorm(4, c)) if group_norm else nn.BatchNorm2d
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), norm(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), norm(cout), nn.ReLU())


class UNet(nn.Module):
    """A two-level U-Net: GroupNorm (or BatchNorm) stages, transposed-convolution upsampling (one of them grouped) and skip
    concatenations; the output keeps its ``classes`` channels."""

    def __init__(self, classes: int = 2, width: int = 16, group_norm: bool = True):
        super().__init__()
        g = group_norm
        self.enc1, self.enc2, self.mid = _stage(3, width, g), _stage(width, 2 * width, g), _stage(2 * width, 4 * width, g)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2, groups=2)
        self.dec2 = _stage(4 * width, 2 * width, g)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = _stage(2 * width, width, g)
        self.out = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        return self.out(self.dec1(torch.cat([self.up1(d2), e1], 1)))


class Transposed1d3d(nn.Module):
    """ConvTranspose1d and ConvTranspose3d (grouped) between ordinary convolutions; two outputs as a tuple."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 3, padding=1)
        self.t1 = nn.ConvTranspose1d(16, 12, 4, stride=2, padding=1)
        self.o1 = nn.Conv1d(12, 3, 1)
        self.c3 = nn.Conv3d(2, 8, 3, padding=1)
        self.t3 = nn.ConvTranspose3d(8, 12, 2, stride=2, groups=4)
        self.o3 = nn.Conv3d(12, 1, 1)

    def forward(self, signal, volume):
        a = self.o1(F.relu(self.t1(F.relu(self.c1(signal)))))
        b = self.o3(F.relu(self.t3(F.relu(self.c3(volume)))))
        return a, b


@dataclass
class TwoHeadsOutput:
    logits: torch.Tensor
    features: dict


class MultiInputNet(nn.Module):
    """An image and a vector of extra features in; a dataclass out holding logits and a dict of tensors (one
    of them a tuple); the image and vector branches meet in a concatenation."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                   nn.Conv2d(24, 32, 3, padding=1, stride=2), nn.ReLU())
        self.vector = nn.Sequential(nn.Linear(7, 32), nn.ReLU(), nn.Linear(32, 16))
        self.mix = nn.Sequential(nn.Linear(48, 64), nn.ReLU())
        self.logits = nn.Linear(64, classes)
        self.box = nn.Linear(64, 4)

    def forward(self, image, extra):
        pooled = self.image(image).mean((2, 3))
        mixed = self.mix(torch.cat([pooled, F.relu(self.vector(extra))], 1))
        return TwoHeadsOutput(self.logits(mixed), {"box": self.box(mixed), "both": (pooled.sum(1), mixed.sum(1))})


COVERAGE_MODELS = {  # name -> (build, example inputs)
    "grouped-conv residual (ResNeXt/SE/shuffle)": (GroupedResNet, lambda: torch.randn(2, 3, 32, 32)),
    "U-Net (transposed convs, GroupNorm)": (UNet, lambda: torch.randn(2, 3, 32, 32)),
    "ConvTranspose1d/3d, tuple output, 2 inputs": (
        Transposed1d3d, lambda: (torch.randn(2, 4, 16), torch.randn(2, 2, 4, 4, 4))),
    "dataclass/dict output, 2 inputs": (MultiInputNet, lambda: (torch.randn(2, 3, 16, 16), torch.randn(2, 7))),
}
