"""The config of structured channel pruning (`ChannelPruningConfig`) and what a run returns (`PruneResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torchslim._config import check
from torchslim.data.config import CalibrationConfig
from torchslim.errors import shorten
from torchslim.recover.finetune import FinetuneConfig


@dataclass(frozen=True)
class ChannelPruningConfig:
    """Config of ``prune: {method: channel, ...}`` and of `torchslim.prune`.

    Args:
        ratio: fraction of each group's channels removed (local), or of all prunable channels (global).
        ratios: per-group ratios (local scope): module-name pattern (fnmatch) -> the fraction removed from the
            group of every layer that pattern matches (the first matching pattern wins); groups no pattern
            matches lose ``ratio``. E.g. ``{"stem.0": 0.25, "blocks.*.conv1": 0.6}``.
        target_macs: instead of ``ratio``: prune until MACs <= this fraction of the baseline's (0 = unused).
        target_latency: instead of ``ratio``: prune until the eager PyTorch latency on the example inputs is
            <= this fraction of the baseline's (measured, medians; 0 = unused).
        importance: "l1" / "l2" weight magnitude, "bn" (|BatchNorm scale|), "taylor" (|weight x gradient|,
            first order; needs gradients, which the recipe step computes from a few training batches of the
            task's loss: labels, or a causal LM's next-token loss),
            "activation" (``||W[:, j]|| * rms(x_j)`` summed over the layers reading channel j, on calibration
            inputs: what removing it takes out of their outputs; see `torchslim.pruning.channel.importance`),
            "obs" (optimal brain surgeon, greedy: per linear layer reading the channels, remove one input column
            at a time, the one whose removal adds least output error when the remaining columns are re-solved by
            least squares on the calibration inputs' covariance; catches channels that others can stand in for;
            pair it with ``reconstruct``, which performs that re-solve),
            "random" (a control).
        scope: "local" (each group loses ``ratio``) or "global" (one ranking over groups, scores normalised
            per group; a group loses at most ``max_ratio``).
        round_to: the kept channel counts: a number (multiples of it, hardware-friendly widths; 1 = exact), or
            "auto" (each group keeps the width near the exact one that runs fastest, from a latency table of
            its layers measured on this machine at the example batch size and threads, cached; see
            `torchslim.pruning.channel.widths`). Default (null): "auto" with ``target_latency``, else 1.
        reallocate: with ``round_to: auto`` and ``target_macs``: move MACs to where they cost least time. Every
            group is first pruned this much deeper than the ratio that meets the target (up to ``max_ratio``),
            then groups grow back one step at a time, the step adding the least table latency per MAC first,
            until the target is met again: the same MACs, fewer of them in layers slow per MAC (1x1
            convolutions on large feature maps, which move more memory than they compute). No group loses more
            than ``reallocate`` beyond that ratio. 0 (the default): every group keeps its ratio (local scope's
            uniform pruning, rounded to the table's widths). Measured: ResNet-50 at 0.5 of the MACs, batch 32,
            1.86x faster than unpruned with 0, 2.52x with 0.2 (docs/pruning.md for what it costs in accuracy).
        max_ratio: the most any group may lose.
        skip: module-name patterns (fnmatch) whose channels stay.
        steps: prune in this many steps (re-analysing and re-scoring each time), running ``finetune`` between
            steps (in a recipe; `prune` calls its ``recover`` callback there).
        seed: for ``importance: random``.
        capture: how the graph is captured: "auto" (torch.export; when it fails or the model holds an
            ``nn.MultiheadAttention``, a traced run of the example inputs, which analyses only the path they
            take), "export" or "trace".
        reconstruct: refit every linear layer that lost input channels by least squares on calibration
            inputs, so its output (bias included) stays as close as possible to the unpruned layer's.
        damping: ``reconstruct`` adds this fraction of the mean input second moment to the diagonal it
            inverts (keeps the solve stable when kept channels are nearly collinear; 0 = exact least squares).
        calibration: the samples ``activation`` and ``reconstruct`` read in a recipe step (`CalibrationConfig`;
            default a seeded draw of 256 ``train`` samples in batches of 32; text one sequence at a time).
        recurrent: also prune the hidden size of ``LSTM``/``GRU``/``RNN`` layers (every gate, layer and
            direction together). Off by default: code that builds a state of ``hidden_size`` itself, or reads
            the state's width elsewhere, would no longer match.
        finetune: in a recipe, a fine-tuning run (the ``finetune`` step's settings) between pruning steps
            (iterative pruning: prune a little, fine-tune, prune more); null: none.
    """

    ratio: float = 0.3
    ratios: dict[str, float] = field(default_factory=dict)
    target_macs: float = 0.0
    target_latency: float = 0.0
    importance: Literal["l1", "l2", "bn", "taylor", "activation", "obs", "random"] = "l1"
    scope: Literal["local", "global"] = "local"
    round_to: int | Literal["auto"] | None = None
    reallocate: float = 0.0
    max_ratio: float = 0.9
    skip: list[str] = field(default_factory=list)
    steps: int = 1
    seed: int = 0
    capture: Literal["auto", "export", "trace"] = "auto"
    reconstruct: bool = False
    damping: float = 0.01
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(split="train"))
    recurrent: bool = False
    finetune: FinetuneConfig | None = None
    version: int = 1
    renamed_fields: ClassVar[dict[str, str]] = {"ignore": "skip", "recover": "finetune",
                                                "calibration_samples": "calibration.samples"}

    def __post_init__(self) -> None:
        check(0.0 <= self.ratio < 1.0, "ratio", f"must be in [0, 1), got {self.ratio}")
        for pattern, value in self.ratios.items():
            check(0.0 <= value < 1.0, f"ratios.{pattern}", f"must be in [0, 1), got {value}")
        check(not self.ratios or (self.scope == "local" and self.steps == 1), "ratios",
              "per-group ratios need scope: local and steps: 1")
        check(0.0 <= self.target_macs < 1.0, "target_macs", f"must be in (0, 1) or 0 (unused), got {self.target_macs}")
        check(self.round_to is None or self.round_to == "auto"
              or (isinstance(self.round_to, int) and not isinstance(self.round_to, bool) and self.round_to >= 1),
              "round_to", f"must be an integer >= 1 or 'auto', got {shorten(self.round_to)}")
        check(0.0 < self.max_ratio < 1.0, "max_ratio", f"must be in (0, 1), got {self.max_ratio}")
        check(0.0 <= self.reallocate < 1.0, "reallocate", f"must be in [0, 1), got {self.reallocate}")
        check(not self.reallocate or (self.target_macs and self.rounding == "auto"), "reallocate",
              "moves MACs by a latency table under a MACs target: needs target_macs and round_to: auto")
        check(0.0 <= self.target_latency < 1.0, "target_latency",
              f"must be in (0, 1) or 0 (unused), got {self.target_latency}")
        check(not (self.target_macs and self.target_latency), "target_latency", "give target_macs or target_latency")
        check(1 <= self.steps <= 100, "steps", f"must be in [1, 100], got {self.steps}")
        check(0.0 <= self.damping <= 1.0, "damping", f"must be in [0, 1], got {self.damping}")
        from torchslim.pruning.channel.importance import CRITERIA

        check(self.importance in CRITERIA, "importance",
              f"{self.importance!r} is not a registered criterion; known: {', '.join(sorted(CRITERIA))}")

    @property
    def rounding(self) -> int | str:
        """``round_to`` in force: as given, else "auto" under a latency target and 1 otherwise."""
        if self.round_to is not None:
            return self.round_to
        return "auto" if self.target_latency else 1

    @property
    def calibrated(self) -> bool:
        """Whether pruning reads calibration inputs."""
        from torchslim.pruning.channel.importance import STATISTICS

        return bool(STATISTICS[self.importance]) or self.reconstruct


@dataclass
class PruneResult:
    """What `prune` did: sizes before and after, what it left alone (layer name -> reason) and, with
    ``reconstruct``, each refitted layer's relative output error on the calibration inputs and the layers fitted
    to the residual stream they add to (last step); with ``round_to: auto``, each group's width (channels, the
    exact and the chosen kept count, the table latency of its layers at each; last step) and the model's
    latency before and after: predicted (the table's sum over convolution and linear layers) and measured
    (eager, at the example batch size), in milliseconds, with how the table was measured (shapes timed, entries
    provisional and retimed, the highest load average read)."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    removed_channels: dict[str, int]
    skipped: dict[str, str]
    shapes: dict[str, list[int]]
    refit_errors: dict[str, float] = field(default_factory=dict)
    refit_residual: list[str] = field(default_factory=list)
    widths: dict[str, dict] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
