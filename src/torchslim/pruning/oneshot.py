"""One-shot pruning of large models from a little calibration data: ``prune: {method: wanda | sparsegpt}``.

Both walk the model block by block (`torchslim.core.calibration.run_sequential`), so each block is pruned on the
inputs the already-pruned blocks before it produce, and only one block's statistics are in memory at a time.

- ``wanda`` (Sun et al. 2023) drops, per output row, the weights with the smallest ``|W_ij| · ‖X_j‖₂`` (no update).
- ``sparsegpt`` (Frantar & Alistarh 2023) drops weights by OBS saliency and updates the remaining ones to
  reconstruct the layer's outputs (needs each layer's input Hessian: more compute, better accuracy).

Patterns: "unstructured", or "N:M" (keep N of every M consecutive inputs, e.g. "2:4" for sparse tensor cores).
Only linear layers (``nn.Linear``, GPT-2's ``Conv1D``) are pruned; ``lm_head`` stays dense by default, as in both
papers. The zeros are baked into the weights and the masks kept, so later fine-tuning keeps them at zero.

Example recipe step::

    - prune: {method: sparsegpt, pattern: "2:4", calibration: {samples: 128, batch_size: 8}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from torchslim._config import check
from torchslim._deprecated import renamed
from torchslim.core.calibration import LayerStats, run_sequential
from torchslim.core.modules import linear_layers, matches, set_weight_matrix_, tied_modules, weight_matrix
from torchslim.data.config import CalibrationConfig
from torchslim.pruning.sparsity import parse_pattern, resolve_sparsity, sparsegpt_prune, wanda_mask
from torchslim.registry import register_method
from torchslim.runtime import TorchDeployable

DEFAULT_SKIP = ("*lm_head*",)


@dataclass(frozen=True)
class OneShotPruning:
    """Fields shared by ``prune: {method: wanda | sparsegpt, ...}``.

    Args:
        sparsity: fraction of each pruned layer's weights set to zero, in [0, 1). Left out: 0.5 for
            "unstructured", 1 - N/M for an N:M pattern (an explicit value that differs from 1 - N/M is an error).
        pattern: "unstructured" or "N:M" (keep N of every M consecutive inputs of each output row).
        calibration: the calibration samples (`CalibrationConfig`; default 128 samples of the ``calib`` split,
            fewer if it is smaller, in batches of 8).
        skip: module-name patterns (fnmatch) left dense; default ["*lm_head*"].
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(samples=128, batch_size=8))
    skip: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP))
    version: int = 1
    renamed_fields: ClassVar[dict[str, str]] = {
        "calibration_batches": "calibration.samples (samples, not batches: calibration_batches x batch_size)",
        "batch_size": "calibration.batch_size"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", resolve_sparsity(self.sparsity, self.pattern))  # frozen


@dataclass(frozen=True)
class WandaConfig(OneShotPruning):
    """Config of ``prune: {method: wanda, ...}`` (the shared fields of `OneShotPruning`)."""


@dataclass(frozen=True)
class SparseGPTConfig(OneShotPruning):
    """Config of ``prune: {method: sparsegpt, ...}``: the shared fields of `OneShotPruning`, and

    Args:
        blocksize: columns pruned together before their error is propagated to the rest (lazy batch updates).
        damping: added to diag(H), as a fraction of its mean, so that H can be inverted.
    """

    blocksize: int = 128
    damping: float = 0.01
    renamed_fields: ClassVar[dict[str, str]] = {**OneShotPruning.renamed_fields, "damp": "damping"}

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.blocksize >= 1, "blocksize", f"must be >= 1, got {self.blocksize}")
        check(0.0 < self.damping <= 1.0, "damping", f"must be in (0, 1], got {self.damping}")


LayerPruner = Callable[[Tensor, LayerStats], "tuple[Tensor, Tensor]"]


def _candidates(context, config: OneShotPruning, method: str) -> dict[str, nn.Module]:
    """The layers to prune; every other prunable layer is reported as skipped, with the reason."""
    model = context.model
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            context.skip_layer(name, f"{method} prunes Linear layers only")
    tied, nm = tied_modules(model), parse_pattern(config.pattern)
    layers = {}
    for name, module in linear_layers(model).items():
        pattern = next((p for p in config.skip if matches(name, [p])), None)
        if pattern is not None:
            context.skip_layer(name, f"matches skip pattern {pattern!r}")
        elif name in tied:
            context.skip_layer(name, f"weight shared with {tied[name]} (tied)")
        elif nm is not None and weight_matrix(module).shape[1] % nm[1]:
            context.skip_layer(name, f"{weight_matrix(module).shape[1]} inputs are not a multiple of {nm[1]} "
                                     f"(pattern {config.pattern})")
        else:
            layers[name] = module
    return layers


