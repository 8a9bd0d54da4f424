"""The search space: one decision per thing the search may choose, built from what torchslim already has.

- ``prune:<layer>``: the fraction of one dependency group's channels removed (`torchslim.pruning.channel`; the
  groups the channel graph ties — a residual stream, a block's hidden width, fused q/k/v heads — are one
  decision, named after one of the layers creating its channels);
- ``precision``: the whole model's quantization method (``float``: none);
- ``float:<layer>``: under int8-static, whether one of its most sensitive layers stays in float;
- ``rank:<layer>``: the fraction of one layer's rank that SVD keeps (`torchslim.factorize.svd`);
- ``epochs``: the recovery budget (epochs of distillation).

A plan (decision name -> option) becomes an ordinary recipe (`SearchSpace.recipe`), which is what a trial runs
and what `torchslim compress` reproduces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from torchslim._config import to_dict
from torchslim.core.modules import matches
from torchslim.errors import InputError

PRUNE, PRECISION, FLOAT, RANK, EPOCHS = "prune", "precision", "float", "rank", "epochs"
ORT_PRECISIONS = ("int8-static", "int8-dynamic")
TORCH_PRECISIONS = ("float", "int8-weight", "int4-weight", "bf16")
# Precisions that only pay on matrix-multiply-heavy models (convolutions stay float in them).
LINEAR_PRECISIONS = ("int8-dynamic", "int8-weight", "int4-weight")


@dataclass(frozen=True)
class Decision:
    """One thing the search chooses.

    Attributes:
        name: the study's parameter name (``prune:stem.0``, ``precision``, ...).
        kind: prune, precision, float, rank or epochs.
        options: the values it may take (``neutral`` among them).
        layers: the layers it acts on (a group's channel-creating layers; the layer itself).
        neutral: the option that changes nothing.
        macs: baseline MACs of the layers it acts on (what orders the decisions).
        when: ``(decision, value)`` it applies under (float-layer decisions apply under int8-static), or None.
    """

    name: str
    kind: str
    options: tuple
    layers: tuple[str, ...] = ()
    neutral: Any = None
    macs: int = 0
    when: tuple | None = None


@dataclass
class SearchSpace:
    """The decisions, what was left out (``notes``), and how a plan becomes a recipe."""

    decisions: list[Decision] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    importance: str = "l1"
    round_to: int = 8
    skip: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Decision:
        return next(d for d in self.decisions if d.name == name)

    def names(self, kind: str | None = None) -> list[str]:
        return [d.name for d in self.decisions if kind is None or d.kind == kind]

    def active(self, plan: dict) -> list[Decision]:
        """The decisions that apply under ``plan`` (in order; conditions read the plan)."""
        return [d for d in self.decisions if d.when is None or plan.get(d.when[0]) == d.when[1]]

    def neutral_plan(self) -> dict:
        plan = {d.name: d.neutral for d in self.decisions if d.when is None}
        return self.complete(plan)

    def complete(self, plan: dict) -> dict:
        """``plan`` with every active decision it leaves out set to its neutral option, inactive ones dropped."""
        full = dict(plan)
        for d in self.decisions:
            if d.when is None:
                full.setdefault(d.name, d.neutral)
        active = {d.name for d in self.active(full)}
        for d in self.decisions:
            if d.name in active:
                full.setdefault(d.name, d.neutral)
        return {k: v for k, v in full.items() if k in active}

    def combinations(self) -> int:
        """How many distinct plans there are (conditional decisions counted under their condition)."""
        total = 1
        for d in self.decisions:
            if d.when is None and d.kind != FLOAT:
                total *= len(d.options)
        floats = [d for d in self.decisions if d.kind == FLOAT]
        if floats and PRECISION in self.names():
            quantized = 2 ** len(floats)
            options = len(self[PRECISION].options)
            total = total // options * (options - 1 + quantized)
        return total

    def recipe(self, plan: dict, model: str, data: str, seed: int, measure: dict, finetune: Any) -> dict:
        """The recipe (a plain dict, as YAML holds it) that builds ``plan``; ``finetune`` is the search's
        fine-tuning run (a `FinetuneConfig` or its dict), given the plan's epochs."""
        plan = self.complete(plan)
        steps = []
        ratios = {}
        for d in self.decisions:
            if d.kind == PRUNE and plan.get(d.name):
                ratios.update({layer: float(plan[d.name]) for layer in d.layers})
        if ratios:
            steps.append({"prune": {"method": "channel", "ratio": 0.0, "ratios": ratios, "scope": "local",
                                    "importance": self.importance, "round_to": self.round_to,
                                    "skip": list(self.skip)}})
        ranks: dict[float, list[str]] = {}
        for d in self.decisions:
            if d.kind == RANK and plan.get(d.name, 1.0) < 1.0:
                ranks.setdefault(float(plan[d.name]), []).extend(d.layers)
        for value, layers in sorted(ranks.items()):
            steps.append({"factorize": {"method": "svd", "rank_ratio": value, "layers": sorted(layers),
                                        "round_to": self.round_to}})
        epochs = int(plan.get(EPOCHS, 0) or 0)
        if epochs and steps:
            settings = to_dict(finetune) if not isinstance(finetune, dict) else dict(finetune)
            settings.pop("version", None)
            steps.append({"finetune": {**settings, "epochs": epochs}})
        precision = plan.get(PRECISION, "float")
        if precision != "float":
            steps.append({"quantize": _quantize_step(precision, [self[n].layers[0] for n in plan
                                                                 if n.startswith(FLOAT + ":") and plan[n]])})
        return {"model": model, "data": data, "seed": seed, "steps": steps, "measure": dict(measure)}

    def to_dict(self) -> dict:
        return {"decisions": [asdict(d) for d in self.decisions], "notes": list(self.notes),
                "importance": self.importance, "round_to": self.round_to, "skip": list(self.skip),
                "combinations": self.combinations()}

    @classmethod
    def from_dict(cls, raw: dict) -> "SearchSpace":
        decisions = [Decision(name=d["name"], kind=d["kind"], options=tuple(d["options"]), layers=tuple(d["layers"]),
                              neutral=d["neutral"], macs=d["macs"], when=tuple(d["when"]) if d["when"] else None)
                     for d in raw["decisions"]]
        return cls(decisions, list(raw["notes"]), raw["importance"], raw["round_to"], list(raw["skip"]))

    def add_float_layers(self, layers: list[str], macs: dict[str, int]) -> None:
        """Give each of ``layers`` (the most quantization-sensitive first) an int8/float decision under
        int8-static."""
        for layer in layers:
            self.decisions.append(Decision(f"{FLOAT}:{layer}", FLOAT, (False, True), (layer,), False,
                                           macs.get(layer, 0), (PRECISION, "int8-static")))


def _quantize_step(precision: str, float_layers: list[str]) -> dict:
    if precision == "int8-static":
        step = {"method": "int8-static", "runtime": "onnxruntime", "observer": "minmax", "per_channel": True}
        if float_layers:
            step["skip"] = sorted(float_layers)
        return step
    if precision == "int8-dynamic":
        return {"method": "int8-dynamic"}
    if precision == "bf16" and float_layers:
        return {"method": "bf16", "skip": sorted(float_layers)}
    return {"method": precision}


def module_work(model: nn.Module, inputs: Any) -> dict[str, tuple[float, int]]:
    """Leaf layer -> (work on ``inputs``: MACs for Conv/Linear, output elements otherwise; its own parameters),
    from forward hooks."""
    import torch

    from torchslim.core.modules import call_model

    work: dict[str, tuple[float, int]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name or list(module.children()):
            continue

        def hook(mod, args, out, name=name):
            size = out.numel() if torch.is_tensor(out) else sum(t.numel() for t in out if torch.is_tensor(t))
            per_output = mod.weight[0].numel() if isinstance(mod, _MATMUL_LAYERS) else 1  # in/groups x kernel
            params = sum(p.numel() for p in mod.parameters(recurse=False))
            work[name] = (work.get(name, (0.0, 0))[0] + float(size * per_output), params)
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return work


_MATMUL_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def layer_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """MACs of every Conv/Linear layer on ``example_inputs``."""
    return {name: int(work) for name, (work, _) in module_work(model, example_inputs).items()
            if isinstance(model.get_submodule(name), _MATMUL_LAYERS)}


def _skipped(name: str, patterns: list[str]) -> bool:
    return matches(name, patterns)


def _prune_decisions(bundle, config, macs: dict[str, int], notes: list[str]) -> list[Decision]:
    from torchslim.pruning.channel import channel_groups

    options = sorted({float(r) for r in config.ratios} | {0.0})
    if len(options) < 2:
        notes.append("prune: no ratio above 0 in space.ratios")
        return []
    try:
        groups = channel_groups(bundle.model, bundle.example_inputs(2), skip=config.skip)
    except (InputError, RuntimeError) as error:
        notes.append(f"prune: the channel graph could not be captured ({str(error)[:160]})")
        return []
    groups = [g for g in groups if g[1] >= 2]
    if not groups:
        notes.append("prune: no dependency group with channels to remove")
        return []

    def weight(group) -> int:
        return sum(macs.get(m, 0) for m in group[0])

    groups.sort(key=weight, reverse=True)
    own, shared = groups[:config.max_groups], groups[config.max_groups:]
    decisions = [Decision(f"{PRUNE}:{g[0][0]}", PRUNE, tuple(options), tuple(g[0]), 0.0, weight(g)) for g in own]
    if shared:
        layers = tuple(m for g in shared for m in g[0])
        decisions.append(Decision(f"{PRUNE}:others", PRUNE, tuple(options), layers, 0.0, sum(map(weight, shared))))
        notes.append(f"prune: {len(shared)} smaller groups share one decision (space.max_groups {config.max_groups})")
    return decisions


def _available_precisions(config, runtime: str, bundle, data, macs: dict[str, int], notes: list[str]) -> list[str]:
    from torchslim.quant import onnx_backend
    from torchslim.registry import get_method

    linear = sum(v for k, v in macs.items() if isinstance(bundle.model.get_submodule(k), nn.Linear))
    linear_share = linear / max(1, sum(macs.values()))
    kept = []
    for name in dict.fromkeys(config.precision):
        reason = None
        if name != "float":
            try:
                get_method("quantize", name)
            except KeyError:
                reason = "no such quantize method in this torchslim"
        if reason is None and name in ORT_PRECISIONS and runtime == "torch":
            reason = "runs on ONNX Runtime, and the search measures on torch (runtime: torch)"
        if reason is None and name in TORCH_PRECISIONS and runtime == "onnxruntime":
            reason = "runs on eager PyTorch, and the search measures on ONNX Runtime (runtime: onnxruntime)"
        if reason is None and name in ORT_PRECISIONS:
            reason = onnx_backend.available()
        if reason is None and name == "int8-static" and not len(data.splits.get("calib", [])):
            reason = "the data has no calibration split"
        if reason is None and name == "bf16":
            from torchslim.quant.bf16 import native_bf16

            reason = None if native_bf16() else "this CPU has no native bfloat16 (AMX or AVX-512 BF16)"
        if reason is None and name in LINEAR_PRECISIONS and linear_share < 0.3:
            reason = f"quantizes Linear layers only, {linear_share:.0%} of this model's MACs"
        if reason:
            notes.append(f"precision {name}: left out ({reason})")
        else:
            kept.append(name)
    return kept


def _rank_decisions(bundle, config, macs: dict[str, int], notes: list[str]) -> list[Decision]:
    if not config.ranks:
        return []
    options = tuple(sorted({float(r) for r in config.ranks}) + [1.0])
    candidates = []
    for name, count in macs.items():
        module = bundle.model.get_submodule(name)
        if _skipped(name, config.skip) or (isinstance(module, nn.Conv2d) and module.groups != 1):
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)) and min(module.weight.shape[:2]) >= 8:
            candidates.append((count, name))
    candidates.sort(reverse=True)
    chosen = candidates[:config.max_rank_layers]
    if not chosen:
        notes.append("rank: no Linear or Conv2d layer wide enough to factorize")
    return [Decision(f"{RANK}:{name}", RANK, options, (name,), 1.0, count) for count, name in chosen]


