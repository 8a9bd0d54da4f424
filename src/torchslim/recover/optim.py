"""Optimisers and learning-rate schedules for every training step, built from torch.optim.

Nothing here re-implements an optimiser or a schedule: a config names a ``torch.optim`` class (any of those it
ships) and a ``torch.optim.lr_scheduler`` composition; this module only builds the parameter groups
(weight-decay exclusions for norms and biases, per-group learning rates) and converts epochs into steps.

Example:
    >>> opt = make_optimizer(model, OptimizerConfig(name="adamw", lr=1e-3,
    ...                      groups=[ParamGroupConfig(pattern="classifier.*", lr_scale=10.0)]))
    >>> sched = make_scheduler(opt, ScheduleConfig(name="onecycle"), total_steps=1000, steps_per_epoch=100)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from torchslim._config import FieldError, check
from torchslim.core.modules import matches


def optimizer_names() -> dict[str, type]:
    """Lower-case name -> every optimiser class torch.optim ships (sgd, adamw, adam, rmsprop, nadam, ...)."""
    return {name.lower(): cls for name, cls in vars(torch.optim).items()
            if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer}


@dataclass
class ParamGroupConfig:
    """Parameters whose names match ``pattern`` (fnmatch) get their own learning rate and/or weight decay.

    Args:
        pattern: e.g. ``"classifier.*"`` or ``"*.embeddings.*"``; the first matching group wins.
        lr_scale: multiplies the optimiser's ``lr`` (and the schedule follows it).
        weight_decay: overrides the decay of matching weights (null: the optimiser's).
    """

    pattern: str = "*"
    lr_scale: float = 1.0
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        check(self.lr_scale > 0, "lr_scale", f"must be > 0, got {self.lr_scale}")
        check(self.weight_decay is None or self.weight_decay >= 0, "weight_decay",
              f"must be >= 0, got {self.weight_decay}")


@dataclass
class OptimizerConfig:
    """A torch.optim optimiser. Norm weights and biases (parameters of rank < 2) get no weight decay.

    Args:
        name: any optimiser torch.optim ships, lower case: "sgd", "adamw", "adam", "rmsprop", "nadam", ...
        lr: peak learning rate (after warm-up).
        weight_decay: decay on weights of rank >= 2 (decoupled for AdamW, L2 for the others).
        momentum: SGD/RMSprop momentum.
        nesterov: Nesterov momentum for SGD.
        groups: per-parameter-group learning-rate scales and weight decays.
        options: further keyword arguments of the optimiser (e.g. ``betas: [0.9, 0.98]``, ``eps``).
    """

    name: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    groups: list[ParamGroupConfig] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = optimizer_names()
        check(self.name.lower() in known, "name",
              f"unknown optimiser {self.name!r} (torch.optim ships: {', '.join(sorted(known))})")
        self.name = self.name.lower()
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        accepted = set(inspect.signature(known[self.name]).parameters) - {"params"}
        for key in self.options:
            check(key in accepted, f"options.{key}",
                  f"not an argument of torch.optim.{known[self.name].__name__} (it takes {', '.join(sorted(accepted))})")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over the optimiser steps of the whole run (torch.optim.lr_scheduler).

    Args:
        name: "cosine" (to ``min_lr_ratio`` x lr), "onecycle" (OneCycleLR; its own warm-up is
            ``warmup_fraction``, default 0.3 when 0), "step" (x ``gamma`` every ``step_epochs``), "constant".
        warmup_fraction: linear warm-up over this fraction of the steps (cosine, step, constant).
        min_lr_ratio: the cosine schedule's final learning rate as a fraction of the peak.
        step_epochs: epochs between decays of the step schedule.
        gamma: the step schedule's decay factor.
    """

    name: Literal["cosine", "onecycle", "step", "constant"] = "cosine"
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.0
    step_epochs: int = 1
    gamma: float = 0.1

    def __post_init__(self) -> None:
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.step_epochs >= 1, "step_epochs", f"must be >= 1, got {self.step_epochs}")
        check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")


def parameter_groups(named: list[tuple[str, nn.Parameter]], config: OptimizerConfig) -> list[dict]:
    """Split trainable parameters into optimiser groups: per matching `ParamGroupConfig`, decayed or not."""
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        index = next((i for i, g in enumerate(config.groups) if matches(name, [g.pattern])), -1)
        buckets.setdefault((index, param.ndim >= 2), []).append(param)
    groups = []
    for (index, decayed), params in sorted(buckets.items(), key=lambda item: item[0]):
        spec = config.groups[index] if index >= 0 else ParamGroupConfig()
        decay = config.weight_decay if spec.weight_decay is None else spec.weight_decay
        groups.append({"params": params, "lr": config.lr * spec.lr_scale, "weight_decay": decay if decayed else 0.0,
                       "group": spec.pattern if index >= 0 else "default", "decayed": decayed})
    return groups


def make_optimizer(model: nn.Module | list[tuple[str, nn.Parameter]], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimiser ``config`` names over ``model``'s trainable parameters (or explicit named parameters)."""
    named = list(model.named_parameters()) if isinstance(model, nn.Module) else model
    cls = optimizer_names()[config.name]
    accepted = inspect.signature(cls).parameters
    kwargs = dict(config.options)
    if "momentum" in accepted and config.name in ("sgd", "rmsprop"):
        kwargs.setdefault("momentum", config.momentum)
    if config.name == "sgd":
        kwargs.setdefault("nesterov", config.nesterov and config.momentum > 0)
    groups = parameter_groups(named, config)
    if not groups:
        raise FieldError("optimizer", "the model has no trainable parameters")
    try:
        return cls(groups, lr=config.lr, **kwargs)
    except (TypeError, ValueError) as error:
        raise FieldError("optimizer.options", str(error)) from None


def make_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int,
                   steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    """A scheduler stepped once per optimiser step over ``total_steps`` steps."""
    total_steps = max(1, total_steps)
    if config.name == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps,
                                                   pct_start=config.warmup_fraction or 0.3,
                                                   cycle_momentum="momentum" in optimizer.defaults
                                                   or "betas" in optimizer.defaults)
    warmup = int(config.warmup_fraction * total_steps)
    main_steps = max(1, total_steps - warmup)
    if config.name == "cosine":
        floor = [config.min_lr_ratio * group["lr"] for group in optimizer.param_groups]
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps, eta_min=min(floor))
    elif config.name == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, config.step_epochs * steps_per_epoch),
                                               gamma=config.gamma)
    else:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