def _to_device(inputs, device: torch.device):
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(item, device) for item in inputs)
    return inputs.to(device) if torch.is_tensor(inputs) else inputs


def _param_layout(module: nn.Module, keep: Tensor) -> Tensor:
    return keep if isinstance(module, nn.Linear) else keep.t()  # GPT-2 Conv1D stores (in, out)


def prune_one_shot(context, config: OneShotPruning, prune_layer: LayerPruner, want: str,
                   method: str) -> TorchDeployable:
    """Prune ``context.model`` block by block with ``prune_layer(weight (out, in), stats) -> (pruned, keep)``.

    Args:
        context: the step context (model changed in place; masks recorded in ``context.masks``).
        config: the shared one-shot fields (sparsity, pattern, calibration, skip).
        prune_layer: the method on one layer.
        want: the `LayerStats` field ``prune_layer`` needs ("sq_norm" or "hessian").
        method: the method's name, for messages.

    Returns:
        The pruned model; ``details`` holds the achieved sparsity over the pruned layers, the pattern, each
        layer's sparsity and the number of calibration tokens (padding not counted).
    """
    from torchslim.core.calibration import calibration_batches, require_calibration_tokens

    layers = _candidates(context, config, method)
    details = {"sparsity": 0.0, "pattern": config.pattern, "layers": {}, "calibration_tokens": 0}
    if not layers:
        context.skip_layer("*", f"no Linear layers for {method} to prune")
        return TorchDeployable(context.model, details=details)
    device = next(context.model.parameters()).device
    batches = [_to_device(inputs, device) for inputs in calibration_batches(context, config.calibration)]
    tokens = require_calibration_tokens(batches, context.where, method)
    keeps: dict[str, Tensor] = {}

    def process(block_name: str, block: nn.Module, stats: dict[str, LayerStats]) -> None:
        for name, layer_stats in stats.items():
            module = layers[name]
            pruned, keep = prune_layer(weight_matrix(module).detach(), layer_stats)
            key = f"{name}.weight"
            previous = context.masks.get(key)
            if previous is not None:  # an earlier step's zeros stay zeros (SparseGPT's update would revive them)
                keep = keep & _param_layout(module, previous.to(keep.device))
            set_weight_matrix_(module, pruned * keep)
            context.masks[key] = _param_layout(module, keep)
            keeps[name] = keep

    others = [name for name in linear_layers(context.model) if name not in layers]
    run_sequential(context.model, batches, process, want=(want,), skip=others)
    for name in layers:
        if name not in keeps:
            context.skip_layer(name, "not called by the model's forward during calibration")
    total = sum(keep.numel() for keep in keeps.values())
    zeros = sum(int((~keep).sum()) for keep in keeps.values())
    details.update(sparsity=round(zeros / max(total, 1), 4), calibration_tokens=tokens,
                   layers={name: round(1 - float(keep.float().mean()), 4) for name, keep in keeps.items()})
    return TorchDeployable(context.model, details=details)


@register_method("prune", "wanda", WandaConfig)
def prune_wanda(context, config: WandaConfig) -> TorchDeployable:
    """Wanda: drop the weights with the smallest ``|W|·‖X‖`` per output row, block by block; no weight update."""
    def prune_layer(w: Tensor, stats: LayerStats) -> tuple[Tensor, Tensor]:
        keep = wanda_mask(w, stats.sq_norm, config.sparsity, config.pattern)
        return w * keep, keep

    return prune_one_shot(context, config, prune_layer, "sq_norm", "wanda")


@register_method("prune", "sparsegpt", SparseGPTConfig)
def prune_sparsegpt(context, config: SparseGPTConfig) -> TorchDeployable:
    """SparseGPT: OBS pruning with weight reconstruction from each layer's input Hessian, block by block."""
    def prune_layer(w: Tensor, stats: LayerStats) -> tuple[Tensor, Tensor]:
        return sparsegpt_prune(w, stats.hessian, config.sparsity, config.pattern, config.blocksize, config.damping)

    return prune_one_shot(context, config, prune_layer, "hessian", "sparsegpt")


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "WandaPruning": "WandaConfig",
    "SparseGPTPruning": "SparseGPTConfig",
})
