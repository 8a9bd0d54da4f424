"""Cross-layer equalization (CLE) with high-bias absorption, after Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction".

For two layers ``A -> act -> B`` where ``act`` is positively homogeneous (``act(x / s) = act(x) / s`` for
``s > 0``: ReLU, LeakyReLU, or no activation), dividing A's output channel ``i`` (weights and bias) by ``s_i``
and multiplying B's input channel ``i`` by ``s_i`` leaves the function unchanged. Choosing
``s_i = sqrt(r1_i / r2_i)``, where ``r1_i`` is the range (max |w|) of A's output channel and ``r2_i`` that of B's
input channel, gives both the same range ``sqrt(r1_i * r2_i)``: per-channel ranges that differed by orders of
magnitude (typical of depthwise convolutions after BatchNorm folding) become similar, so a per-tensor or coarse
weight grid loses less. A depthwise B takes input channel ``i`` with its own single filter, so a pointwise ->
depthwise -> pointwise chain forms two pairs; a layer in two pairs is rebalanced by repeating the sweep until
the scales stop moving.

ReLU6 is not homogeneous (its clip point 6 would move to ``6 / s_i``), so pairs through ReLU6 are left alone
unless ``relu6_as_relu`` is set: then the ReLU6 module is replaced by ReLU first (as the paper does for
MobileNetV2). That changes the float function wherever a pre-activation exceeds 6 (measured on
EfficientNet-Lite0, whose pre-activations often do: top-1 agreement with the original fell to 0.25 on 16
photos), so it is off by default, and a module shared with a pair that cannot be equalized is never replaced.
(Scales bounded so that the clip is never reached on calibration data are not exact on other data: held-out
pre-activations exceed the calibration maxima, and the moved clip point then cuts them.)

High-bias absorption: after a BatchNorm with shift ``beta`` and scale ``gamma``, A's pre-activation rarely falls
below ``c = max(0, beta - 3 |gamma|)``; for a ReLU, ``relu(x) = relu(x - c) + c`` whenever ``x >= c``, so ``c``
moves from A's bias to B's (``b2 += W2 c``). This narrows the activation range B's input is quantized on. It is
applied only where B has no zero padding (1x1 convolutions, Linear): padding would make ``W2 c`` position
dependent. It is exact for every input whose pre-activation stays above ``c`` (the 3-sigma assumption).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim.core.modules import replace_module
from torchslim.quant.fold import _CONV_OPS, _op_name, _owner

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Ops between A and B that commute with a positive per-channel scale (zero padding does; the Lite models pad
# explicitly before a depthwise convolution).
_TRANSPARENT = ("constant_pad_nd", "pad", "dropout", "clone", "contiguous")


@dataclass
class Pair:
    """``first -> activation -> second`` found on the captured graph; ``activation`` is "identity", "relu",
    "leaky_relu" or "relu6"; ``activation_module`` is the module computing it ("" for a functional call)."""

    first: str
    second: str
    activation: str
    activation_module: str = ""
    padded: bool = False


@dataclass
class EqualizationResult:
    """What `equalize_` did: the pairs equalized, the pairs left alone with the reason, the sweeps run, the
    ReLU6 modules replaced by ReLU, and the channels whose bias was absorbed."""

    pairs: list[Pair] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    sweeps: int = 0
    replaced_relu6: list[str] = field(default_factory=list)
    absorbed_channels: int = 0

    def summary(self) -> dict:
        return {"equalized_pairs": [f"{p.first} -> {p.activation} -> {p.second}" for p in self.pairs],
                "refused_pairs": dict(self.refused), "sweeps": self.sweeps,
                "relu6_replaced_by_relu": list(self.replaced_relu6), "bias_absorbed_channels": self.absorbed_channels}


def _activation(node) -> str | None:
    name = _op_name(node)
    if name.startswith("relu6") or name.startswith("hardtanh"):
        low, high = (list(node.args[1:3]) + [-1.0, 1.0])[:2] if name.startswith("hardtanh") else (0.0, 6.0)
        return "relu6" if (low, high) == (0.0, 6.0) else None
    if name.startswith("relu"):
        return "relu"
    if name.startswith("leaky_relu"):
        return "leaky_relu"
    return None


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _zero_padding(node, name: str) -> bool:
    """aten.constant_pad_nd(x, pad, value=0) or aten.pad(x, pad, mode="constant", value=None or 0)."""
    if name.startswith("constant_pad_nd"):
        return (list(node.args[2:3]) or [0])[0] in (0, 0.0)
    mode = (list(node.args[2:3]) or [node.kwargs.get("mode", "constant")])[0]
    value = (list(node.args[3:4]) or [node.kwargs.get("value")])[0]
    return mode == "constant" and value in (None, 0, 0.0)


def _single_reader(node) -> bool:
    return len(node.users) == 1


def _walk_back(node) -> tuple[Any, str, str, bool] | str:
    """From B's input back to A: (A's node, activation, activation module, padded) or why not."""
    activation, module, padded = "identity", "", False
    while True:
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            return "its input is not a layer's output"
        if not _single_reader(node):
            return f"{node.name}'s output is also read elsewhere"
        name = _op_name(node)
        if any(op in name for op in _CONV_OPS):
            return node, activation, module, padded
        kind = _activation(node)
        if kind and activation == "identity":
            activation, module = kind, _module_of(node)
        elif any(name.startswith(op) for op in _TRANSPARENT):
            if name.startswith(("constant_pad_nd", "pad")) and not _zero_padding(node, name):
                return f"{node.name} pads with something else than zeros"
            padded = padded or name.startswith(("constant_pad_nd", "pad"))
        else:
            return f"{node.name} ({name}) between the layers is not positively homogeneous"
        node = node.args[0]


def equalizable_pairs(model: nn.Module, example_inputs: Any, capture_how: str = "auto"
                      ) -> tuple[list[Pair], dict[str, str]]:
    """``[Pair, ...]`` of Conv/Linear layers joined by a homogeneous activation (or ReLU6), each layer called
    once and each intermediate output read only by the next op; ``{layer: why not}`` for the other layers."""
    from torchslim.graph.capture import capture

    program = capture(model, example_inputs, capture_how)
    signature = program.graph_signature
    param_names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    modules = dict(model.named_modules())
    layer_nodes = [n for n in program.graph.nodes
                   if n.op == "call_function" and any(op in _op_name(n) for op in _CONV_OPS)]
    calls: dict[str, int] = {}
    for node in layer_nodes:
        owner = _owner(node, param_names)
        calls[owner] = calls.get(owner, 0) + 1
    pairs, refused = [], {}
    for node in layer_nodes:
        second = _owner(node, param_names)
        found = _walk_back(node.args[0])
        if isinstance(found, str):
            refused[str(second)] = found
            continue
        source, activation, module, padded = found
        first = _owner(source, param_names)
        why = _why_not(modules, calls, first, second)
        if why:
            refused[str(second)] = why
            continue
        pairs.append(Pair(first, second, activation, module, padded))
    return pairs, refused


def _why_not(modules: dict, calls: dict, first: str | None, second: str | None) -> str | None:
    a, b = modules.get(first), modules.get(second)
    if not isinstance(a, _LAYERS) or not isinstance(b, _LAYERS):
        return f"{first} -> {second}: not both Conv/Linear modules"
    if calls.get(first, 0) > 1 or calls.get(second, 0) > 1:
        return f"{first} or {second} is called more than once"
    if a.weight.shape[0] != _in_channels(b):
        return f"{first} has {a.weight.shape[0]} outputs, {second} takes {_in_channels(b)} channels"
    return None


def _in_channels(layer: nn.Module) -> int:
    return layer.weight.shape[1] * getattr(layer, "groups", 1)


def _grouped(layer: nn.Module) -> torch.Tensor:
    """B's weight as (groups, out per group, in per group, kernel positions): input channel ``g * in + j``."""
    groups = getattr(layer, "groups", 1)
    weight = layer.weight
    return weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)


