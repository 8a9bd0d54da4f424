"""Importance criteria: small registered callables that score every channel class of the analysed graph (higher =
more important). ``l1``/``l2``/``bn``/``taylor``/``random`` read the weights (and gradients); ``activation`` and
``obs`` read statistics of the layers' inputs on calibration data:

- ``importance: activation`` scores a channel by what removing it takes out of the next layers' outputs: for
  every linear or convolution layer reading the channel, ``||W[:, j]|| * rms(x_j)`` (the column of weights that
  reads it times the root mean square of its values on calibration inputs), summed over those layers. For an
  FFN neuron this is the expected size of its contribution to the block's output, which weight magnitude alone
  cannot see (a large weight on a neuron that is rarely active costs little to remove).
- ``importance: obs`` orders each linear layer's input columns the optimal-brain-surgeon way, greedily
  (`removal_costs`): a channel's cost is the output error its removal adds once the remaining channels are
  re-solved by least squares, ``||W[:, j]||² / [C⁻¹]_jj`` with ``C`` the inputs' covariance. Unlike the
  activation score it sees redundancy: a loud channel that kept channels can stand in for costs little.

A criterion is ``criterion(model, graph, config, stats) -> {channel class: score}``; `register_importance` adds one.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from torchslim.core.calibration import LayerStats, collect_stats
from torchslim.core.modules import call_model, is_linear_like, named_tensors, weight_matrix
from torchslim.graph import ChannelGraph

# Both least-squares solves (OBS here, the refit) get at least this relative ridge, even at damping 0: duplicate
# or never-active channels make the covariance singular.
MIN_DAMPING = 1e-9

Criterion = Callable[[nn.Module, ChannelGraph, Any, "dict[str, LayerStats] | None"], "dict[int, float]"]
CRITERIA: dict[str, Criterion] = {}
# Which input statistics (`LayerStats` fields) a criterion needs from calibration data; none for the others.
STATISTICS: dict[str, tuple[str, ...]] = {}


def register_importance(name: str, statistics: tuple[str, ...] = ()) -> Callable[[Criterion], Criterion]:
    """Register ``criterion(model, graph, config, stats) -> {channel class: score}`` under ``name``; ``statistics``
    are the `LayerStats` fields it reads (collected on the calibration inputs before it runs)."""
    def add(criterion: Criterion) -> Criterion:
        CRITERIA[name] = criterion
        STATISTICS[name] = tuple(statistics)
        return criterion

    return add


def _consumers(model: nn.Module, modules: dict[str, str]) -> dict[str, nn.Module]:
    """The linear-like and ungrouped convolution layers of the analysed graph (the layers that read channels)."""
    found = {}
    for name, kind in modules.items():
        if kind not in ("linear", "linear-transposed", "conv"):
            continue
        module = model.get_submodule(name)
        if is_linear_like(module) or (isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1):
            found[name] = module
    return found


def collect(model: nn.Module, modules: dict[str, str], batches: Iterable[Any],
            want: tuple[str, ...] = ("sq_norm",)) -> dict[str, LayerStats]:
    """Run ``batches`` (model inputs) through ``model`` and record the statistics ``want`` (`LayerStats`
    fields) of the inputs of the layers that read channels (``modules``: layer name -> kind, as
    `torchslim.graph.ChannelGraph.modules` records them)."""
    def run(inputs):
        with torch.no_grad():
            call_model(model, inputs)

    return collect_stats(_consumers(model, modules), [lambda b=b: run(b) for b in batches], want,
                         desc="calibrating (channel statistics)")


def input_dim(module: nn.Module) -> int:
    """The dimension of a layer's weight tensor that runs over its input channels (0 for GPT-2's Conv1D)."""
    return 0 if is_linear_like(module) and not isinstance(module, nn.Linear) else 1


def _weight_scores(model: nn.Module, graph: ChannelGraph, kind: str, seed: int) -> dict[int, float]:
    """Score every channel class: summed over every parameter slice it owns."""
    tensors = named_tensors(model)
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


def activation_scores(model: nn.Module, param_ids: dict[tuple[str, int], np.ndarray], roots_of,
                      stats_by_layer: dict[str, LayerStats]) -> dict[int, float]:
    """Channel class -> summed ``||W[:, j]|| * rms(x_j)`` over the layers that read it (see the module doc).

    ``roots_of(ids)`` maps channel ids to their classes. Classes read by no recorded layer are absent.
    """
    scores: dict[int, float] = {}
    for name, stats in stats_by_layer.items():
        module = model.get_submodule(name)
        dim = input_dim(module)
        ids = param_ids.get((f"{name}.weight", dim))
        if ids is None or stats.sq_norm is None:
            continue
        weight = module.weight.detach().double()
        columns = weight.movedim(dim, 0).reshape(weight.shape[dim], -1).norm(dim=1)
        if columns.shape[0] != stats.sq_norm.shape[0]:
            continue  # a layer whose weight does not read its input channel by channel
        rms = (stats.sq_norm.double() / max(stats.tokens, 1)).sqrt()
        values = (columns * rms).tolist()
        for root, value in zip(roots_of(ids).tolist(), values):
            scores[root] = scores.get(root, 0.0) + value
    return scores


def removal_costs(weight: torch.Tensor, covariance: torch.Tensor, damping: float, steps: int) -> torch.Tensor:
    """Greedy optimal-brain-surgeon order of a linear layer's input columns: remove, ``steps`` times, the column
    whose removal, with the remaining columns re-solved by least squares to compensate, adds the least output
    error ``||W[:, j]||² / [C⁻¹]_jj``; then update the weights and ``C⁻¹`` as that solve does. ``covariance``
    is the inputs' (centred: a bias takes the mean); ``weight`` is ``(out, in)``.

    Returns:
        ``(in,)``: per column, the output root-mean-square error accumulated when it was removed; columns not
        removed within ``steps`` get the total plus their own next cost. Lower = removed earlier.
    """
    weight = weight.detach().double().clone()
    covariance = covariance.double()
    n = covariance.shape[0]
    ridge = max(damping, MIN_DAMPING) * covariance.diagonal().mean().clamp_min(1e-12)
    inverse = torch.linalg.inv(covariance + ridge * torch.eye(n, dtype=covariance.dtype))
    index = torch.arange(n)  # original column of each row/column still held
    alive = torch.ones(n, dtype=torch.bool)
    scores = torch.empty(n, dtype=torch.float64)
    total = 0.0
    for _ in range(min(steps, n - 1)):
        if alive.sum() <= 0.75 * len(index):  # drop removed columns: later updates touch less memory
            inverse, weight, index = inverse[alive][:, alive], weight[:, alive], index[alive]
            alive = alive[alive]
        cost = weight.pow(2).sum(0) / inverse.diagonal().clamp_min(1e-30)
        cost[~alive] = float("inf")
        j = int(cost.argmin())
        total += float(cost[j])
        scores[index[j]] = total
        row = inverse[j] / inverse[j, j]
        weight.addr_(weight[:, j].clone(), row, alpha=-1)
        inverse.addr_(inverse[:, j].clone(), row, alpha=-1)
        alive[j] = False
    if alive.any():
        cost = weight.pow(2).sum(0) / inverse.diagonal().clamp_min(1e-30)
        scores[index[alive]] = total + cost[alive]
    return scores.clamp_min(0).sqrt()


def surgeon_scores(model: nn.Module, param_ids: dict[tuple[str, int], np.ndarray], roots_of,
                   stats_by_layer: dict[str, LayerStats], damping: float, fraction: float) -> dict[int, float]:
    """Channel class -> summed `removal_costs` over the linear layers reading it (``fraction`` of each layer's
    columns are ordered greedily); convolutions, whose channels span several weight columns each, add their
    `activation_scores` (the same unit: output RMS lost). Classes read by no recorded layer are absent."""
    others = {name: LayerStats(stats.tokens, sq_norm=stats.hessian.diagonal() * (stats.tokens / 2))
              for name, stats in stats_by_layer.items() if not is_linear_like(model.get_submodule(name))}
    scores = activation_scores(model, param_ids, roots_of, others)
    for name, stats in stats_by_layer.items():
        module = model.get_submodule(name)
        ids = param_ids.get((f"{name}.weight", input_dim(module)))
        if ids is None or stats.hessian is None or name in others:
            continue
        weight = weight_matrix(module)
        if weight.shape[1] != stats.hessian.shape[0]:
            continue
        covariance = stats.hessian.double() / 2
        if getattr(module, "bias", None) is not None:
            covariance = covariance - torch.outer(stats.mean.double(), stats.mean.double())
        values = removal_costs(weight, covariance, damping, int(np.ceil(fraction * weight.shape[1]))).tolist()
        for root, value in zip(roots_of(ids).tolist(), values):
            scores[root] = scores.get(root, 0.0) + value
    return scores


for _kind in ("l1", "l2", "bn", "taylor", "random"):
    register_importance(_kind)(lambda model, graph, config, stats, _kind=_kind: _weight_scores(model, graph, _kind,
                                                                                              config.seed))


def _with_magnitude_fallback(model: nn.Module, graph: ChannelGraph, config,
                             scores: dict[int, float]) -> dict[int, float]:
    """Classes no recorded layer reads fall back to L2 magnitude, rescaled to the data-aware scores' level."""
    magnitude = _weight_scores(model, graph, "l2", config.seed)
    both = [scores[r] / magnitude[r] for r in scores if magnitude.get(r, 0) > 0]
    scale = float(np.median(both)) if both else 1.0
    return {r: scores.get(r, scale * m) for r, m in {**magnitude, **scores}.items()}


@register_importance("activation", statistics=("sq_norm",))
def _activation(model: nn.Module, graph: ChannelGraph, config, stats) -> dict[int, float]:
    return _with_magnitude_fallback(model, graph, config,
                                    activation_scores(model, graph.param_ids, graph.uf.roots, stats))


@register_importance("obs", statistics=("hessian", "mean"))
def _obs(model: nn.Module, graph: ChannelGraph, config, stats) -> dict[int, float]:
    scores = surgeon_scores(model, graph.param_ids, graph.uf.roots, stats, config.damping, config.max_ratio)
    return _with_magnitude_fallback(model, graph, config, scores)


def score(model: nn.Module, graph: ChannelGraph, config, stats: dict[str, LayerStats] | None = None
          ) -> dict[int, float]:
    """Every channel class's importance under ``config.importance`` (statistics from `collect` where it needs them)."""
    return CRITERIA[config.importance](model, graph, config, stats)
