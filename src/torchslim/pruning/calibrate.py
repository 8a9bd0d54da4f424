"""Data-aware structured pruning: what each layer's input channels carry, and refitting layers that lost some.

Three uses by `torchslim.pruning.channel`:

- ``importance: activation`` scores a channel by what removing it takes out of the next layers' outputs: for
  every linear or convolution layer reading the channel, ``||W[:, j]|| * rms(x_j)`` (the column of weights that
  reads it times the root mean square of its values on calibration inputs), summed over those layers. For an
  FFN neuron this is the expected size of its contribution to the block's output, which weight magnitude alone
  cannot see (a large weight on a neuron that is rarely active costs little to remove).
- ``importance: obs`` orders each linear layer's input columns the optimal-brain-surgeon way, greedily
  (`removal_costs`): a channel's cost is the output error its removal adds once the remaining channels are
  re-solved by least squares, ``||W[:, j]||² / [C⁻¹]_jj`` with ``C`` the inputs' covariance. Unlike the
  activation score it sees redundancy: a loud channel that kept channels can stand in for costs little.
- ``reconstruct: true`` refits every linear layer that lost input channels by least squares, one after another
  in the order they run: each layer's new weights and bias map the inputs it now receives (through the layers
  pruned and refitted before it) onto the unpruned model's output of that layer on the same calibration inputs,
  ``[W' b'] = E[y x~^T] (E[x~ x~^T] + damping)^-1`` with ``x~ = [x, 1]``. Correlated kept channels take over the
  removed ones' share, a removed channel's mean moves into the bias, and the error earlier layers left behind
  is corrected where it can be.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from torchslim.core.calibration import LayerStats, StopForward, collect_stats
from torchslim.core.modules import call_model, is_linear_like, weight_matrix

# Both least-squares solves get at least this relative ridge, even at damping 0: duplicate or never-active
# channels make the covariance singular.
_MIN_DAMPING = 1e-9


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
    ridge = max(damping, _MIN_DAMPING) * covariance.diagonal().mean().clamp_min(1e-12)
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


def _run_until(model: nn.Module, module: nn.Module, inputs: Any, record) -> None:
    """Run ``inputs`` through ``model`` up to ``module``; ``record(args, output)`` sees that layer's call."""
    def hook(_module, args, output):
        record(args, output)
        raise StopForward  # the rest of the forward is not needed

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            call_model(model, inputs)
    except StopForward:
        pass
    finally:
        handle.remove()


def execution_order(model: nn.Module, names: Iterable[str], inputs: Any) -> list[str]:
    """``names`` in the order their layers first run on ``inputs``."""
    order: list[str] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: order.append(n)) for n in names]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


def _norm_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name and type(module).__name__.endswith("Norm")]


def _residual_norm(model: nn.Module, name: str, norm: str | None, inputs: Any) -> str | None:
    """``norm`` (the first normalisation layer to run after layer ``name``) if its input is the layer's output
    plus something else (a residual stream), else None: accepted only if a random change added to the layer's
    output arrives unchanged in that norm's input (nothing scales, gates or transforms it on the way)."""
    if norm is None:
        return None
    module, generator = model.get_submodule(name), torch.Generator().manual_seed(0)
    calls, seen = [], {}

    def nudge(_module, _args, output):
        calls.append(1)
        if "delta" in seen:
            return output + seen["delta"]
        seen["delta"] = torch.randn(output.shape, generator=generator).to(output) * output.detach().std()

    handle = module.register_forward_hook(nudge)
    try:
        _run_until(model, model.get_submodule(norm), inputs, lambda args, out: seen.__setitem__("plain", args[0]))
        _run_until(model, model.get_submodule(norm), inputs, lambda args, out: seen.__setitem__("nudged", args[0]))
    finally:
        handle.remove()
    if len(calls) != 2 or seen["plain"].shape != seen["delta"].shape:
        return None
    change = seen["nudged"].double() - seen["plain"].double()
    scale = float(seen["delta"].abs().max())
    return norm if float((change - seen["delta"].double()).abs().max()) <= 1e-3 * scale else None


