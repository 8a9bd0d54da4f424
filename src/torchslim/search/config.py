"""The ``search:`` section of a recipe (and the settings of `torchslim.auto` / ``torchslim auto``).

    model: builtin:digits-cnn
    data: builtin:digits
    search:
      space: {ratios: [0.0, 0.25, 0.5, 0.625, 0.75], precision: [int8-static, float], epochs: [4, 8, 12]}
      objectives: [score, latency, size]
      constraints: {max_drop: 0.005, target: latency, budget: 0.1}
      trials: 40
      time_budget: 30m

Everything here is plain data (no optuna import): a recipe with a search section validates anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torchslim._config import check
from torchslim.data.config import CalibrationConfig
from torchslim.recover.finetune import DistillConfig, FinetuneConfig
from torchslim.recover.optim import OptimizerConfig

OBJECTIVES = ("score", "latency", "size", "macs")
PRECISIONS = ("float", "int8-static", "int8-dynamic", "int8-weight", "int4-weight", "bf16")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


def parse_duration(value: str | float | int, field_name: str = "time_budget") -> float:
    """Seconds in ``value``: a number of seconds, or a string such as "90s", "30m", "1.5h" (0: no limit)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        check(value >= 0, field_name, f"must be >= 0 seconds, got {value}")
        return float(value)
    match = _DURATION.match(str(value))
    check(match is not None, field_name, f"expected seconds or a duration such as 30m, 90s, 1.5h; got {value!r}")
    number, unit = match.groups()
    return float(number) * {"s": 1, "m": 60, "h": 3600, None: 1}[unit]


@dataclass(frozen=True)
class SpaceConfig:
    """What the search may choose, per layer group where it matters.

    Args:
        ratios: structured-pruning options per dependency group (the fraction of its channels removed; a
            group's options are all of these; [] or [0.0] leaves pruning out).
        max_groups: at most this many groups (the ones with the most MACs) get their own decision; the rest
            share one.
        round_to: pruned channel counts stay multiples of this.
        importance: how channels are ranked inside a group (`ChannelPruningConfig.importance`).
        precision: quantization options of the whole model ("float" = none); those this model or machine
            cannot run are left out and reported (by default int8-dynamic is left out of models whose MACs
            are mostly convolutions, and bf16 on CPUs without AMX or AVX-512 BF16).
        float_layers: with int8-static, this many of the layers whose quantization costs the most (measured
            by the sensitivity pass) get their own int8/float decision.
        ranks: low-rank options per layer (fraction of its rank kept by SVD; [] leaves factorization out).
        max_rank_layers: at most this many layers (the ones with the most MACs) get a rank decision.
        epochs: recovery options (epochs of distillation from the original; 0 = no recovery).
        skip: layer-name patterns (fnmatch) the search leaves alone.
    """

    ratios: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.625, 0.75])
    max_groups: int = 12
    round_to: int = 8
    importance: Literal["l1", "l2", "bn", "activation", "obs"] = "l1"
    precision: list[str] = field(default_factory=lambda: ["int8-static", "int8-dynamic", "bf16", "float"])
    float_layers: int = 4
    ranks: list[float] = field(default_factory=list)
    max_rank_layers: int = 6
    epochs: list[int] = field(default_factory=lambda: [4, 8, 12])
    skip: list[str] = field(default_factory=list)
    version: int = 1

    def __post_init__(self) -> None:
        for i, value in enumerate(self.ratios):
            check(0.0 <= value < 1.0, f"ratios[{i}]", f"must be in [0, 1), got {value}")
        for i, value in enumerate(self.ranks):
            check(0.0 < value < 1.0, f"ranks[{i}]", f"must be in (0, 1), got {value}")
        for i, value in enumerate(self.epochs):
            check(0 <= value <= 1000, f"epochs[{i}]", f"must be in [0, 1000], got {value}")
        for i, name in enumerate(self.precision):
            check(name in PRECISIONS, f"precision[{i}]", f"expected one of {', '.join(PRECISIONS)}, got {name!r}")
        check(self.max_groups >= 1, "max_groups", f"must be >= 1, got {self.max_groups}")
        check(self.max_rank_layers >= 0, "max_rank_layers", f"must be >= 0, got {self.max_rank_layers}")
        check(self.float_layers >= 0, "float_layers", f"must be >= 0, got {self.float_layers}")
        check(self.round_to >= 1, "round_to", f"must be >= 1, got {self.round_to}")