def build_space(bundle, data, config, runtime: str) -> SearchSpace:
    """The decisions ``config`` (a `SpaceConfig`) allows on this model and data, measuring on ``runtime``.

    Raises:
        InputError: nothing is left to decide (the notes say why each part was left out).
    """
    notes: list[str] = []
    macs = layer_macs(bundle.model, bundle.example_inputs(1))
    decisions = _prune_decisions(bundle, config, macs, notes) if any(config.ratios) else []
    if not any(config.ratios):
        notes.append("prune: space.ratios allows no pruning")
    decisions += _rank_decisions(bundle, config, macs, notes)
    compressed = bool(decisions)
    epochs = sorted(set(config.epochs)) or [0]
    if compressed and len(epochs) > 1:
        decisions.append(Decision(EPOCHS, EPOCHS, tuple(epochs), (), max(epochs)))
    elif compressed:
        decisions.append(Decision(EPOCHS, EPOCHS, (epochs[0],), (), epochs[0]))
    precisions = _available_precisions(config, runtime, bundle, data, macs, notes)
    if runtime == "onnxruntime" and "float" in precisions:
        precisions.remove("float")
    if precisions and (len(precisions) > 1 or precisions[0] != "float"):
        neutral = "float" if "float" in precisions else precisions[0]
        decisions.append(Decision(PRECISION, PRECISION, tuple(precisions), (), neutral, sum(macs.values())))
    space = SearchSpace(decisions, notes, config.importance, config.round_to, list(config.skip))
    if not any(len(d.options) > 1 for d in decisions):
        raise InputError(f"search.space: nothing to search on {bundle.spec}: " + "; ".join(notes or ["no options"]))
    return space


def space_size_text(space: SearchSpace) -> str:
    """e.g. "9 decisions, 4.9e+06 plans"."""
    count = space.combinations()
    return f"{len(space.decisions)} decisions, {count:.3g} plans" if count > 1e6 else \
        f"{len(space.decisions)} decisions, {count} plans"


__all__ = ["Decision", "SearchSpace", "build_space", "layer_macs", "space_size_text"]