def _layer_rows(model: nn.Module, teacher: nn.Module, name: str, norm: str | None, inputs: Any):
    """(the layer's input rows in ``model``, its target output rows) on one calibration batch: the teacher's
    output of the layer, or, where the layer's output is added to a residual stream just before ``norm``, the
    output that makes the student's sum there equal the teacher's (correcting what earlier layers left)."""
    module, seen = model.get_submodule(name), {}
    if norm is None:
        _run_until(teacher, teacher.get_submodule(name), inputs, lambda args, out: seen.__setitem__("y", out))
        _run_until(model, module, inputs, lambda args, out: seen.__setitem__("x", args[0]))
        x, y = seen["x"], seen["y"]
    else:
        _run_until(teacher, teacher.get_submodule(norm), inputs, lambda args, out: seen.__setitem__("t", args[0]))
        handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
        try:
            _run_until(model, model.get_submodule(norm), inputs, lambda args, out: seen.__setitem__("s", args[0]))
        finally:
            handle.remove()
        x, y = seen["x"], seen["y"].double() + seen["t"].double() - seen["s"].double()
    return x.detach().reshape(-1, x.shape[-1]).double(), y.detach().reshape(-1, y.shape[-1]).double()


def refit_sequential(model: nn.Module, teacher: nn.Module, kept: dict[str, tuple[np.ndarray | None, np.ndarray]],
                     batches: list[Any], damping: float = 0.01) -> tuple[dict[str, float], list[str]]:
    """Refit the linear layers in ``kept`` one after another, in the order they run: each maps the inputs it
    now receives (from the already pruned and refitted layers before it) onto the unpruned ``teacher``'s outputs
    of the same layer on the same calibration ``batches``, by least squares with a bias. A layer whose whole
    output is added to a residual stream right before a normalisation layer (a transformer block's output
    projections) is fitted instead so that the sum entering that norm matches the teacher's: the error the
    earlier pruned layers left in the residual stream is corrected too.

    Returns:
        (layer name -> relative error ``||Y' - Y|| / ||Y||`` of its target on the calibration inputs after the
        refit, the layers fitted to the residual stream).
    """
    errors, residual = {}, []
    norms = set(_norm_layers(model))
    order = execution_order(model, [*kept, *norms], batches[0])
    for position, name in enumerate(order):
        if name not in kept:
            continue
        rows = kept[name][0]
        module = model.get_submodule(name)
        following = next((n for n in order[position + 1:] if n in norms), None)
        norm = _residual_norm(model, name, following, batches[0]) if rows is None else None
        if norm is not None:
            residual.append(name)
        gram = cross = None
        target_square = 0.0
        for inputs in batches:
            x, y = _layer_rows(model, teacher, name, norm, inputs)
            if rows is not None:
                y = y[:, torch.as_tensor(rows, dtype=torch.long)]
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
            gram = x.T @ x if gram is None else gram + x.T @ x
            cross = y.T @ x if cross is None else cross + y.T @ x
            target_square += float(y.pow(2).sum())
        if getattr(module, "bias", None) is None:  # no bias to move a constant into: fit the weights alone
            gram, cross = gram[:-1, :-1], cross[:, :-1]
        ridge = max(damping, _MIN_DAMPING) * gram.diagonal().mean()
        damped = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
        solution = torch.linalg.solve(damped, cross.T).T  # (out, in [+ 1])
        error = (torch.einsum("oi,ij,oj->", solution, gram, solution) - 2 * (solution * cross).sum()
                 + target_square)
        errors[name] = float((error.clamp_min(0) / max(target_square, 1e-30)) ** 0.5)
        with torch.no_grad():
            target = weight_matrix(module)
            target.copy_(solution[:, :target.shape[1]].to(target.dtype))
            if module.bias is not None:
                module.bias.copy_(solution[:, -1].to(module.bias.dtype))
    return errors, residual
