"""BatchNorm folding: ``conv -> bn`` becomes one convolution with scaled weights and a shifted bias.

In eval mode a BatchNorm is the affine map ``y = (x - mean) * g / sqrt(var + eps) + b``; when ``x`` is a
convolution's (or Linear's) output used by nothing else, the map folds into that layer: weights scaled per
output channel by ``s = g / sqrt(var + eps)``, bias ``(bias - mean) * s + b``. Integer kernels never see a
BatchNorm, so quantization — simulated (QAT) or real — must see the folded weights.

Pairs are found on the captured graph (`torchslim.graph.capture`), so a BatchNorm is folded only when its
input is exactly one layer's output with no other reader; every other BatchNorm is left as it is and reported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.core.modules import replace_module

_CONV_OPS = ("conv1d", "conv2d", "conv3d", "convolution", "linear")
_BN_OPS = ("batch_norm",)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _op_name(node) -> str:
    target = node.target
    return str(getattr(target, "__name__", target)).lower()


def _owner(node, param_names: dict[str, str]) -> str | None:
    """The module owning the node's weight (its second argument for both convolutions and norms)."""
    weights = [param_names.get(arg.name) for arg in node.args[:2] if isinstance(arg, torch.fx.Node)]
    names = [name for name in weights if name and name.endswith(".weight")]
    return names[0].rsplit(".", 1)[0] if names else None


def foldable_pairs(model: nn.Module, example_inputs: Any, capture_how: str = "auto") -> tuple[list[tuple[str, str]],
                                                                                              dict[str, str]]:
    """``[(layer, batchnorm), ...]`` that can be folded, and ``{batchnorm: why not}`` for those that cannot."""
    from torchslim.graph.capture import capture

    program = capture(model, example_inputs, capture_how)
    signature = program.graph_signature
    param_names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and any(op in _op_name(node) for op in _CONV_OPS + _BN_OPS):
            owner = _owner(node, param_names)
            calls[owner] = calls.get(owner, 0) + 1
    pairs, refused = [], {}
    for node in program.graph.nodes:
        if node.op != "call_function" or not any(op in _op_name(node) for op in _BN_OPS):
            continue
        bn_name = _owner(node, param_names) or node.name
        bn = modules.get(bn_name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            refused[bn_name] = "not a BatchNorm module with running statistics"
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or not any(op in _op_name(source) for op in _CONV_OPS):
            refused[bn_name] = "its input is not a convolution or linear layer's output"
            continue
        layer_name = _owner(source, param_names)
        if not isinstance(modules.get(layer_name), _FOLDABLE):
            refused[bn_name] = f"its input comes from {layer_name or source.name}, not a Conv/Linear module"
            continue
        if calls.get(layer_name, 0) > 1 or calls.get(bn_name, 0) > 1:
            refused[bn_name] = f"{layer_name} or {bn_name} is called more than once"
            continue
        if len(source.users) != 1:
            refused[bn_name] = f"{layer_name}'s output is also read elsewhere"
            continue
        pairs.append((layer_name, bn_name))
    return pairs, refused


@torch.no_grad()
def fold_pair(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` into ``layer`` in place (the BatchNorm itself is left untouched)."""
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    weight = layer.weight
    weight.mul_(scale.reshape(-1, *[1] * (weight.dim() - 1)).to(weight.dtype))
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = ((bias - bn.running_mean) * scale + shift).to(weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def fold_batchnorms(model: nn.Module, example_inputs: Any, capture_how: str = "auto") -> tuple[list[str],
                                                                                             dict[str, str]]:
    """Fold every foldable BatchNorm of ``model`` (eval mode) into its layer, replacing it by ``nn.Identity``.

    Returns the folded BatchNorm names and ``{name: reason}`` for those left in place.
    """
    pairs, refused = foldable_pairs(model, example_inputs, capture_how)
    folded = []
    for layer_name, bn_name in pairs:
        fold_pair(model.get_submodule(layer_name), model.get_submodule(bn_name))
        replace_module(model, bn_name, nn.Identity())
        folded.append(bn_name)
    return folded, refused