def _input_ranges(layer: nn.Module) -> torch.Tensor:
    return _grouped(layer).abs().amax(dim=(1, 3)).reshape(-1)


def _output_ranges(layer: nn.Module) -> torch.Tensor:
    return layer.weight.abs().reshape(layer.weight.shape[0], -1).amax(1)


@torch.no_grad()
def _scale_pair(first: nn.Module, second: nn.Module) -> torch.Tensor:
    """Equalize one pair in place; returns the scales ``s`` (A's channels divided, B's multiplied)."""
    r1, r2 = _output_ranges(first).double(), _input_ranges(second).double()
    scale = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
    shape = (-1,) + (1,) * (first.weight.dim() - 1)
    first.weight.div_(scale.reshape(shape).to(first.weight.dtype))
    if first.bias is not None:
        first.bias.div_(scale.to(first.bias.dtype))
    groups = getattr(second, "groups", 1)
    grouped = _grouped(second)
    grouped.mul_(scale.reshape(groups, 1, -1, 1).to(grouped.dtype))
    second.weight.copy_(grouped.reshape(second.weight.shape))
    return scale


def _usable(pairs: list[Pair], modules: dict, calls: dict[str, int], relu6_as_relu: bool,
            refused: dict[str, str]) -> list[Pair]:
    """The pairs that can be scaled exactly, after deciding which ReLU6 modules may become ReLU: only those
    whose every call sits in a candidate pair (a module shared with any other use keeps its clip)."""
    relu6_calls: dict[str, int] = {}
    for pair in pairs:
        if pair.activation == "relu6" and pair.activation_module:
            relu6_calls[pair.activation_module] = relu6_calls.get(pair.activation_module, 0) + 1
    kept = []
    for pair in pairs:
        if pair.activation == "relu6":
            module = modules.get(pair.activation_module)
            if not relu6_as_relu:
                refused[pair.second] = "ReLU6 between the layers is not positively homogeneous (relu6_as_relu off)"
                continue
            if not isinstance(module, nn.ReLU6) or relu6_calls[pair.activation_module] != calls.get(
                    pair.activation_module, 0):
                refused[pair.second] = "its ReLU6 is functional or shared with a layer outside the pairs"
                continue
        kept.append(pair)
    return kept