@dataclass(frozen=True)
class ConstraintsConfig:
    """What a point must meet to count as feasible.

    Args:
        max_drop: the metric's drop allowed on the validation split (a difference of scores, e.g. 0.005 = half
            a point of accuracy; relative for perplexity: 0.02 = 2% higher); null: no limit.
        target: the cost the budget limits: "latency" (batched, on the deployment runtime), "size" (bytes
            shipped) or "macs"; null: none.
        budget: the most ``target`` may be, as a fraction of the baseline's (0.25 = a quarter).
    """

    max_drop: float | None = None
    target: Literal["latency", "size", "macs"] | None = None
    budget: float | None = None
    version: int = 1

    def __post_init__(self) -> None:
        check(self.max_drop is None or 0.0 <= self.max_drop < 1.0, "max_drop",
              f"must be in [0, 1), got {self.max_drop}")
        check(self.budget is None or 0.0 < self.budget <= 1.0, "budget",
              f"must be a fraction of the baseline in (0, 1], got {self.budget}")
        check(self.budget is None or self.target is not None, "budget", "needs a target (latency, size or macs)")


@dataclass(frozen=True)
class SensitivityConfig:
    """The proxy pass before any trial.

    Args:
        calibration: the samples each option is scored on (`CalibrationConfig`; default 128 of the ``calib``
            split, read from ``train`` when the data has no ``calib`` samples, in batches of 32, text at most 16).
        proxy: what predicts a plan's drop: "loss" (KL divergence, 1 - cosine or NLL change on the
            calibration samples), "sqnr" (the output's signal-to-noise ratio, dB) or "auto" (loss first; after
            the trials the report says which ranked the measured drops better).
        plans: plans allocated from the proxy and enqueued as the first trials; when it is not 0, one plan per
            precision with nothing else compressed goes before them.
    """

    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(samples=128))
    proxy: Literal["auto", "loss", "sqnr"] = "auto"
    plans: int = 4
    version: int = 1
    renamed_fields: ClassVar[dict[str, str]] = {"samples": "calibration.samples"}

    def __post_init__(self) -> None:
        check(self.calibration.samples >= 1, "calibration.samples",
              f"must be >= 1, got {self.calibration.samples}")
        check(0 <= self.plans <= 64, "plans", f"must be in [0, 64], got {self.plans}")


def _default_finetune() -> FinetuneConfig:
    # The demo's recovery settings; a trial's epochs come from the space.
    return FinetuneConfig(epochs=8, batch_size=64, optimizer=OptimizerConfig(name="sgd", lr=0.02),
                          distill=DistillConfig(temperature=4.0, alpha=0.7))


@dataclass(frozen=True)
class SearchConfig:
    """Config of a recipe's ``search:`` section.

    Args:
        space: what may be chosen (`SpaceConfig`).
        objectives: what the front trades: "score" (the metric's drop), "latency", "size", "macs".
        constraints: what a point must meet (`ConstraintsConfig`).
        trials: full evaluations, all workers together (the enqueued proxy plans included).
        time_budget: stop starting trials after this long ("30m", "2h", seconds; 0: no limit).
        workers: local worker processes.
        storage: where the study lives: null (a journal file next to the output folder), a journal file path,
            or an RDB URL (sqlite:///..., postgresql://...) that workers on other machines can share.
        sampler: "tpe" (multi-objective TPE with constraints) or "random" (the control).
        runtime: where latency is measured: "auto" (each candidate's own runtime: ONNX Runtime when quantized
            there, eager PyTorch otherwise), "onnxruntime" (float candidates exported too) or "torch".
        sensitivity: the proxy pass (`SensitivityConfig`).
        finetune: the fine-tuning a trial runs (its epochs come from ``space.epochs``).
        repeats: latency repeats per measurement (alternated with the baseline's; medians).
    """

    space: SpaceConfig = field(default_factory=SpaceConfig)
    objectives: list[str] = field(default_factory=lambda: ["score", "latency", "size"])
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    trials: int = 40
    time_budget: float | str = 0.0
    workers: int = 1
    storage: str | None = None
    sampler: Literal["tpe", "random"] = "tpe"
    runtime: Literal["auto", "onnxruntime", "torch"] = "auto"
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    finetune: FinetuneConfig = field(default_factory=_default_finetune)
    repeats: int = 7
    version: int = 1
    renamed_fields: ClassVar[dict[str, str]] = {"recovery": "finetune"}

    def __post_init__(self) -> None:
        check(len(self.objectives) >= 1, "objectives", "name at least one of score, latency, size, macs")
        for i, name in enumerate(self.objectives):
            check(name in OBJECTIVES, f"objectives[{i}]", f"expected one of {', '.join(OBJECTIVES)}, got {name!r}")
        check(len(set(self.objectives)) == len(self.objectives), "objectives", "each objective at most once")
        check(1 <= self.trials <= 100000, "trials", f"must be in [1, 100000], got {self.trials}")
        check(1 <= self.workers <= 256, "workers", f"must be in [1, 256], got {self.workers}")
        check(1 <= self.repeats <= 1000, "repeats", f"must be in [1, 1000], got {self.repeats}")
        parse_duration(self.time_budget)

    @property
    def seconds(self) -> float:
        """``time_budget`` in seconds (0: no limit)."""
        return parse_duration(self.time_budget)
