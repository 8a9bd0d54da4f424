"""The one trainer every training step uses (fine-tuning with distillation, QAT, the built-in models' training).

What it does for every caller: a seeded, deterministic data order (`DistributedSampler`, which also shards each
global batch over torchrun's processes); gradient accumulation and clipping; mixed precision where the device
supports it; DistributedDataParallel under torchrun; validation every epoch with early stopping and keeping the
best weights; and checkpoints every epoch and every N optimiser steps (`torchslim.recover.checkpoint`) from which
a rerun of the same command resumes exactly where the killed one stopped.

Optimisers and schedules come from torch.optim (`torchslim.recover.optim`); nothing here re-implements them.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from torchslim._config import check
from torchslim._quiet import sparse_invariants_warning_silenced
from torchslim.core.modules import call_model
from torchslim.errors import InputError
from torchslim.recover import checkpoint as ckpt
from torchslim.recover import distributed
from torchslim.recover.optim import OptimizerConfig, ScheduleConfig, make_optimizer, make_scheduler

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass
class EarlyStopConfig:
    """Validation after every epoch (on the data's ``val`` split, where it has one).

    Args:
        patience: stop after this many epochs without an improvement of more than ``min_delta`` (0: never stop).
        min_delta: the smallest change of the validation metric that counts as an improvement.
        keep_best: end with the weights of the best validation epoch rather than the last (of equal scores,
            the later epoch).
    """

    patience: int = 0
    min_delta: float = 0.0
    keep_best: bool = True

    def __post_init__(self) -> None:
        check(self.patience >= 0, "patience", f"must be >= 0, got {self.patience}")
        check(self.min_delta >= 0, "min_delta", f"must be >= 0, got {self.min_delta}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the fields every training step shares (``finetune: {...}`` adds its losses to these).

    Args:
        epochs: passes over the training split.
        batch_size: the global batch per optimiser step and accumulation micro-step (split over torchrun ranks).
        optimizer: a torch.optim optimiser and its parameter groups.
        schedule: the learning-rate schedule over all optimiser steps.
        grad_clip: clip the global gradient norm to this (0: off).
        accumulate: micro-batches per optimiser step (the effective batch is ``batch_size x accumulate``).
        precision: "auto" (bf16/fp16 autocast on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16" (CUDA only).
        device: "auto" (CUDA when present), "cpu" or "cuda"; the model returns to the CPU afterwards.
        early_stop: validation, early stopping and keeping the best epoch.
        checkpoint_every: also checkpoint every this many optimiser steps (0: at the end of each epoch only).
        dropout: the probability every dropout module of the model (``nn.Dropout`` and its kin, and so the
            attention dropout of Hugging Face models, which reads ``self.dropout.p``) uses while training; the
            model's own values come back afterwards. 0 turns dropout off, as distilling a compressed model back
            to its teacher wants: the student is fitted to the teacher's exact outputs, not regularised towards
            a noisy copy of them. ``null`` (default) keeps the model's own.
    """

    epochs: int = 3
    batch_size: int = 64
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="sgd", lr=0.01))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip: float = 0.0
    accumulate: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    checkpoint_every: int = 0
    dropout: float | None = None

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        check(self.accumulate >= 1, "accumulate", f"must be >= 1, got {self.accumulate}")
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        check(self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout",
              f"must be in [0, 1) or null, got {self.dropout}")


@dataclass
class TrainResult:
    """What a training run did. ``history``: per epoch, the mean of each loss term and their ``total``."""

    history: list[dict[str, float]]
    val_history: list[float]
    best_epoch: int | None
    stopped_early: bool
    resumed_from: dict | None
    steps: int
    seconds: float
    dropout: dict | None = None  # {"p", "modules"}: the dropout probability trained with and how many modules

    def details(self) -> dict:
        out = {"train_loss": [round(h["total"], 5) for h in self.history], "optimizer_steps": self.steps}
        terms = sorted({k for h in self.history for k in h} - {"total"})
        if len(terms) > 1:
            out["loss_terms"] = {k: [round(h.get(k, 0.0), 5) for h in self.history] for k in terms}
        if self.val_history:
            out["val_metric"] = [round(v, 5) for v in self.val_history]
            out["best_epoch"] = self.best_epoch
        if self.stopped_early:
            out["stopped_early_after_epoch"] = len(self.history)
        if self.resumed_from:
            out["resumed_from"] = self.resumed_from
        if self.dropout is not None:
            out["dropout"] = self.dropout
        return out


class SplitDataset(Dataset):
    """(sample, label) pairs of a data split; labels are -1 where the data has none."""

    def __init__(self, samples: Sequence[Any], labels: Sequence[int] | None):
        self.samples, self.labels = samples, labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.samples[index], (-1 if self.labels is None else int(self.labels[index]))


def batch_collate(preprocess: Callable[[list], Any], labelled: bool) -> Callable:
    """A DataLoader collate function: raw samples -> ``(preprocess(samples), labels or None)``."""
    def collate(items):
        inputs = preprocess([sample for sample, _ in items])
        return inputs, (torch.tensor([label for _, label in items]) if labelled else None)
    return collate