def _activation_calls(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """How many times each ReLU6 module runs in one forward pass (hooks, since export names only the last)."""
    counts: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
               for name, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    try:
        with torch.no_grad():
            args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return counts


@torch.no_grad()
def _absorb(pair: Pair, modules: dict, shift: tuple[torch.Tensor, torch.Tensor], scale: torch.Tensor) -> int:
    """Move ``c = max(0, beta - 3 |gamma|)`` (in A's equalized units) from A's bias into B's; returns the
    number of channels moved."""
    first, second = modules[pair.first], modules[pair.second]
    beta, gamma = shift
    c = ((beta - 3 * gamma.abs()).double() / scale).clamp_min(0)
    if first.bias is None or not bool((c > 0).any()):
        return 0
    grouped = _grouped(second).double().sum(-1)  # (groups, out, in): a constant input sums over the kernel
    moved = torch.einsum("goi,gi->go", grouped, c.reshape(grouped.shape[0], -1)).reshape(-1)
    if second.bias is None:
        second.bias = nn.Parameter(torch.zeros(second.weight.shape[0], dtype=second.weight.dtype))
    first.bias.sub_(c.to(first.bias.dtype))
    second.bias.add_(moved.to(second.bias.dtype))
    return int((c > 0).sum())


def _no_padding(layer: nn.Module) -> bool:
    padding = getattr(layer, "padding", 0)
    return isinstance(layer, nn.Linear) or (padding != "same" and all(p == 0 for p in
                                                                      (padding if isinstance(padding, tuple)
                                                                       else (padding,))))


@torch.no_grad()
def equalize_(model: nn.Module, example_inputs: Any, *, shifts: dict[str, tuple[torch.Tensor, torch.Tensor]]
              | None = None, relu6_as_relu: bool = False, max_sweeps: int = 20, tolerance: float = 1e-3,
              capture_how: str = "auto") -> EqualizationResult:
    """Cross-layer equalize ``model`` (eval mode, BatchNorms already folded) in place.

    Args:
        model: the float model; its Conv/Linear weights and biases change, its function does not.
        example_inputs: inputs to capture the graph with.
        shifts: ``{layer: (beta, gamma)}`` of the BatchNorm that was folded into each layer (see
            `fold_and_equalize_`), for high-bias absorption; None skips absorption.
        relu6_as_relu: replace a ReLU6 that sits between two equalizable layers by ReLU and equalize the pair
            (changes the function where a pre-activation exceeds 6); otherwise such pairs are left alone.
        max_sweeps: the most passes over all pairs; a pass ends the loop when no scale moves by more than
            ``tolerance`` (relative).

    Returns:
        `EqualizationResult`: the pairs equalized and those refused.

    Example:
        >>> result = equalize_(model.eval(), torch.randn(1, 3, 32, 32))
        >>> result.summary()["equalized_pairs"]
    """
    pairs, refused = equalizable_pairs(model, example_inputs, capture_how)
    modules = dict(model.named_modules())
    calls = _activation_calls(model, example_inputs)
    result = EqualizationResult(refused=refused)
    result.pairs = _usable(pairs, modules, calls, relu6_as_relu, refused)
    for name in sorted({p.activation_module for p in result.pairs if p.activation == "relu6"}):
        replace_module(model, name, nn.ReLU())
        result.replaced_relu6.append(name)
    total = {p.first: torch.ones(modules[p.first].weight.shape[0], dtype=torch.float64) for p in result.pairs}
    for sweep in range(max_sweeps):
        moved = 0.0
        for pair in result.pairs:
            scale = _scale_pair(modules[pair.first], modules[pair.second])
            total[pair.first] *= scale
            moved = max(moved, float((scale - 1).abs().max()))
        result.sweeps = sweep + 1
        if moved <= tolerance:
            break
    for pair in result.pairs:
        if shifts and pair.first in shifts and pair.activation in ("relu", "relu6") and not pair.padded \
                and _no_padding(modules[pair.second]):
            result.absorbed_channels += _absorb(pair, modules, shifts[pair.first], total[pair.first])
    return result


@torch.no_grad()
def fold_and_equalize_(model: nn.Module, example_inputs: Any, *, relu6_as_relu: bool = False,
                       capture_how: str = "auto") -> tuple[EqualizationResult, list[str], dict[str, str]]:
    """Fold every foldable BatchNorm (`torchslim.quant.fold`), keeping each one's ``(beta, gamma)`` for
    high-bias absorption, then `equalize_`. Returns (result, folded BatchNorms, {BatchNorm: why not folded})."""
    from torchslim.quant.fold import fold_batchnorms, foldable_pairs

    pairs, _ = foldable_pairs(model, example_inputs, capture_how)
    shifts = {}
    for layer, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        if bn.affine:
            shifts[layer] = (bn.bias.detach().clone(), bn.weight.detach().clone())
    folded, refused = fold_batchnorms(model, example_inputs, capture_how)
    result = equalize_(model, example_inputs, shifts=shifts, relu6_as_relu=relu6_as_relu, capture_how=capture_how)
    return result, folded, refused
