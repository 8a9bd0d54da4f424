"""Unstructured magnitude pruning: zero the smallest-magnitude weights of Conv and Linear layers.

``scope: global`` ranks all weights together (layers that matter less lose more); ``local`` prunes every layer
to the same sparsity. The zeros are baked into the weights, and the masks are kept so that later training
steps keep them at zero.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from torchslim._config import check
from torchslim.registry import register_method
from torchslim.runtime import TorchDeployable

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class MagnitudePruning:
    """Config of ``prune: {method: magnitude, ...}``.

    Args:
        sparsity: fraction of the selected weights set to zero, in [0, 1).
        scope: "global" (one threshold for all layers) or "local" (each layer to ``sparsity``).
        skip: module-name patterns (fnmatch) left dense, e.g. ["stem.*", "fc"].
    """

    sparsity: float = 0.5
    scope: Literal["global", "local"] = "global"
    skip: list[str] = field(default_factory=list)
    version: int = 1

    def __post_init__(self) -> None:
        check(0.0 <= self.sparsity < 1.0, "sparsity", f"must be in [0, 1), got {self.sparsity}")


def prunable_weights(model: nn.Module, skip: list[str]) -> dict[str, torch.Tensor]:
    """``module_name.weight -> weight`` of every Conv/Linear not matched by a ``skip`` pattern."""
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if isinstance(module, PRUNABLE) and not any(fnmatch.fnmatch(name, p) for p in skip)}


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


@register_method("prune", "magnitude", MagnitudePruning)
def prune_magnitude(context, config: MagnitudePruning) -> TorchDeployable:
    """Zero weights in place; returns the pruned model with per-layer sparsity in ``details``."""
    weights = prunable_weights(context.model, config.skip)
    if not weights:
        context.skip_layer("*", "no Conv/Linear layers to prune")
        return TorchDeployable(context.model)
    masks = magnitude_masks(weights, config.sparsity, config.scope)
    with torch.no_grad():
        for name, weight in weights.items():
            weight.mul_(masks[name])
            context.masks[name] = masks[name] & context.masks.get(name, masks[name])
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    layer_sparsity = {name: round(1 - float(m.float().mean()), 4) for name, m in masks.items()}
    return TorchDeployable(context.model, details={"sparsity": round(zeros / total, 4), "layers": layer_sparsity})
