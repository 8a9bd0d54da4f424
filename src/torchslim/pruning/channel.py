"""Structured channel pruning: remove whole channels and neurons so the model is physically smaller and faster.

The model is captured with torch.export and analysed (`torchslim.graph.channels`): every prunable channel is a
class of coupled channel positions across layers. Classes are grouped (a residual stream, a block's hidden
width), scored by an importance criterion, and the lowest-scoring are removed from every parameter they touch;
module attributes (``out_channels``, ``num_features``, ``in_features``, ...) follow the new shapes. The result
is an ordinary ``nn.Module`` whose output shape is unchanged.

Example:
    >>> result = torchslim.prune(model, torchslim.ChannelPruningConfig(ratio=0.3), example_inputs)
    >>> result.macs_after / result.macs_before
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np
import torch
from torch import nn

from torchslim._config import check
from torchslim._deprecated import renamed
from torchslim.core.modules import call_model, forward_shapes, is_linear_like, matches, tied_modules
from torchslim.data.config import CalibrationConfig
from torchslim.errors import InputError
from torchslim.graph import ChannelGraph, analyse_channels, capture
from torchslim.measure.latency import measure_latency
from torchslim.measure.macs import count_macs
from torchslim.measure.params import count_params
from torchslim.measure.stage import first_samples
from torchslim.pruning import calibrate, hf_config
from torchslim.recover.finetune import FinetuneConfig, finetune
from torchslim.registry import register_method
from torchslim.runtime import SHAPES_FORMAT, TorchDeployable, load_safetensors


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
            inputs: what removing it takes out of their outputs; see `torchslim.pruning.calibrate`),
            "obs" (optimal brain surgeon, greedy: per linear layer reading the channels, remove one input column
            at a time, the one whose removal adds least output error when the remaining columns are re-solved by
            least squares on the calibration inputs' covariance; catches channels that others can stand in for;
            pair it with ``reconstruct``, which performs that re-solve),
            "random" (a control).
        scope: "local" (each group loses ``ratio``) or "global" (one ranking over groups, scores normalised
            per group; a group loses at most ``max_ratio``).
        round_to: keep channel counts multiples of this (hardware-friendly widths); 1 = exact.
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
    round_to: int = 1
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
        check(self.round_to >= 1, "round_to", f"must be >= 1, got {self.round_to}")
        check(0.0 < self.max_ratio < 1.0, "max_ratio", f"must be in (0, 1), got {self.max_ratio}")
        check(0.0 <= self.target_latency < 1.0, "target_latency",
              f"must be in (0, 1) or 0 (unused), got {self.target_latency}")
        check(not (self.target_macs and self.target_latency), "target_latency", "give target_macs or target_latency")
        check(1 <= self.steps <= 100, "steps", f"must be in [1, 100], got {self.steps}")
        check(0.0 <= self.damping <= 1.0, "damping", f"must be in [0, 1], got {self.damping}")

    @property
    def calibrated(self) -> bool:
        """Whether pruning reads calibration inputs."""
        return self.importance in ("activation", "obs") or self.reconstruct


@dataclass
class PruneResult:
    """What `prune` did: sizes before and after, what it left alone (layer name -> reason) and, with
    ``reconstruct``, each refitted layer's relative output error on the calibration inputs and the layers fitted
    to the residual stream they add to (last step)."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    removed_channels: dict[str, int]
    skipped: dict[str, str]
    shapes: dict[str, list[int]]
    refit_errors: dict[str, float] = field(default_factory=dict)
    refit_residual: list[str] = field(default_factory=list)


@dataclass
class _Group:
    roots: np.ndarray  # prunable channel classes of this group
    size: int  # every channel class of the group, prunable or not
    modules: list[str]