def training_device(choice: str) -> torch.device:
    """The device ``TrainConfig.device`` names (under torchrun on CUDA: this rank's GPU)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("finetune.device: 'cuda' requested but torch sees no CUDA device")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", distributed.current().local_rank)


def _autocast(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    if precision == "fp16":
        if device.type != "cuda":
            raise InputError("finetune.precision: fp16 autocast needs a CUDA device; use bf16 or fp32 on the CPU")
        return torch.float16, True
    return (torch.bfloat16, False) if precision == "bf16" else (None, False)


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(x, device) for x in inputs)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs


LossFn = Callable[[Any, Any, "torch.Tensor | None"], dict[str, torch.Tensor]]
Validate = Callable[[nn.Module, torch.device], float]


class Trainer:
    """Train ``model`` in place on ``dataset``.

    Args:
        model: the module to train (its ``forward`` output goes to ``loss_fn``).
        loss_fn: ``(outputs, inputs, labels) -> {term name: weighted scalar}``; the terms are summed.
        dataset: a map-style dataset of samples; ``collate`` turns a list of them into ``(inputs, labels)``.
        config: the training settings.
        validate: ``(model, device) -> metric`` (higher is better), run after every epoch; None: no validation.
        checkpoint_dir: where checkpoints go (None: no checkpoints, no resume).
        fingerprint: identifies the run; a checkpoint with another fingerprint is refused.
        after_step: called after every optimiser step (e.g. to re-apply pruning masks).
        seed: seeds the data order and the torch RNG.

    Example:
        >>> result = Trainer(model, loss_fn, SplitDataset(xs, ys), collate, TrainConfig(epochs=3)).fit()
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, dataset: Dataset, collate: Callable, config: TrainConfig,
                 *, validate: Validate | None = None, checkpoint_dir: Path | None = None, fingerprint: str = "",
                 describe: str = "", after_step: Callable[[], None] | None = None, seed: int = 0,
                 description: str = "train", progress: bool = True):
        self.model, self.loss_fn, self.dataset, self.collate = model, loss_fn, dataset, collate
        self.config, self.validate, self.after_step, self.seed = config, validate, after_step, seed
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.fingerprint, self.describe = fingerprint, describe
        self.description, self.progress = description, progress
        self.device = training_device(config.device)
        self.dist = distributed.current()
        if config.batch_size % self.dist.world_size:
            raise InputError(f"{description}.batch_size: {config.batch_size} does not split evenly over "
                             f"{self.dist.world_size} processes")
        self.local_batch = config.batch_size // self.dist.world_size

    # -- state ------------------------------------------------------------------------------------------------
    def _save(self, state: dict, opt, scheduler, scaler, best: dict | None) -> None:
        if self.checkpoint_dir is None or not self.dist.is_main:
            return
        opt_tensors, opt_rest = ckpt.flatten_optimizer(opt.state_dict())
        tensors = {"model": self.model.state_dict(), "optimizer": opt_tensors, "rng": ckpt.rng_state()}
        if best is not None:
            tensors["best"] = best
        body = dict(state, fingerprint=self.fingerprint, describe=self.describe, optimizer=opt_rest,
                    scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None)
        ckpt.write_checkpoint(self.checkpoint_dir, tensors, body)

    def _load(self, opt, scheduler, scaler) -> tuple[dict, dict | None] | None:
        if self.checkpoint_dir is None:
            return None
        found = ckpt.read_checkpoint(self.checkpoint_dir, self.fingerprint)
        if found is None:
            return None
        tensors, state = found
        where = ckpt.find_checkpoint(self.checkpoint_dir)
        try:
            self.model.load_state_dict(tensors["model"])
            opt.load_state_dict(ckpt.unflatten_optimizer(tensors.get("optimizer", {}), state["optimizer"]))
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise ckpt.CheckpointError(f"{where}: checkpoint does not match this model/optimiser "
                                       f"({str(error).splitlines()[0]}); remove the folder or rerun with "
                                       f"--fresh to start over") from None
        ckpt.set_rng_state(tensors["rng"])
        return state, tensors.get("best")

    # -- loop -------------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train (resuming from the checkpoint when there is one); returns what happened."""
        threads = torch.get_num_threads()
        # Processes sharing a machine share its cores (the pipeline sized threads for one process).
        torch.set_num_threads(max(1, threads // distributed.local_world_size()))
        own = {m: m.p for m in self.model.modules() if isinstance(m, _DROPOUT)} if self.config.dropout is not None \
            else {}
        for module in own:
            module.p = self.config.dropout
        try:
            result = self._fit()
            if self.config.dropout is not None:
                result.dropout = {"p": self.config.dropout, "modules": len(own)}
            return result
        finally:
            torch.set_num_threads(threads)
            for module, p in own.items():
                module.p = p

    def _fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        config, model, device = self.config, self.model, self.device
        started = time.perf_counter()
        torch.manual_seed(self.seed)
        model.to(device)
        dtype, needs_scaler = _autocast(config.precision, device)
        scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
        opt = make_optimizer(model, config.optimizer)
        sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=True, seed=self.seed)
        micro_per_epoch = math.ceil(len(sampler) / self.local_batch)
        steps_per_epoch = math.ceil(micro_per_epoch / config.accumulate)
        scheduler = make_scheduler(opt, config.schedule, config.epochs * steps_per_epoch, steps_per_epoch)

        state = {"epoch": 0, "micro": 0, "step": 0, "sums": {}, "history": [], "val_history": [],
                 "best_score": None, "best_epoch": None, "bad_epochs": 0, "stopped_early": False}
        best = None
        resumed_from = None
        loaded = self._load(opt, scheduler, scaler)
        if loaded is not None:
            state, best = loaded
            resumed_from = {"epoch": state["epoch"], "step": state["step"]}
        train_model = model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        bar = tqdm(total=config.epochs * steps_per_epoch, initial=state["step"], desc=self.description,
                   disable=(None if self.progress else True) if self.dist.is_main else True, leave=False, unit="step")
        while state["epoch"] < config.epochs and not state["stopped_early"]:
            epoch = state["epoch"]
            sampler.set_epoch(epoch)
            indices = list(sampler)[state["micro"] * self.local_batch:]
            # Its own generator: creating a DataLoader iterator otherwise draws from the global RNG, and a resumed
            # run creates it at another point of the RNG stream than the run it continues.
            loader = DataLoader(self.dataset, batch_size=self.local_batch, sampler=indices, collate_fn=self.collate,
                                generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
            model.train()
            for inputs, labels in loader:
                state["micro"] += 1
                boundary = state["micro"] % config.accumulate == 0 or state["micro"] == micro_per_epoch
                sync = contextlib.nullcontext() if boundary or not self.dist.active else train_model.no_sync()
                inputs = to_device(inputs, device)
                labels = None if labels is None else labels.to(device)
                with sync:
                    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        terms = self.loss_fn(call_model(train_model, inputs), inputs, labels)
                    loss = sum(terms.values())
                    if not math.isfinite(loss.item()):
                        raise FloatingPointError(f"{self.description}: loss became {loss.item()} at epoch {epoch}")
                    scaled = loss / config.accumulate
                    (scaler.scale(scaled) if scaler else scaled).backward()
                for name, value in terms.items():
                    state["sums"][name] = state["sums"].get(name, 0.0) + float(value.detach())
                state["sums"]["total"] = state["sums"].get("total", 0.0) + loss.item()
                state["sums"]["count"] = state["sums"].get("count", 0.0) + 1
                if not boundary:
                    continue
                self._optimizer_step(opt, scaler)
                scheduler.step()
                if self.after_step is not None:
                    self.after_step()
                state["step"] += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{state['sums']['total'] / state['sums']['count']:.4f}")
                if config.checkpoint_every and state["step"] % config.checkpoint_every == 0 \
                        and state["micro"] < micro_per_epoch:
                    self._save(state, opt, scheduler, scaler, best)
            best = self._end_epoch(state, best)
            self._save(state, opt, scheduler, scaler, best)
        bar.close()
        if best is not None and config.early_stop.keep_best:
            model.load_state_dict(best)
        model.eval().to("cpu")
        return TrainResult(history=state["history"], val_history=state["val_history"],
                           best_epoch=state["best_epoch"], stopped_early=state["stopped_early"],
                           resumed_from=resumed_from, steps=state["step"], seconds=time.perf_counter() - started)

    def _optimizer_step(self, opt, scaler) -> None:
        if scaler is not None:
            scaler.unscale_(opt)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        with sparse_invariants_warning_silenced():  # Adagrad on embedding tables' sparse gradients
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        opt.zero_grad(set_to_none=True)

    def _end_epoch(self, state: dict, best: dict | None) -> dict | None:
        """Reduce the epoch's losses over ranks, validate, and decide about early stopping; returns the best
        weights so far (CPU copies) when they are kept."""
        names = sorted(state["sums"])
        totals = dict(zip(names, distributed.all_reduce_sum([state["sums"][n] for n in names])))
        count = max(totals.pop("count", 1.0), 1.0)
        state["history"].append({name: value / count for name, value in totals.items()})
        state["epoch"] += 1
        state["micro"], state["sums"] = 0, {}
        if self.validate is None:
            return best
        self.model.eval()
        with torch.no_grad():
            score = float(self.validate(self.model, self.device))
        state["val_history"].append(score)
        stop = self.config.early_stop
        first = state["best_score"] is None
        improved = first or score > state["best_score"] + stop.min_delta
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        # A tie goes to the later epoch: a small validation split saturates early, and the later weights have
        # trained longer on a lower learning rate.
        if first or score >= state["best_score"]:
            state["best_score"], state["best_epoch"] = score, state["epoch"]
            if stop.keep_best:
                best = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if stop.patience and state["bad_epochs"] >= stop.patience:
            state["stopped_early"] = True
        return best
