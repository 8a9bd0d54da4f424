"""``builtin:digits-mlp``: a LeNet-300-100-style MLP for scikit-learn's 8x8 digits (64 -> 300 -> 100 -> 10).

The model Deep Compression compressed 40x (there on 28x28 MNIST): three fully connected layers with ReLU, about
50 k weights. It takes the same image batches as every ``builtin:digits`` model (1x8x8, normalised) and flattens
them itself, so the data needs no other preprocessing. Trained once (seeded; about 20 s on one core) with
`torchslim.recover.trainer.Trainer` and cached as safetensors.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._cache import cache_dir
from torchslim.zoo.preprocess import ImagePreprocess

VERSION = 1
PREPROCESS = ImagePreprocess(size=8, resize=8, mean=(0.3,), std=(0.4,), channels=1)
WIDTHS = (300, 100)


class DigitsMLP(nn.Module):
    """Flatten 1x8x8 -> fc1 (300) -> ReLU -> fc2 (100) -> ReLU -> fc3 (classes)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int] = WIDTHS, inputs: int = 64):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(inputs, widths[0])
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(widths[0], widths[1])
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(widths[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(self.flatten(x))))))


def train_digits_mlp(seed: int = 0, epochs: int = 60, progress: bool = True) -> tuple[DigitsMLP, dict]:
    """Train a DigitsMLP on builtin:digits (train split), report validation accuracy; deterministic for a seed."""
    from torchslim.data import resolve_data
    from torchslim.recover.trainer import (OptimizerConfig, ScheduleConfig, SplitDataset, TrainConfig, Trainer,
                                           batch_collate)

    torch.manual_seed(seed)
    data = resolve_data("builtin:digits", seed)
    model = DigitsMLP()

    def loss_fn(outputs, inputs, labels):
        return {"cross_entropy": F.cross_entropy(outputs, labels, label_smoothing=0.05)}

    config = TrainConfig(epochs=epochs, batch_size=64, device="cpu",
                         optimizer=OptimizerConfig(name="sgd", lr=0.05, weight_decay=5e-4),
                         schedule=ScheduleConfig(name="cosine", warmup_fraction=0.05))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches this small train fastest on one thread (more only add synchronisation)
    try:
        Trainer(model, loss_fn, SplitDataset(data.splits["train"], data.labels["train"]),
                batch_collate(PREPROCESS, labelled=True), config, seed=seed,
                description="training builtin:digits-mlp (once, then cached)", progress=progress).fit()
    finally:
        torch.set_num_threads(threads)
    correct = total = 0
    with torch.inference_mode():
        for inputs, labels in data.batches("val", PREPROCESS, 256):
            correct += int((model(inputs).argmax(1) == labels).sum())
            total += len(labels)
    return model, {"val_accuracy": correct / total, "epochs": epochs, "seed": seed, "version": VERSION}


def load_digits_mlp(progress: bool = True) -> DigitsMLP:
    """The cached trained model (trained and cached on first use)."""
    from safetensors.torch import load_file, save_file

    path = cache_dir("models") / f"digits-mlp-v{VERSION}.safetensors"
    model = DigitsMLP()
    if path.exists():
        model.load_state_dict(load_file(path))
    else:
        model, info = train_digits_mlp(progress=progress)
        tmp = path.with_suffix(".tmp")
        save_file(model.state_dict(), tmp, metadata={"torchslim": json.dumps(info)})
        tmp.replace(path)
    return model.eval()
