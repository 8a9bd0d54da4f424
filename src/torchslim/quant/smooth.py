"""SmoothQuant-style smoothing of the Linear layers a LayerNorm feeds (after Xiao et al. 2023, "SmoothQuant").

Static int8 activations quantize a whole tensor on one grid, and a few input channels with large magnitudes (the
outliers of transformer activations) take most of its range. For ``y = x W^T``, dividing input channel ``j`` by
``s_j`` and multiplying weight column ``j`` by ``s_j`` leaves ``y`` unchanged and moves difficulty from the
activation to the weight, which is quantized per output channel and has room for it. With
``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` (``max|W_j|`` over every Linear reading ``x``), ``alpha`` trades the
two; it is searched per LayerNorm on calibration data, keeping the value whose simulated int8 output (uint8
per-tensor activations, int8 per-channel weights, min-max ranges) is closest to the float one.

The division by ``s`` is folded into the LayerNorm's weight and bias, so nothing is added to the graph. That is
exact only when every reader of the LayerNorm's output is one of the smoothed Linear layers: in a post-LN encoder
(BERT, MiniLM) the LayerNorm's output also feeds the residual connection, so those LayerNorms are left alone and
listed with the reason; pre-LN blocks (GPT-2, OPT, LLaMA-style RMSNorm aside) qualify.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from torchslim.quant.fold import _op_name
from torchslim.quant.qmath import QScheme, fake_quantize, qparams

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_ACTIVATIONS = QScheme(signed=False, symmetric=False)
_WEIGHTS = QScheme(signed=True, symmetric=True, axis=0)


@dataclass
class SmoothingResult:
    """``smoothed``: ``{layernorm: {"linears", "alpha", "error_before", "error_after"}}`` (relative squared error
    of the simulated int8 outputs); ``refused``: ``{layernorm: why not}``."""

    smoothed: dict[str, dict] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def _param_owner(node, param_names: dict[str, str]) -> str | None:
    for arg in node.args:
        name = param_names.get(arg.name) if isinstance(arg, torch.fx.Node) else None
        if name and name.endswith(".weight"):
            return name.rsplit(".", 1)[0]
    return None


def smoothable_groups(model: nn.Module, example_inputs: Any, capture_how: str = "auto"
                      ) -> tuple[list[tuple[str, list[str]]], dict[str, str]]:
    """``[(layernorm, [linear, ...]), ...]`` whose output only those Linear layers read, and ``{layernorm: why
    not}`` for the other LayerNorms."""
    from torchslim.graph.capture import capture

    program = capture(model, example_inputs, capture_how)
    signature = program.graph_signature
    param_names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    modules = dict(model.named_modules())
    groups, refused = [], {}
    for node in program.graph.nodes:
        if node.op != "call_function" or not _op_name(node).startswith("layer_norm"):
            continue
        norm = _param_owner(node, param_names)
        if not isinstance(modules.get(norm), nn.LayerNorm) or modules[norm].weight is None:
            refused[norm or node.name] = "not a LayerNorm module with an affine weight"
            continue
        readers = []
        for user in node.users:
            owner = _param_owner(user, param_names) if _op_name(user).startswith("linear") else None
            if owner is None or user.args[0] is not node or not isinstance(modules.get(owner), nn.Linear):
                readers = None
                refused[norm] = f"its output is also read by {user.name} ({_op_name(user)}), not only Linear layers"
                break
            readers.append(owner)
        if readers:
            groups.append((norm, readers))
    return groups, refused


@torch.no_grad()
def _int8_error(x: torch.Tensor, weights: list[torch.Tensor], scale: torch.Tensor) -> float:
    """Relative squared error of ``x @ W^T`` (each ``W``: out x in) with ``x / scale`` and ``W * scale``
    quantized (int8 simulation)."""
    smoothed = x / scale
    xq = fake_quantize(smoothed, *qparams(smoothed.min(), smoothed.max(), _ACTIVATIONS), _ACTIVATIONS)
    noise = signal = 0.0
    for original in weights:
        weight = original.float() * scale
        bound = weight.abs().amax(1)
        wq = fake_quantize(weight, *qparams(-bound, bound, _WEIGHTS), _WEIGHTS)
        reference = x @ original.float().T
        noise += float((xq @ wq.T - reference).pow(2).sum())
        signal += float(reference.pow(2).sum())
    return noise / max(signal, 1e-30)


@torch.no_grad()
def best_scale(x: torch.Tensor, weights: list[torch.Tensor], alphas: tuple[float, ...] = ALPHAS
               ) -> tuple[torch.Tensor | None, dict]:
    """The smoothing factor ``s`` (one per input channel) for the layers of ``weights`` (each out x in) reading
    the activation rows ``x``: of ``alphas``, the one with the least simulated int8 error, or None when none
    lowers it below the unsmoothed error; with ``{"alpha", "error_before", "error_after"}``."""
    x_max = x.abs().amax(0).clamp_min(1e-5)
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).float().clamp_min(1e-5)
    before = _int8_error(x, weights, torch.ones_like(x_max))
    error, alpha = min((_int8_error(x, weights, x_max ** a / w_max ** (1 - a)), a) for a in alphas)
    found = {"alpha": alpha, "error_before": round(before, 6), "error_after": round(error, 6)}
    return (x_max ** alpha / w_max ** (1 - alpha) if error < before else None), found


def _layernorm_inputs(model: nn.Module, norms: list[str], batches: Iterable, max_rows: int) -> dict[str, torch.Tensor]:
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in norms}

    def record(name):
        def hook(module, args, output):
            if sum(len(r) for r in rows[name]) < max_rows:
                rows[name].append(output.detach().reshape(-1, output.shape[-1]).float())
        return hook

    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in norms]
    try:
        with torch.no_grad():
            for batch in batches:
                model(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(r)[:max_rows] for name, r in rows.items() if r}


@torch.no_grad()
def smooth_(model: nn.Module, example_inputs: Any, calibration: Iterable, *, alphas: tuple[float, ...] = ALPHAS,
            max_rows: int = 4096, capture_how: str = "auto") -> SmoothingResult:
    """Smooth, in place, the Linear layers fed only by a LayerNorm; the float function is unchanged.

    Args:
        model: the float model (eval mode).
        example_inputs: inputs to capture the graph with.
        calibration: input batches; the LayerNorms' outputs on them (up to ``max_rows`` rows each) give the
            activation ranges and score each ``alpha``.
        alphas: the migration strengths tried; the one with the lowest simulated int8 error is kept, and a
            LayerNorm whose best error is not below the unsmoothed one is left as it was.

    Returns:
        `SmoothingResult`.

    Example:
        >>> result = smooth_(model.eval(), tokens[:1], [tokens])
        >>> result.smoothed["blocks.0.norm1"]["alpha"]
    """
    groups, refused = smoothable_groups(model, example_inputs, capture_how)
    result = SmoothingResult(refused=refused)
    inputs = _layernorm_inputs(model, [norm for norm, _ in groups], calibration, max_rows)
    for norm_name, names in groups:
        if norm_name not in inputs:
            result.refused[norm_name] = "not run on the calibration data"
            continue
        norm, linears = model.get_submodule(norm_name), [model.get_submodule(n) for n in names]
        scale, found = best_scale(inputs[norm_name], [linear.weight for linear in linears], alphas)
        if scale is None:
            result.refused[norm_name] = f"no alpha lowers the simulated int8 error ({found['error_before']:.3g})"
            continue
        norm.weight.div_(scale.to(norm.weight.dtype))
        if norm.bias is not None:
            norm.bias.div_(scale.to(norm.bias.dtype))
        for linear in linears:
            linear.weight.mul_(scale.to(linear.weight.dtype))
        result.smoothed[norm_name] = {"linears": names, **found}
    return result
