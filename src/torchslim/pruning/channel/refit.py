"""Refit after pruning (``reconstruct: true``): every linear layer that lost input channels is re-solved by least
squares, one after another in the order they run, so its output stays as close as possible to the unpruned
layer's: ``[W' b'] = E[y x~^T] (E[x~ x~^T] + damping)^-1`` with ``x~ = [x, 1]``. Correlated kept channels take
over the removed ones' share, a removed channel's mean moves into the bias, and the error earlier layers left
behind is corrected where it can be."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from torchslim.core.calibration import StopForward
from torchslim.core.modules import call_model, is_linear_like, tied_modules, weight_matrix
from torchslim.graph import ChannelGraph
from torchslim.pruning.channel.importance import MIN_DAMPING, input_dim


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
        ridge = max(damping, MIN_DAMPING) * gram.diagonal().mean()
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


def kept_linear_positions(model: nn.Module, graph: ChannelGraph, chosen: set[int],
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
        in_dim = input_dim(module)
        kept = []
        for dim in (1 - in_dim, in_dim):
            ids = graph.param_ids.get((f"{name}.weight", dim))
            mask = None if ids is None else np.array([r not in chosen for r in graph.uf.roots(ids).tolist()])
            kept.append(None if mask is None or mask.all() else np.flatnonzero(mask))
        if kept[1] is not None:
            found[name] = tuple(kept)
    return found
