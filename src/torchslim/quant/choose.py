"""``quantize: {method: auto}``: build every candidate precision, keep the fastest that stays within the drop.

Which precision is fastest depends on the model and the CPU: on a Xeon with AMX, bfloat16 runs a transformer
encoder's matrix multiplies faster than ONNX Runtime's int8 kernels, while a small CNN is fastest as static int8;
on a CPU without AMX or AVX-512 BF16, bfloat16 is emulated and slower than float32. So this step measures
instead of guessing: each candidate (``int8-static``, ``int8-dynamic``, ``bf16`` by default, each with the
settings given for it) is built on its own copy of the model, scored on the validation split against the model
the step received (the metric the report uses: accuracy where there are labels, top-1 agreement or cosine
otherwise; a relative change for perplexity), and timed at batch 1 and the recipe's batch size on its own
runtime. The fastest candidate whose drop is at most ``max_drop`` is kept; if none is within the drop, the model
stays as it was (float) and the step says so. Every candidate's figures, and the reason any was left out (not
available on this machine, failed on this model), are in the step's details.

This is the per-step form of the choice `torchslim auto` makes between precisions in its search; both time
candidates with `time_candidates`.

Example:
    >>> result = torchslim.apply(model, torchslim.AutoPrecisionConfig(max_drop=0.01), data="builtin:sentences")
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from torchslim._config import check, from_dict, to_dict
from torchslim._progress import bar
from torchslim.errors import describe
from torchslim.measure.stage import first_samples
from torchslim.registry import get_method, register_method
from torchslim.runtime import Deployable, TorchDeployable

CANDIDATES = ("int8-static", "int8-dynamic", "bf16", "int8-weight", "int4-weight")


@dataclass(frozen=True)
class AutoPrecisionConfig:
    """Config of ``quantize: {method: auto, ...}``.

    Args:
        candidates: quantize methods to build and compare (each must be a registered quantize method other
            than auto and qat).
        max_drop: the most the metric may drop on the validation split against the step's input model (a
            difference of scores, 0.01 = one point of accuracy or agreement, 0.01 of cosine; relative for
            perplexity).
        settings: per candidate, its config fields, e.g. ``{int8-static: {smoothquant: true}}`` (validated like
            the method's own step).
        prefer: what "fastest" means: "balanced" (geometric mean of the batch-1 and batched latencies), "batch"
            or "bs1".
        samples: validation samples each candidate is scored on (0: the whole split).
    """

    candidates: list[str] = field(default_factory=lambda: ["int8-static", "int8-dynamic", "bf16"])
    max_drop: float = 0.01
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    prefer: Literal["balanced", "batch", "bs1"] = "balanced"
    samples: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        check(len(self.candidates) >= 1, "candidates", "name at least one quantize method")
        check(len(set(self.candidates)) == len(self.candidates), "candidates", "each method at most once")
        for i, name in enumerate(self.candidates):
            check(name in CANDIDATES, f"candidates[{i}]", f"expected one of {', '.join(CANDIDATES)}, got {name!r}")
        check(0.0 <= self.max_drop < 1.0, "max_drop", f"must be in [0, 1), got {self.max_drop}")
        check(self.samples >= 0, "samples", f"must be >= 0, got {self.samples}")
        for name, values in self.settings.items():
            check(name in self.candidates, f"settings.{name}", f"not a candidate (candidates: "
                                                               f"{', '.join(self.candidates)})")
            from_dict(get_method("quantize", name).config_cls, values, f"settings.{name}.")

    def candidate_config(self, name: str) -> Any:
        """The config ``name`` is built with: its defaults overlaid with ``settings[name]``."""
        return from_dict(get_method("quantize", name).config_cls, self.settings.get(name, {}), f"settings.{name}.")


def time_candidates(deployables: dict[str, Callable[[Any], Any]], batch: Any, prefer: str = "balanced",
                    rounds: int = 5) -> dict[str, dict]:
    """Median latency of each of ``deployables`` at batch 1 and at ``batch``'s size, timed in alternating rounds
    (each round times every candidate once at each size, in rotating order), so that load from other work on
    the machine weighs on all of them alike; ``score`` is what ``prefer`` ranks by (lower is faster). The first
    call at each size (which may compile) is not counted."""
    one = first_samples(batch, 1)
    names = list(deployables)
    for name in names:
        deployables[name](batch)
        deployables[name](one)
    times: dict[str, dict[str, list[float]]] = {n: {"bs1": [], "batch": []} for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for size, inputs, calls in (("bs1", one, 3), ("batch", batch, 1)):
                for _ in range(calls):
                    begin = time.perf_counter()
                    deployables[name](inputs)
                    times[name][size].append((time.perf_counter() - begin) * 1000)
    figures = {}
    for name in names:
        bs1, batched = statistics.median(times[name]["bs1"]), statistics.median(times[name]["batch"])
        score = {"balanced": math.sqrt(bs1 * batched), "batch": batched, "bs1": bs1}[prefer]
        figures[name] = {"latency_ms_bs1": round(bs1, 4), "latency_ms_batch": round(batched, 4),
                         "score": round(score, 4)}
    return figures


def criterion(prefer: str, batch_size: int) -> str:
    """What "fastest" meant for ``prefer``, in words, for a step's details."""
    return {"balanced": f"the geometric mean of batch-1 and batch-{batch_size} latency",
            "batch": f"batch-{batch_size} latency", "bs1": "batch-1 latency"}[prefer]


def _build(context, name: str, config: Any) -> tuple[Deployable, Any]:
    """Run quantize method ``name`` on a copy of ``context.model``; returns (deployable, the copy's context
    state: model, skipped layers), leaving ``context`` as it was."""
    saved = context.model, dict(context.skipped), context.where
    context.model = copy.deepcopy(saved[0])
    context.where = f"{saved[2]}.candidates[{name}]"
    try:
        deployable = get_method("quantize", name).handler(context, config)
        return deployable, (context.model, dict(context.skipped))
    finally:
        context.model, context.skipped, context.where = saved[0], saved[1], saved[2]


@register_method("quantize", "auto", AutoPrecisionConfig)
def quantize_auto(context, config: AutoPrecisionConfig) -> Deployable:
    """Build, score and time every candidate on ``context.model``; returns the fastest within ``max_drop``."""
    from torchslim.quant.mixed import ValidationScore

    validation = ValidationScore(context, config.samples)
    base = validation.float
    original = TorchDeployable(context.model.eval())
    batch = context.data.fill_batch(validation.split, context.bundle.preprocess, context.batch_size)
    figures: dict[str, dict] = {"float": {"drop": 0.0}}
    built: dict[str, tuple[Deployable, Any, Any]] = {}
    for name in bar(config.candidates, desc="building and scoring each precision", unit="precision",
                    show=context.progress):
        method_config = config.candidate_config(name)
        try:
            deployable, state = _build(context, name, method_config)
            drop, score = validation.score(deployable)
            figures[name] = {base.metric: round(score, 6), "drop": round(drop, 6), "runtime": deployable.runtime}
            built[name] = (deployable, state, method_config)
        except Exception as error:  # a candidate this machine or model cannot run is reported; the others compete
            figures[name] = {"error": describe(error)}
    with torch.inference_mode():
        timed = time_candidates({"float": original, **{n: built[n][0] for n in built}}, batch, config.prefer)
    for name, latency in timed.items():
        figures[name].update(latency)
    within = [n for n in built if figures[n]["drop"] <= config.max_drop]
    details = {"candidates": figures, "metric": base.metric, "split": validation.split, "max_drop": config.max_drop,
               "samples": int(validation.reference.shape[0])}
    faster = [n for n in within if figures[n]["score"] < figures["float"]["score"]]
    if not faster:
        why = "no candidate within the drop" if not within else "no candidate within the drop is faster than float"
        original.details.update(details, choice=f"float: {why} (max_drop {config.max_drop})")
        return original
    best = min(faster, key=lambda n: figures[n]["score"])
    deployable, (model, skipped), method_config = built[best]
    context.model, context.skipped = model, skipped
    # The method applied, for the artifact's record (`torchslim._context.run_step` replays bf16 on load).
    choice = (f"{best}: fastest by {criterion(config.prefer, context.batch_size)} with drop "
              f"{figures[best]['drop']:.4g} <= {config.max_drop}")
    deployable.details.update(details, chosen={"method": best, "config": to_dict(method_config)}, choice=choice)
    return deployable


__all__ = ["AutoPrecisionConfig", "criterion", "quantize_auto", "time_candidates"]
