"""Shared fixtures: a tiny registered model so pipeline tests run in seconds, and an isolated output folder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.zoo import ModelBundle, register_builtin_model
from torchslim.zoo.preprocess import ImagePreprocess

TINY_PREPROCESS = ImagePreprocess(size=16, resize=16, mean=(0.3,), std=(0.4,), channels=1)


class TinyCNN(nn.Module):
    """Conv-BN-ReLU, a residual conv, pooling and a classifier: every layer kind the first methods touch."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.conv2(y) + y)
        return self.fc(self.pool(y).flatten(1))


def tiny_bundle() -> ModelBundle:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    return ModelBundle(model=model, spec="builtin:tiny-test-cnn", task="classification", modality="image",
                       preprocess=TINY_PREPROCESS, example_inputs=TINY_PREPROCESS.example)


register_builtin_model("tiny-test-cnn")(tiny_bundle)


# Every test starts with torch on one intra-op thread. The models here are tiny, so a second thread gains little on
# an idle machine, while on a shared one two OpenMP threads spin against the other load: on two cores under load
# 3-6, a tiny GPT-2 decoded 40x slower on two threads than on one, and the default suite took 16:45 instead of
# about 5:15. A recipe run sets its own count (measure.threads, 0: every core; the shared test recipes say 1) and
# leaves it set, so the count is reset before each test, not merely restored after it.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_threads():
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


TINY_RECIPE = {
    "model": "builtin:tiny-test-cnn",
    "data": "builtin:digits",
    "steps": [
        {"prune": {"method": "magnitude", "sparsity": 0.5}},
        {"finetune": {"epochs": 1, "batch_size": 128, "optimizer": {"name": "adamw", "lr": 0.003}}},
        {"quantize": {"method": "int8-static", "calibration": {"samples": 64}}},
    ],
    "measure": {"batch_size": 32, "warmup": 1, "repeats": 3, "max_eval_samples": 128, "threads": 1},
}