def _groups(graph: ChannelGraph, skip: list[str]) -> list[_Group]:
    """Producers that share channel classes form one group (e.g. every conv writing into a residual stream)."""
    blocked = set(graph.blocked_roots())
    owner: dict[int, int] = {}
    parent = list(range(len(graph.producers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    roots_of = []
    for index, (_, ids) in enumerate(graph.producers):
        roots = set(graph.uf.roots(ids).tolist())
        roots_of.append(roots)
        for r in roots:
            if r in owner:
                parent[find(index)] = find(owner[r])
            else:
                owner[r] = index
    merged: dict[int, list[int]] = {}
    for index in range(len(graph.producers)):
        merged.setdefault(find(index), []).append(index)
    groups = []
    for members in merged.values():
        modules = [graph.producers[i][0] for i in members]
        roots = set().union(*(roots_of[i] for i in members))
        excluded = any(matches(m, skip) for m in modules)
        if excluded:
            for m in modules:
                graph.skipped.setdefault(m, "excluded by the config (skip)")
            continue
        prunable = np.array(sorted(r for r in roots if r not in blocked), dtype=np.int64)
        if len(prunable):
            groups.append(_Group(prunable, len(roots), modules))
    return groups



def channel_groups(model: nn.Module, example_inputs: Any, how: str = "auto",
                   skip: Sequence[str] = ()) -> list[tuple[list[str], int, int]]:
    """The dependency groups structured pruning cuts together, as ``(layers creating the group's channels,
    prunable channels, all channels)``; a group answers to any of its layer names in `ChannelPruningConfig.ratios`."""
    graph = analyse_channels(capture(model, example_inputs, how))
    return [(list(g.modules), len(g.roots), g.size) for g in _groups(graph, list(skip))]

def _importance(model: nn.Module, graph: ChannelGraph, kind: str, seed: int) -> dict[int, float]:
    """Score every channel class: summed over every parameter slice it owns."""
    tensors = _named_tensors(model)
    scores: dict[int, float] = {}
    if kind == "random":
        roots = sorted(set().union(*(set(graph.uf.roots(ids).tolist()) for ids in graph.param_ids.values())))
        return dict(zip(roots, np.random.default_rng(seed).random(len(roots)).tolist()))
    for (name, dim), ids in graph.param_ids.items():
        tensor = tensors.get(name)
        if tensor is None or not tensor.is_floating_point():
            continue
        module = name.rsplit(".", 1)[0]
        is_weight = tensor.ndim >= 2
        if kind == "bn":
            if graph.modules.get(module) != "norm" or not name.endswith("weight") or "running" in name:
                continue
        elif not is_weight:
            continue
        source = tensor.detach()
        if kind == "taylor":
            if tensor.grad is None:
                continue
            source = (tensor.detach() * tensor.grad).abs()
        t = source.float().movedim(dim, 0).reshape(tensor.shape[dim], -1)
        per_position = (t.abs().sum(1) if kind in ("l1", "bn", "taylor") else t.pow(2).sum(1)).tolist()
        for root, value in zip(graph.uf.roots(ids).tolist(), per_position):
            scores[root] = scores.get(root, 0.0) + value
    if kind == "l2":
        scores = {k: v ** 0.5 for k, v in scores.items()}
    return scores


def _removable(group: _Group, fraction: float, round_to: int) -> int:
    """How many channels a group loses for ``fraction``, keeping a multiple of ``round_to`` (and at least one)."""
    keep = group.size - round(fraction * group.size)
    keep = max(round_to, -(-keep // round_to) * round_to) if round_to > 1 else max(1, keep)
    return max(0, min(len(group.roots), group.size - keep))


def _lowest(group: _Group, scores: dict[int, float], count: int) -> list[int]:
    return sorted(group.roots.tolist(), key=lambda r: scores.get(r, 0.0))[:count]


def _group_ratio(group: _Group, ratios: dict[str, float], default: float) -> float:
    """The ratio of the first pattern in ``ratios`` that matches one of the group's layers, else ``default``."""
    for pattern, value in ratios.items():
        if any(matches(m, [pattern]) for m in group.modules):
            return value
    return default


def select_channels(model: nn.Module, graph: ChannelGraph, config: ChannelPruningConfig, ratio: float,
                    scores: dict[int, float] | None = None) -> set[int]:
    """The channel classes to remove for ``ratio`` under ``config``'s importance, scope and limits.

    ``scores`` (channel class -> importance) are computed from ``model`` unless given, so that repeated
    selections on one graph (a bisection, a retry) score once.
    """
    scores = scores if scores is not None else _importance(model, graph, config.importance, config.seed)
    groups = _groups(graph, config.skip)
    chosen: set[int] = set()
    if config.scope == "local":
        for group in groups:
            fraction = min(_group_ratio(group, config.ratios, ratio), config.max_ratio)
            chosen.update(_lowest(group, scores, _removable(group, fraction, config.round_to)))
        return _keep_every_layer(graph, chosen, scores)
    ranked = []
    for index, group in enumerate(groups):
        values = np.array([scores.get(r, 0.0) for r in group.roots.tolist()])
        scale = values.mean() if values.mean() > 0 else 1.0
        ranked += [(v / scale, index, r) for v, r in zip(values.tolist(), group.roots.tolist())]
    ranked.sort()
    budget = int(ratio * sum(g.size for g in groups))
    taken = [0] * len(groups)
    limit = [_removable(g, config.max_ratio, 1) for g in groups]
    for _, index, root in ranked:
        if budget <= 0:
            break
        if taken[index] < limit[index]:
            taken[index] += 1
            budget -= 1
    for index, group in enumerate(groups):
        chosen.update(_lowest(group, scores, _removable(group, taken[index] / group.size, config.round_to)))
    return _keep_every_layer(graph, chosen, scores)


def _keep_every_layer(graph: ChannelGraph, chosen: set[int], scores: dict[int, float]) -> set[int]:
    """A class can hold every output channel of a layer (a branch concatenated into a stream that a reshape
    splits into whole blocks): keep the best-scoring class of any layer that would lose all its channels."""
    for _, ids in graph.producers:
        roots = set(graph.uf.roots(ids).tolist())
        if roots and roots <= chosen:
            chosen.discard(max(roots, key=lambda r: scores.get(r, 0.0)))
    return chosen


def _update_attributes(model: nn.Module, graph: ChannelGraph) -> None:
    for name, kind in graph.modules.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.modules.conv._ConvNd):
            _update_conv(module)
        elif isinstance(module, nn.RNNBase):
            module.hidden_size, module.input_size = module.weight_hh_l0.shape[1], module.weight_ih_l0.shape[1]
            module._init_flat_weights()  # its forward reads this list, not the parameters
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            _update_multihead_attention(module)
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            module.num_features = (module.running_mean if module.running_mean is not None else module.weight).shape[0]
        elif isinstance(module, nn.GroupNorm) and module.weight is not None:
            module.num_channels = module.weight.shape[0]  # the group count stays (equal widths per group)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.normalized_shape = (module.weight.shape[0],)
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            module.embedding_dim = module.weight.shape[1]
        elif hasattr(module, "nf") and type(module).__name__ == "Conv1D":
            module.nf = module.weight.shape[1]  # transformers' Conv1D: weight (in, out), output width nf
    _update_attention_attributes(model)


def _update_multihead_attention(module: nn.MultiheadAttention) -> None:
    """Its forward derives the head size from the width: fewer positions per head, same head count. The
    softmax scale 1 / sqrt(head_dim) grows with the smaller head, so the query rows are scaled by
    sqrt(new / old) to keep every attention logit as it was (`load_pruned` overwrites the tensors after
    this, with the scaled ones that were saved)."""
    width = module.in_proj_weight.shape[1]
    old, new = module.head_dim, width // module.num_heads
    module.embed_dim = module.kdim = module.vdim = width
    module.head_dim = new
    if new != old:
        with torch.no_grad():
            module.in_proj_weight[:width].mul_((new / old) ** 0.5)
            if module.in_proj_bias is not None:
                module.in_proj_bias[:width].mul_((new / old) ** 0.5)


def _update_conv(module: nn.modules.conv._ConvNd) -> None:
    """Channel counts from the weight: (out, in / groups, ...), or (in, out / groups, ...) when transposed.
    A depthwise convolution stays depthwise (its groups follow its channels); other groups stay."""
    first, per_group = module.weight.shape[:2]
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    if depthwise:
        module.groups = first
    if module.transposed:
        module.in_channels, module.out_channels = first, per_group * module.groups
    else:
        module.out_channels, module.in_channels = first, per_group * module.groups


_HEAD_SIZE = ("head_dim", "attention_head_size")
_HEAD_COUNT = ("num_heads", "num_attention_heads", "n_head")
_QUERY = ("q_proj", "query", "q", "c_attn")


def _update_attention_attributes(model: nn.Module) -> None:
    """Attention modules that keep their head count (and GPT-2's fused q/k/v split size) as attributes: make
    them match the pruned query projection, so code such as ``qkv.split(self.split_size)`` keeps working."""
    for module in model.modules():
        head_size = next((getattr(module, a) for a in _HEAD_SIZE if isinstance(getattr(module, a, None), int)), 0)
        query = next((getattr(module, q) for q in _QUERY if isinstance(getattr(module, q, None), nn.Module)), None)
        if not head_size or query is None:
            continue
        width = getattr(query, "out_features", None) or getattr(query, "nf", None)
        if not isinstance(width, int):
            continue
        if query is getattr(module, "c_attn", None):  # GPT-2: one projection makes q, k and v
            if not isinstance(getattr(module, "split_size", None), int) or hasattr(module, "q_attn"):
                continue
            module.split_size = width = width // 3
        if width % head_size:
            continue
        for attr in _HEAD_COUNT:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, width // head_size)
        if isinstance(getattr(module, "all_head_size", None), int):
            module.all_head_size = width


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, shared: nn.Parameter | None = None):
    """Replace the tensor called ``name``; returns what was set, so that aliases can share one object."""
    module_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(module_name) if module_name else model
    current = getattr(owner, attr)
    if isinstance(current, nn.Parameter):
        shared = shared if shared is not None else nn.Parameter(value, requires_grad=current.requires_grad)
        owner._parameters[attr] = shared
        return shared
    owner._buffers[attr] = value
    return value


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # Every name of every tensor: tied weights (e.g. an LM head sharing the embedding) answer to each alias.
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def remove_channels(model: nn.Module, graph: ChannelGraph, chosen: set[int]) -> dict[str, list[int]]:
    """Slice every parameter and buffer that carries a chosen channel; returns the new shapes by name."""
    tensors = _named_tensors(model)
    aliases: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        aliases.setdefault(id(tensor), []).append(name)
    keep: dict[str, dict[int, np.ndarray]] = {}
    for (name, dim), ids in graph.param_ids.items():
        mask = np.array([root not in chosen for root in graph.uf.roots(ids).tolist()])
        if not mask.all():
            keep.setdefault(name, {})[dim] = np.flatnonzero(mask)
    shapes = {}
    with torch.no_grad():
        for name, dims in keep.items():
            tensor = tensors[name].detach()
            for dim, index in dims.items():
                tensor = tensor.index_select(dim, torch.as_tensor(index, device=tensor.device))
            tensor = tensor.contiguous()
            shared = None
            for alias in aliases[id(tensors[name])]:
                shared = _set_tensor(model, alias, tensor, shared)
                shapes[alias] = list(tensor.shape)
    _update_attributes(model, graph)
    return shapes


def prune(model: nn.Module, config: ChannelPruningConfig, example_inputs: Any,
          recover: Callable[[nn.Module, int], None] | None = None,
          calibration: Sequence[Any] | None = None) -> PruneResult:
    """Remove channels from ``model`` in place (see the module docstring); returns what changed.

    Args:
        example_inputs: one input batch (a tensor or a tuple of tensors) to capture and check the model with.
        recover: called as ``recover(model, step)`` after each of ``config.steps`` steps but the last (e.g. a
            short fine-tune); Taylor importance reads the gradients present on the parameters.
        calibration: input batches (like ``example_inputs``) for ``importance: activation`` and
            ``reconstruct``; read again at every step.

    Raises:
        InputError: the model cannot be captured, Taylor importance finds no gradients, or activation
            importance / reconstruction has no calibration inputs.
    """
    if config.importance == "taylor" and not any(p.grad is not None for p in model.parameters()):
        raise InputError("importance taylor needs gradients: run a backward pass on a few batches first "
                         "(the recipe step computes them from the training data)")
    if config.calibrated and not calibration:
        raise InputError("importance activation and reconstruct need calibration inputs (the recipe step reads "
                         "calibration.samples samples of calibration.split)")
    single = first_samples(example_inputs, 1)
    macs_before, params_before = count_macs(model, single), count_params(model)
    linear_widths = hf_config.widths_before(model)
    latency_before = _latency(model, example_inputs) if config.target_latency else 0.0
    removed: dict[str, int] = {}
    skipped: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    refit_errors: dict[str, float] = {}
    refit_residual: list[str] = []
    for step in range(1, config.steps + 1):
        share = step / config.steps  # cumulative targets follow a geometric path to the final one
        macs_goal = config.target_macs ** share * macs_before if config.target_macs else 0.0
        latency_goal = config.target_latency ** share * latency_before if config.target_latency else 0.0
        kept_before = 1 - config.ratio * (step - 1) / config.steps
        ratio = 1 - (1 - config.ratio * share) / kept_before
        step_removed, step_skipped, step_shapes, (step_errors, step_residual) = _prune_once(
            model, config, example_inputs, ratio, macs_goal, latency_goal, calibration)
        for module, count in step_removed.items():
            removed[module] = removed.get(module, 0) + count
        skipped.update(step_skipped)
        shapes.update(step_shapes)
        refit_errors.update(step_errors)
        refit_residual = step_residual
        if recover is not None and step < config.steps:
            recover(model, step)
    skipped.update(hf_config.update_configs(model, linear_widths))
    return PruneResult(macs_before=macs_before, macs_after=count_macs(model, single), params_before=params_before,
                       params_after=count_params(model), removed_channels=removed, skipped=skipped, shapes=shapes,
                       refit_errors=refit_errors, refit_residual=refit_residual)


def _latency(model: nn.Module, inputs: Any) -> float:
    with torch.inference_mode():
        return measure_latency(lambda x: call_model(model, x), inputs, warmup=2, repeats=7).median_ms


def _prune_once(model: nn.Module, config: ChannelPruningConfig, example_inputs: Any, ratio: float, macs_goal: float,
                latency_goal: float, calibration: Sequence[Any] | None = None) -> tuple[dict, dict, dict, tuple]:
    """One analyse -> select -> remove round; returns (removed channels per layer, skipped layers, new shapes,
    (relative output errors of refitted layers, the layers refitted to the residual stream))."""
    reference_shape, error, _ = forward_shapes(model, example_inputs)
    if error is not None:
        raise InputError(f"the model does not run on the example inputs: {error}")
    single = first_samples(example_inputs, 1)
    graph = analyse_channels(capture(model, example_inputs, config.capture), config.recurrent)
    want = {"activation": ("sq_norm",), "obs": ("hessian", "mean")}.get(config.importance)
    stats = calibrate.collect(model, graph.modules, calibration, want) if want else None
    scores = _scores(model, graph, config, stats)
    unpruned = copy.deepcopy(model) if config.reconstruct else None  # the refit's targets
    if macs_goal:
        ratio = _bisect_ratio(model, graph, config, scores, lambda trial: count_macs(trial, single) <= macs_goal)
    elif latency_goal:
        ratio = _bisect_ratio(model, graph, config, scores,
                              lambda trial: _latency(trial, example_inputs) <= latency_goal)
    before = {name: list(t.shape) for name, t in model.state_dict().items()}
    original = copy.deepcopy(model) if graph.literal_reshapes else None
    chosen = select_channels(model, graph, config, ratio, scores)
    shapes = remove_channels(model, graph, chosen)
    shape, error, where = forward_shapes(model, example_inputs)
    suspects = list(graph.literal_reshapes)
    while error is not None and original is not None and suspects:
        # A reshape or split wrote its channel count into the model's code. Keep the channels of the ones in
        # the layer that failed (all of them when the failure names no layer) and prune again.
        local = [(ids, layer) for ids, layer in suspects if where and _related(layer, where)]
        for ids, layer in local or suspects:
            graph.block(ids, "reshape to a size written in the model's code", layer)
        suspects = [s for s in suspects if local and not any(s is t for t in local)]
        _restore(model, original)
        chosen = select_channels(model, graph, config, ratio, scores)
        shapes = remove_channels(model, graph, chosen)
        shape, error, where = forward_shapes(model, example_inputs)
    if error is not None:
        raise RuntimeError(f"the pruned model fails to run ({error}); please report this model") from None
    if shape != reference_shape:
        raise RuntimeError(f"structured pruning changed the output shapes {reference_shape} -> {shape}")
    skipped = dict(graph.skipped)
    errors: tuple[dict, list] = ({}, [])
    if config.reconstruct:
        errors = calibrate.refit_sequential(model, unpruned, _kept_linear_positions(model, graph, chosen, skipped),
                                            list(calibration), config.damping)
    removed = {}
    for module, ids in graph.producers:
        count = int(sum(root in chosen for root in set(graph.uf.roots(ids).tolist())))
        if count:
            removed[module] = count
    return removed, skipped, {k: v for k, v in shapes.items() if v != before.get(k)}, errors


def _scores(model: nn.Module, graph: ChannelGraph, config: ChannelPruningConfig, stats) -> dict[int, float]:
    """Importance of every channel class; activation scores fall back to L2 magnitude (rescaled to the
    activation scores' level) for classes no recorded layer reads."""
    if config.importance not in ("activation", "obs"):
        return _importance(model, graph, config.importance, config.seed)
    magnitude = _importance(model, graph, "l2", config.seed)
    if config.importance == "obs":
        scores = calibrate.surgeon_scores(model, graph.param_ids, graph.uf.roots, stats, config.damping,
                                          config.max_ratio)
    else:
        scores = calibrate.activation_scores(model, graph.param_ids, graph.uf.roots, stats)
    both = [scores[r] / magnitude[r] for r in scores if magnitude.get(r, 0) > 0]
    scale = float(np.median(both)) if both else 1.0
    return {r: scores.get(r, scale * m) for r, m in {**magnitude, **scores}.items()}


def _kept_linear_positions(model: nn.Module, graph: ChannelGraph, chosen: set[int],
                           skipped: dict[str, str]) -> dict:
    """Linear layer -> (kept output rows or None, kept input columns) for the layers that lost input channels;
    layers whose weight is tied to another tensor (an LM head sharing the embedding) go to ``skipped``."""
    tied = tied_modules(model)
    found = {}
    for name in graph.modules:
        module = model.get_submodule(name)
        if not is_linear_like(module):
            continue
        if name in tied:
            skipped.setdefault(name, f"weight tied to {tied[name]}: pruned but not refitted")
            continue
        in_dim = calibrate.input_dim(module)
        kept = []
        for dim in (1 - in_dim, in_dim):
            ids = graph.param_ids.get((f"{name}.weight", dim))
            mask = None if ids is None else np.array([r not in chosen for r in graph.uf.roots(ids).tolist()])
            kept.append(None if mask is None or mask.all() else np.flatnonzero(mask))
        if kept[1] is not None:
            found[name] = tuple(kept)
    return found


def _related(layer: str, where: str) -> bool:
    """Whether ``layer`` (where a reshape was recorded) is ``where`` (where the model failed) or inside it."""
    return layer == where or layer.startswith(where + ".") or where.startswith(layer + ".")


def _restore(model: nn.Module, original: nn.Module) -> None:
    """Put back every tensor and layer attribute of ``original`` (an unpruned deep copy) into ``model``."""
    for name, module in original.named_modules():
        target = model.get_submodule(name) if name else model
        for attr, value in vars(module).items():
            if attr in ("_parameters", "_buffers"):
                getattr(target, attr).update(value)
            elif not attr.startswith("_") and isinstance(value, (int, tuple)):
                setattr(target, attr, value)


def _bisect_ratio(model: nn.Module, graph: ChannelGraph, config: ChannelPruningConfig, scores: dict[int, float],
                  reached) -> float:
    """The smallest ratio (to 1/4096) whose pruning, tried on copies, satisfies ``reached(trial_model)``."""
    low, high = 0.0, config.max_ratio
    for _ in range(12):
        middle = (low + high) / 2
        trial = copy.deepcopy(model)
        remove_channels(trial, graph, select_channels(trial, graph, config, middle, scores))
        if reached(trial):
            high = middle
        else:
            low = middle
    return high


def save_pruned(model: nn.Module, directory: str | Path) -> Path:
    """Weights as ``model.safetensors`` plus ``model.shapes.json`` (every tensor's shape); no pickle."""
    return TorchDeployable(model).save(Path(directory))


def _load_pruned(model: nn.Module, directory: str | Path, *, verify: bool = True) -> nn.Module:
    """Rebuild a pruned model on a fresh instance of its original class (changed in place and returned).

    Args:
        verify: check the files against the folder's ``manifest.json`` (see `torchslim.integrity`).

    Raises:
        ArtifactError: a damaged, altered or inconsistent file, named; nothing is allocated before the recorded
            shapes have been checked against the weights file's header.
    """
    from torchslim._validate import read_shapes
    from torchslim.integrity import verify_manifest

    directory = Path(directory)
    verify_manifest(directory, ["model.shapes.json", "model.safetensors"], verify=verify)
    resize_to_shapes(model, read_shapes(directory, SHAPES_FORMAT), directory)
    load_safetensors(model, directory / "model.safetensors")
    return model


def resize_to_shapes(model: nn.Module, shapes: dict[str, list[int]], directory: Path) -> None:
    """Give every tensor of ``model`` the recorded shape (empty, to be loaded) and its layers the matching
    attributes (``out_features``, ...): the structure a channel-pruned model was saved with."""
    state = model.state_dict()
    tensors = _named_tensors(model)
    aliases: dict[int, list[str]] = {}  # tied weights (an LM head sharing the embedding) stay one tensor
    for name, tensor in tensors.items():
        aliases.setdefault(id(tensor), []).append(name)
    graph, resized = ChannelGraph(), set()
    for name, shape in shapes.items():
        if name not in state:
            raise InputError(f"{directory}: the model has no tensor {name!r}; is this the original model class?")
        if list(state[name].shape) != shape and name not in resized:
            value, shared = torch.empty(shape, dtype=state[name].dtype), None
            for alias in aliases.get(id(tensors[name]), [name]):
                shared = _set_tensor(model, alias, value, shared)
                graph.modules[alias.rpartition(".")[0]] = "changed"
                resized.add(alias)
    _update_attributes(model, graph)


def _taylor_gradients(context, batches: int = 4, batch_size: int = 32) -> None:
    """Gradients for Taylor importance from a few training batches of the task's own loss: cross-entropy on
    labels, BCE for click-through models, the next-token loss for causal LMs.

    Raises:
        InputError: the data has no such loss (unlabelled sentences for an encoder): the distance to the
            unpruned model would be the only loss, and its gradient is zero at the unpruned model.
    """
    from torchslim.recover.losses import get_loss

    task, model = context.bundle.task, context.model
    labelled = context.data.has_labels and task in ("classification", "ctr")
    if not labelled and task != "lm":
        raise InputError(f"{context.where}.importance: taylor needs a task loss (labels, or a language model's "
                         f"next-token loss) and this {task} model's data has none; use importance: activation")
    model.zero_grad(set_to_none=True)
    for inputs, labels in context.data.batches("train", context.bundle.preprocess, batch_size, shuffle=True,
                                               seed=context.seed, limit=batches * batch_size):
        outputs = call_model(model, inputs)
        if task == "lm":  # per sequence: [summed next-token NLL, tokens]
            loss = outputs[:, 0].sum() / outputs[:, 1].sum().clamp_min(1)
        else:
            loss = get_loss("bce" if task == "ctr" else "cross_entropy")(outputs, labels)
        loss.backward()


@register_method("prune", "channel", ChannelPruningConfig)
def prune_channels(context, config: ChannelPruningConfig) -> TorchDeployable:
    """The recipe step: prune ``context.model`` in place; the report gets removed channels and MACs."""
    if config.importance == "taylor":
        _taylor_gradients(context)
    # A latency target is measured at the recipe's batch size; otherwise a small batch suffices to capture.
    example = context.example_inputs(context.batch_size if config.target_latency else 2)
    losses: list[list[float]] = []

    def finetune_between(model: nn.Module, step: int) -> None:
        _follow_masks(context)
        where = context.where
        context.where = f"{where}.finetune (after pruning step {step})"
        try:
            losses.append(finetune(context, config.finetune, name=f"finetune{step}").details["train_loss"])
        finally:
            context.where = where

    calibration = None
    if config.calibrated:
        # Text goes one sequence at a time: padding positions would otherwise weigh in the statistics.
        size = 1 if context.bundle.modality == "text" else config.calibration.batch_size
        calibration = [inputs for inputs, _ in context.data.batches(
            config.calibration.split, context.bundle.preprocess, size, shuffle=True, seed=context.seed,
            limit=config.calibration.samples)]
    try:
        result = prune(context.model, config, example, finetune_between if config.finetune is not None else None,
                       calibration)
    finally:
        context.model.zero_grad(set_to_none=True)
    _follow_masks(context)
    for layer, reason in result.skipped.items():
        context.skip_layer(layer, reason)
    details = {"macs_before": result.macs_before, "macs_after": result.macs_after,
               "removed_channels": result.removed_channels}
    if losses:
        details["finetune_train_loss"] = losses
    if result.refit_errors:
        details["refit_relative_error"] = {"layers": len(result.refit_errors),
                                           "mean": round(float(np.mean(list(result.refit_errors.values()))), 4),
                                           "max": round(max(result.refit_errors.values()), 4),
                                           "to_residual_stream": len(result.refit_residual)}
    return TorchDeployable(context.model, details=details)


def _follow_masks(context) -> None:
    """Earlier unstructured masks follow their weights: what was zero stays zero in the smaller tensors."""
    if context.masks:
        parameters = dict(context.model.named_parameters())
        context.masks = {name: parameters[name].detach() != 0 for name in context.masks if name in parameters}


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "ChannelPruning": "ChannelPruningConfig",
    "load_pruned": "_load_pruned",
})
