"""``finetune``: recover accuracy after compression, distilling from the uncompressed model.

The loss mixes knowledge distillation from the teacher (the model before any step) with the hard-label loss:
``alpha * KD(T) + (1 - alpha) * CE``; data without labels trains on the teacher alone. Pruning masks stay
applied throughout, so pruned weights stay zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from torchslim._config import check
from torchslim.errors import InputError
from torchslim.recover.losses import distillation_loss, embedding_distillation_loss
from torchslim.recover.trainer import OptimizerConfig, ScheduleConfig, train
from torchslim.registry import register_method
from torchslim.runtime import TorchDeployable
from torchslim.zoo import call_model


@dataclass
class DistillConfig:
    """Knowledge distillation: ``temperature`` softens both distributions; ``alpha`` weighs KD vs labels."""

    temperature: float = 4.0
    alpha: float = 0.7

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")


@dataclass
class FinetuneConfig:
    """Config of ``finetune: {...}`` (method ``distill``, the default).

    Args:
        epochs: passes over the training split.
        batch_size: training batch size.
        optimizer: a torch.optim optimiser (sgd, adamw, adam) and its settings.
        schedule: warm-up + cosine (default) or constant learning rate.
        distill: distillation settings; ``null`` trains on labels alone.
        label_smoothing: of the hard-label cross-entropy.
        grad_clip: clip the gradient norm to this (0: off).
    """

    epochs: int = 3
    batch_size: int = 64
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="sgd", lr=0.01))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distill: DistillConfig | None = field(default_factory=DistillConfig)
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    version: int = 1

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")


def _make_loss(context, config: FinetuneConfig):
    teacher, distill = context.teacher, config.distill
    labelled = context.data.has_labels and context.bundle.task == "classification"
    if distill is None and not labelled:
        raise InputError(f"{context.where}.distill: the data has no labels, so fine-tuning needs distillation")
    alpha = 1.0 if not labelled else (distill.alpha if distill else 0.0)

    def loss_fn(outputs, inputs, labels):
        loss = outputs.new_zeros(())
        if alpha > 0:
            with torch.no_grad():
                target = call_model(teacher, inputs)
            if context.bundle.task == "embedding":
                loss = loss + alpha * embedding_distillation_loss(outputs, target)
            else:
                loss = loss + alpha * distillation_loss(outputs, target, distill.temperature)
        if alpha < 1:
            loss = loss + (1 - alpha) * F.cross_entropy(outputs, labels, label_smoothing=config.label_smoothing)
        return loss

    return loss_fn


@register_method("finetune", "distill", FinetuneConfig)
def finetune(context, config: FinetuneConfig) -> TorchDeployable:
    """Fine-tune ``context.model`` in place; returns it with the per-epoch training loss in ``details``."""
    torch.manual_seed(context.seed)
    loss_fn = _make_loss(context, config)
    steps = math.ceil(len(context.data.splits["train"]) / config.batch_size)

    def batches(epoch: int):
        return context.data.batches("train", context.bundle.preprocess, config.batch_size, shuffle=True,
                                    seed=context.seed * 1000 + epoch)

    def keep_pruned_zeros() -> None:
        if context.masks:
            parameters = dict(context.model.named_parameters())
            with torch.no_grad():
                for name, mask in context.masks.items():
                    parameters[name].mul_(mask)

    history = train(context.model, batches, loss_fn, epochs=config.epochs, steps_per_epoch=steps,
                    optimizer=config.optimizer, schedule=config.schedule, grad_clip=config.grad_clip,
                    after_step=keep_pruned_zeros, description=context.where, progress=context.progress)
    return TorchDeployable(context.model, details={"train_loss": [round(x, 5) for x in history]})
