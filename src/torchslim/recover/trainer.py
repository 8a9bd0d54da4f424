"""One small training loop shared by every step that trains (built-in model training, fine-tuning with
distillation). Optimisers and schedules come from torch.optim; nothing here re-implements them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

from torchslim._config import check
from torchslim.zoo import call_model


@dataclass
class OptimizerConfig:
    """A torch.optim optimiser. Norm weights and biases get no weight decay.

    Args:
        name: "sgd" (momentum, optionally Nesterov), "adamw" or "adam".
        lr: peak learning rate (after warm-up).
        weight_decay: decoupled (AdamW) or L2 (SGD) decay on weights of rank >= 2.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
    """

    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up for ``warmup_fraction`` of the steps, then cosine or constant."""

    name: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = 0.0

    def __post_init__(self) -> None:
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")


def make_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.Adam(groups, lr=config.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = int(config.warmup_fraction * total_steps)
    main_steps = max(1, total_steps - warmup)
    if config.name == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps)
    else:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


LossFn = Callable[[torch.Tensor, Any, "torch.Tensor | None"], torch.Tensor]


def train(model: nn.Module, batches: Callable[[int], Iterable[tuple[Any, torch.Tensor | None]]], loss_fn: LossFn,
          *, epochs: int, steps_per_epoch: int, optimizer: OptimizerConfig, schedule: ScheduleConfig | None = None,
          grad_clip: float = 0.0, after_step: Callable[[], None] | None = None,
          description: str = "train", progress: bool = True) -> list[float]:
    """Train ``model`` in place; returns the mean loss of each epoch.

    Args:
        batches: epoch index -> iterable of ``(inputs, labels)`` (a fresh shuffle per epoch).
        loss_fn: ``(outputs, inputs, labels) -> scalar loss``.
        steps_per_epoch: number of batches ``batches`` yields (sizes the schedule and progress bar).
        after_step: called after every optimiser step (e.g. to re-apply pruning masks).
    """
    from tqdm.auto import tqdm

    opt = make_optimizer(model, optimizer)
    scheduler = make_scheduler(opt, schedule or ScheduleConfig(), epochs * steps_per_epoch)
    history = []
    model.train()
    # disable=None: tqdm shows the bar on a terminal and stays silent in logs.
    bar = tqdm(total=epochs * steps_per_epoch, desc=description, disable=None if progress else True, leave=False,
               unit="step")
    for epoch in range(epochs):
        total, count = 0.0, 0
        for inputs, labels in batches(epoch):
            loss = loss_fn(call_model(model, inputs), inputs, labels)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{description}: loss became {loss.item()} at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            total, count = total + loss.item(), count + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / count:.4f}")
        history.append(total / max(count, 1))
    bar.close()
    model.eval()
    return history
