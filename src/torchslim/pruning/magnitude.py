"""Magnitude pruning: zero the smallest-magnitude weights of Conv and Linear layers.

``scope: global`` ranks all weights together (layers that matter less lose more); ``local`` prunes every layer
to the same sparsity. ``pattern: "N:M"`` instead keeps the N largest of every M consecutive inputs of each output
row of the Linear layers (and GPT-2's Conv1D), the pattern sparse tensor cores run. The zeros are baked into the
weights, and the masks are kept so that later training steps keep them at zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from torchslim._deprecated import renamed
from torchslim.core.modules import is_linear_like, matches, tied_modules, weight_matrix
from torchslim.pruning.sparsity import nm_mask, parse_pattern, resolve_sparsity
from torchslim.registry import register_method
from torchslim.runtime import TorchDeployable

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class MagnitudePruningConfig:
    """Config of ``prune: {method: magnitude, ...}``.

    Args:
        sparsity: fraction of the selected weights set to zero, in [0, 1). Left out: 0.5, or 1 - N/M for an
            N:M pattern (an explicit value that differs from 1 - N/M is an error).
        scope: "global" (one threshold for all layers) or "local" (each layer to ``sparsity``); unused for N:M.
        skip: module-name patterns (fnmatch) left dense, e.g. ["stem.*", "fc"].
        pattern: "unstructured", or "N:M" (Linear/Conv1D layers only; Conv layers are left dense and reported).
    """

    sparsity: float | None = None
    scope: Literal["global", "local"] = "global"
    skip: list[str] = field(default_factory=list)
    pattern: str = "unstructured"
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", resolve_sparsity(self.sparsity, self.pattern))  # frozen


def prunable_weights(model: nn.Module, skip: list[str],
                     skip_layer=lambda name, reason: None) -> dict[str, torch.Tensor]:
    """``module_name.weight -> weight`` of every Conv/Linear (and GPT-2 Conv1D) not matched by a ``skip``
    pattern. A layer whose weight another module shares (an output head tied to the input embedding) is left
    dense and passed to ``skip_layer(name, reason)``: zeroing it would zero embedding rows too."""
    tied = tied_modules(model)
    weights = {}
    for name, module in model.named_modules():
        if not (isinstance(module, PRUNABLE) or is_linear_like(module)) or matches(name, skip):
            continue
        if name in tied:
            skip_layer(name, f"weight shared with {tied[name]} (tied)")
        else:
            weights[f"{name}.weight"] = module.weight
    return weights


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero ``sparsity`` of the weights by magnitude (globally or per layer)."""
    if scope == "global":
        scores = torch.cat([w.detach().abs().flatten() for w in weights.values()])
        k = int(sparsity * scores.numel())
        threshold = scores.kthvalue(k).values if k > 0 else scores.new_tensor(-1.0)
        return {name: w.detach().abs() > threshold for name, w in weights.items()}
    masks = {}
    for name, w in weights.items():
        k = int(sparsity * w.numel())
        threshold = w.detach().abs().flatten().kthvalue(k).values if k > 0 else w.new_tensor(-1.0)
        masks[name] = w.detach().abs() > threshold
    return masks


def nm_magnitude_masks(model: nn.Module, pattern: str, skip: list[str],
                       skip_layer=lambda name, reason: None) -> dict[str, torch.Tensor]:
    """``module_name.weight -> keep-mask`` (in the parameter's layout) keeping N of every M inputs by ``|W|``.

    Args:
        model: its Linear layers and GPT-2 Conv1D layers not matched by ``skip`` are masked.
        pattern: "N:M".
        skip: module-name patterns (fnmatch) left dense.
        skip_layer: ``skip_layer(name, reason)`` for prunable layers left dense (convs, tied weights, widths not
            divisible by M).

    Returns:
        The masks; a Conv1D's mask is transposed back to its stored ``(in, out)`` layout.
    """
    n, m = parse_pattern(pattern)
    masks, tied = {}, tied_modules(model)
    for name, module in model.named_modules():
        if matches(name, skip):
            continue
        if name in tied and is_linear_like(module):
            skip_layer(name, f"weight shared with {tied[name]} (tied)")
        elif isinstance(module, PRUNABLE) and not isinstance(module, nn.Linear):
            skip_layer(name, f"N:M pattern {pattern} applies to Linear layers only")
        elif is_linear_like(module):
            w = weight_matrix(module).detach()
            if w.shape[1] % m:
                skip_layer(name, f"{w.shape[1]} inputs are not a multiple of {m} (pattern {pattern})")
                continue
            keep = nm_mask(w.abs().float(), n, m)
            masks[f"{name}.weight"] = keep if isinstance(module, nn.Linear) else keep.t()
    return masks


@register_method("prune", "magnitude", MagnitudePruningConfig)
def prune_magnitude(context, config: MagnitudePruningConfig) -> TorchDeployable:
    """Zero weights in place; returns the pruned model with per-layer sparsity in ``details``."""
    if config.pattern != "unstructured":
        masks = nm_magnitude_masks(context.model, config.pattern, config.skip, context.skip_layer)
        weights = {name: context.model.get_submodule(name.rpartition(".")[0]).weight for name in masks}
    else:
        weights = prunable_weights(context.model, config.skip, context.skip_layer)
        masks = magnitude_masks(weights, config.sparsity, config.scope) if weights else {}
    if not weights:
        context.skip_layer("*", "no Conv/Linear layers to prune")
        return TorchDeployable(context.model)
    with torch.no_grad():
        for name, weight in weights.items():
            weight.mul_(masks[name])
            context.masks[name] = masks[name] & context.masks.get(name, masks[name])
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    layer_sparsity = {name: round(1 - float(m.float().mean()), 4) for name, m in masks.items()}
    return TorchDeployable(context.model, details={"sparsity": round(zeros / total, 4), "pattern": config.pattern,
                                                   "layers": layer_sparsity})


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "MagnitudePruning": "MagnitudePruningConfig",
})
