"""Low-rank factorization by truncated SVD: one Linear or Conv2d becomes two thinner layers in sequence.

A weight matrix W (out x in) is replaced by its best rank-r approximation (Eckart-Young)
W_r = (U_r S_r^1/2)(S_r^1/2 V_r^T): the right factor is the first layer (in -> r, no bias), the left factor the
second (r -> out, the original bias). The relative error ||W - W_r||^2_F / ||W||^2_F is exactly one minus the
retained energy sum(s_i^2, i <= r) / sum(s_i^2).

Convolutions (``groups == 1``) are factorized in one of two ways:

- ``conv: channel``: W [out, in, kh, kw] as a matrix [out, in*kh*kw] -> a kh x kw convolution to r channels
  (the original stride, padding and dilation) followed by a 1x1 convolution to ``out``.
- ``conv: spatial`` (Jaderberg et al., 2014): W[o, c, a, b] ~ sum_k H[k, c, a] V[o, k, b], from the SVD of W
  permuted to [out*kw, in*kh] -> a kh x 1 convolution to r channels (the vertical stride, padding and
  dilation) followed by a 1 x kw convolution to ``out`` (the horizontal ones). The first layer acts on each
  column alone, so moving the horizontal padding after it is exact, for every padding mode.

Ranks: per layer, the smallest r that retains ``energy``; or ``rank_ratio`` of the full rank; or, with
``target_macs``, one global choice: singular values are removed one at a time, always the one that loses the
least relative energy (s_i^2 / sum s^2 of its layer) per MAC it saves (the MACs one unit of rank costs in that
layer), until the estimated MACs of the model are at most ``target_macs`` of the baseline's. Ranks are then
rounded up to a multiple of ``round_to``. A layer whose factorized pair would not cost fewer MACs than it does
is left as it was and listed, as are the layers this method cannot handle.

Example:
    >>> result = factorize_svd(model, SvdConfig(energy=0.9), example_inputs)
    >>> result.macs_after / result.macs_before, result.ranks
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchslim._config import check
from torchslim._deprecated import renamed
from torchslim.core.modules import call_model, forward_shapes, matches, replace_module
from torchslim.errors import ArtifactError, InputError, shorten
from torchslim.measure.macs import count_macs
from torchslim.measure.params import count_params
from torchslim.measure.stage import first_samples
from torchslim.registry import register_method
from torchslim.runtime import SHAPES_FORMAT, TorchDeployable, load_safetensors


@dataclass(frozen=True)
class SvdConfig:
    """Config of ``factorize: {method: svd, ...}`` and of `factorize_svd`.

    Args:
        energy: per layer, keep the smallest rank whose singular values retain this fraction of sum(s^2).
        rank_ratio: instead of ``energy``: keep this fraction of each layer's full rank (0 = unused).
        target_macs: instead of ``energy``: choose ranks globally so that the model's MACs are at most this
            fraction of the baseline's (see the module docstring; 0 = unused).
        layers: module-name patterns (fnmatch) of the layers to factorize, e.g. ["*.intermediate.dense"].
        skip: module-name patterns left as they were (applied after ``layers``).
        conv: how a Conv2d is split: "channel" (kh x kw then 1x1) or "spatial" (kh x 1 then 1 x kw).
        round_to: round ranks up to a multiple of this (hardware-friendly widths); 1 = exact.
    """

    energy: float = 0.9
    rank_ratio: float = 0.0
    target_macs: float = 0.0
    layers: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=list)
    conv: Literal["channel", "spatial"] = "channel"
    round_to: int = 8
    version: int = 1

    def __post_init__(self) -> None:
        check(0.0 < self.energy <= 1.0, "energy", f"must be in (0, 1], got {self.energy}")
        check(0.0 <= self.rank_ratio <= 1.0, "rank_ratio", f"must be in (0, 1] or 0 (unused), got {self.rank_ratio}")
        check(0.0 <= self.target_macs < 1.0, "target_macs",
              f"must be in (0, 1) or 0 (unused), got {self.target_macs}")
        check(not (self.rank_ratio and self.target_macs), "target_macs", "give rank_ratio or target_macs, not both")
        check(bool(self.layers), "layers", "needs at least one pattern (\"*\": every layer)")
        check(self.conv in ("channel", "spatial"), "conv", f"expected 'channel' or 'spatial', got {shorten(self.conv)}")
        check(self.round_to >= 1, "round_to", f"must be >= 1, got {self.round_to}")


@dataclass
class FactorizeResult:
    """What `factorize_svd` did: sizes before and after, the rank and retained energy of every factorized
    layer, what it left alone (layer name -> reason), and whether the MACs met ``target_macs`` (True without
    one)."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    ranks: dict[str, int]
    full_ranks: dict[str, int]
    retained_energy: dict[str, float]
    skipped: dict[str, str]
    target_reached: bool = True


@dataclass
class _Layer:
    """A layer that can be factorized, with its singular values and its cost on the example inputs."""

    name: str
    module: nn.Module
    singular: torch.Tensor  # descending, float64
    full_macs: int  # MACs of the layer as it is
    macs_per_rank: int  # MACs of the factorized pair per unit of rank

    def energy(self, rank: int) -> float:
        """Fraction of sum(s^2) kept by the first ``rank`` singular values."""
        squares = self.singular.square()
        return float(squares[:rank].sum() / squares.sum())


def weight_matrix(module: nn.Module, conv: str = "channel") -> torch.Tensor:
    """The 2-D matrix (float64) whose SVD factorizes ``module`` (an nn.Linear or nn.Conv2d) in mode ``conv``."""
    weight = module.weight.detach().to(torch.float64)
    if isinstance(module, nn.Linear):
        return weight
    out_channels, in_channels, kh, kw = weight.shape
    if conv == "channel":
        return weight.reshape(out_channels, in_channels * kh * kw)
    return weight.permute(0, 3, 1, 2).reshape(out_channels * kw, in_channels * kh)  # [(o, b), (c, a)]


def factorized_layers(module: nn.Module, rank: int, conv: str = "channel") -> nn.Sequential:
    """The two layers computing the rank-``rank`` truncated SVD of ``module``'s weight (same dtype, device)."""
    u, s, vh = torch.linalg.svd(weight_matrix(module, conv), full_matrices=False)
    root = s[:rank].sqrt()
    left, right = u[:, :rank] * root, root[:, None] * vh[:rank]  # W_r = left @ right
    pair = _empty_pair(module, rank, conv)
    first, second = pair
    if isinstance(module, nn.Conv2d) and conv == "spatial":
        out_channels, _, _, kw = module.weight.shape
        left = left.reshape(out_channels, kw, rank).permute(0, 2, 1)  # rows (o, b) -> [o, k, b]
    with torch.no_grad():
        first.weight.copy_(right.reshape(first.weight.shape))
        second.weight.copy_(left.reshape(second.weight.shape))
        if module.bias is not None:
            second.bias.copy_(module.bias)
    return pair


def _empty_pair(module: nn.Module, rank: int, conv: str) -> nn.Sequential:
    """The two layers (uninitialised) that replace ``module`` at ``rank``."""
    weight, bias = module.weight, module.bias is not None
    like = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(module, nn.Linear):
        pair = (nn.Linear(module.in_features, rank, bias=False, **like),
                nn.Linear(rank, module.out_features, bias=bias, **like))
    elif conv == "channel":
        out_channels, in_channels, kh, kw = weight.shape
        pair = (nn.Conv2d(in_channels, rank, (kh, kw), module.stride, module.padding, module.dilation, bias=False,
                          padding_mode=module.padding_mode, **like),
                nn.Conv2d(rank, out_channels, 1, bias=bias, **like))
    else:
        out_channels, in_channels, kh, kw = weight.shape
        (sh, sw), (dh, dw), padding, mode = module.stride, module.dilation, module.padding, module.padding_mode
        first_padding, second_padding = (padding, padding) if isinstance(padding, str) else \
            ((padding[0], 0), (0, padding[1]))
        pair = (nn.Conv2d(in_channels, rank, (kh, 1), (sh, 1), first_padding, (dh, 1), bias=False,
                          padding_mode=mode, **like),
                nn.Conv2d(rank, out_channels, (1, kw), (1, sw), second_padding, (1, dw), bias=bias,
                          padding_mode=mode, **like))
    return nn.Sequential(*pair).train(module.training).requires_grad_(weight.requires_grad)


def _select_modules(model: nn.Module, config: SvdConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers ``config`` names that this method can factorize, and the others it names, with reasons."""
    owners: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    modules, skipped = {}, {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or weight.ndim < 2 or not matches(name, config.layers):
            continue
        if matches(name, config.skip):
            skipped[name] = "excluded by the config (skip)"
        elif type(module) not in (nn.Linear, nn.Conv2d):  # subclasses (e.g. attention's out_proj) may not call forward
            skipped[name] = f"{type(module).__name__} is not factorized (only nn.Linear and nn.Conv2d)"
        elif isinstance(module, nn.Conv2d) and module.groups > 1:
            skipped[name] = f"grouped or depthwise convolution (groups={module.groups})"
        elif owners[id(weight)] > 1:
            skipped[name] = "its weight is shared with another layer (tied)"
        elif not weight.detach().any():
            skipped[name] = "its weight is all zeros"
        else:
            modules[name] = module
    return modules, skipped


def _costs(model: nn.Module, modules: dict[str, nn.Module], conv: str, single: Any) -> dict[str, tuple[int, int]]:
    """Layer name -> (MACs as it is, MACs of the factorized pair per unit of rank), from one forward pass."""
    calls: dict[str, list[tuple[torch.Size, torch.Size]]] = {name: [] for name in modules}
    hooks = [module.register_forward_hook(
        lambda m, args, output, name=name: calls[name].append((args[0].shape, output.shape)))
        for name, module in modules.items()]
    try:
        with torch.inference_mode():
            call_model(model, single)
    finally:
        for hook in hooks:
            hook.remove()
    costs = {}
    for name, module in modules.items():
        full = per_rank = 0
        for in_shape, out_shape in calls[name]:
            if isinstance(module, nn.Linear):
                positions = math.prod(out_shape) // module.out_features
                full += positions * module.in_features * module.out_features
                per_rank += positions * (module.in_features + module.out_features)
                continue
            out_channels, in_channels, kh, kw = module.weight.shape
            positions = math.prod(out_shape) // out_channels
            full += positions * out_channels * in_channels * kh * kw
            if conv == "channel":
                per_rank += positions * (in_channels * kh * kw + out_channels)
            else:  # the kh x 1 layer runs on every input column, the 1 x kw layer on every output position
                rows = positions // out_shape[-1]
                per_rank += rows * (in_shape[-1] * in_channels * kh + out_shape[-1] * out_channels * kw)
        costs[name] = (full, per_rank)
    return costs


def _round_rank(rank: int, full_rank: int, round_to: int) -> int:
    return min(full_rank, -(-max(1, rank) // round_to) * round_to)


def _local_ranks(layers: list[_Layer], config: SvdConfig) -> dict[str, int]:
    ranks = {}
    for layer in layers:
        if config.rank_ratio:
            rank = math.ceil(config.rank_ratio * len(layer.singular))
        else:
            kept = layer.singular.square().cumsum(0) / layer.singular.square().sum()
            # The weights' own precision bounds that of the energies: 0.8 retained in float32 reads 0.79999995.
            tolerance = 16 * torch.finfo(layer.module.weight.dtype).eps
            rank = int((kept < config.energy - tolerance).sum()) + 1
        ranks[layer.name] = _round_rank(rank, len(layer.singular), config.round_to)
    return ranks


def _ranks_for_macs(layers: list[_Layer], budget: float, fixed_macs: int, round_to: int) -> dict[str, int]:
    """Greedy global ranks: drop the singular value losing the least relative energy per MAC saved until the
    estimated MACs (``fixed_macs`` of the layers not factorized, plus each layer's) are within ``budget``."""
    exact = {layer.name: len(layer.singular) for layer in layers}

    def cost(layer: _Layer) -> int:
        return min(layer.full_macs, layer.macs_per_rank * _round_rank(exact[layer.name], len(layer.singular),
                                                                     round_to))

    total = fixed_macs + sum(cost(layer) for layer in layers)
    shares = {layer.name: (layer.singular.square() / layer.singular.square().sum()).tolist() for layer in layers}
    heap = [(shares[layer.name][-1] / layer.macs_per_rank, index) for index, layer in enumerate(layers)
            if len(layer.singular) > 1]
    heapq.heapify(heap)
    while total > budget and heap:
        _, index = heapq.heappop(heap)
        layer = layers[index]
        before = cost(layer)
        exact[layer.name] -= 1
        total += cost(layer) - before
        rank = exact[layer.name]
        if rank > 1:
            heapq.heappush(heap, (shares[layer.name][rank - 1] / layer.macs_per_rank, index))
    return {layer.name: _round_rank(exact[layer.name], len(layer.singular), round_to) for layer in layers}


def _replace_and_check(model: nn.Module, layers: dict[str, _Layer], ranks: dict[str, int], conv: str,
                       example_inputs: Any, reference: tuple, skipped: dict[str, str]) -> dict[str, _Layer]:
    """Swap in the factorized pairs; layers whose replacement breaks the model's code are put back and listed.
    Returns the layers that stay factorized."""
    for name, layer in layers.items():
        replace_module(model, name, factorized_layers(layer.module, ranks[name], conv))
    layers = dict(layers)
    while True:
        shape, error, where = forward_shapes(model, example_inputs)
        if error is None and shape == reference:
            return layers
        involved = [n for n in layers if where is not None and (where in ("", n) or where.startswith(n + ".")
                                                                or n.startswith(where + "."))]
        if error is None or not involved:
            for name, layer in layers.items():
                replace_module(model, name, layer.module)
            raise RuntimeError(f"the factorized model fails ({error or f'output shape {shape} != {reference}'}); "
                               "it was restored; please report this model")
        for name in involved:  # e.g. the parent reads ``self.dense.weight`` itself
            replace_module(model, name, layers.pop(name).module)
            skipped[name] = f"the model's code uses this layer as more than a call ({error})"


def factorize_svd(model: nn.Module, config: SvdConfig, example_inputs: Any) -> FactorizeResult:
    """Factorize the Linear and Conv2d layers ``config`` names in ``model``, in place; returns what changed.

    Args:
        model: changed in place: each factorized layer becomes an ``nn.Sequential`` of two layers.
        config: ranks, layer patterns and conv mode (see `SvdConfig`).
        example_inputs: one input batch (a tensor or a tuple of tensors); its first sample is used to count MACs.

    Returns:
        A `FactorizeResult`; ``skipped`` lists every named layer left as it was, with the reason.

    Raises:
        InputError: the model does not run on the example inputs.

    Example:
        >>> result = factorize_svd(model, SvdConfig(target_macs=0.5, conv="spatial"), torch.randn(8, 3, 32, 32))
        >>> result.ranks, result.skipped
    """
    reference, error, _ = forward_shapes(model, example_inputs)
    if error is not None:
        raise InputError(f"the model does not run on the example inputs: {error}")
    single = first_samples(example_inputs, 1)
    macs_before, params_before = count_macs(model, single), count_params(model)
    modules, skipped = _select_modules(model, config)
    costs = _costs(model, modules, config.conv, single)
    layers = []
    for name, module in modules.items():
        if costs[name][0] == 0:
            skipped[name] = "not run on the example inputs"
        else:
            singular = torch.linalg.svdvals(weight_matrix(module, config.conv))
            layers.append(_Layer(name, module, singular.cpu(), *costs[name]))
    if config.target_macs:
        fixed = macs_before - sum(layer.full_macs for layer in layers)
        ranks = _ranks_for_macs(layers, config.target_macs * macs_before, fixed, config.round_to)
    else:
        ranks = _local_ranks(layers, config)
    chosen = {}
    for layer in layers:
        rank, full_rank = ranks[layer.name], len(layer.singular)
        if layer.macs_per_rank * rank >= layer.full_macs:
            skipped[layer.name] = f"factorization would not reduce MACs at rank {rank} (full rank {full_rank})"
        else:
            chosen[layer.name] = layer
    chosen = _replace_and_check(model, chosen, ranks, config.conv, example_inputs, reference, skipped)
    macs_after = count_macs(model, single)
    return FactorizeResult(
        macs_before=macs_before, macs_after=macs_after, params_before=params_before,
        params_after=count_params(model), ranks={n: ranks[n] for n in chosen},
        full_ranks={n: len(layer.singular) for n, layer in chosen.items()},
        retained_energy={n: layer.energy(ranks[n]) for n, layer in chosen.items()},
        skipped=skipped, target_reached=macs_after <= config.target_macs * macs_before if config.target_macs else True)


def _load_factorized(model: nn.Module, directory: str | Path, *, verify: bool = True) -> nn.Module:
    """Rebuild a factorized model, saved by ``TorchDeployable.save``, on a fresh instance of its original class
    (changed in place and returned): every layer saved as two factors is factorized again, then loaded.

    Args:
        verify: check the files against the folder's ``manifest.json`` (see `torchslim.integrity`).

    Raises:
        ArtifactError: a damaged, altered or inconsistent file, named (shapes are checked against the weights
            file's header before anything is allocated).

    Example:
        >>> TorchDeployable(factorized).save(Path("out"))
        >>> model = _load_factorized(DigitsCNN(), "out")
    """
    from torchslim._validate import read_shapes
    from torchslim.integrity import verify_manifest

    directory = Path(directory)
    verify_manifest(directory, ["model.shapes.json", "model.safetensors"], verify=verify)
    refactorize_to_shapes(model, read_shapes(directory, SHAPES_FORMAT), directory)
    load_safetensors(model, directory / "model.safetensors")
    return model


def refactorize_to_shapes(model: nn.Module, shapes: dict[str, list[int]], directory: Path) -> list[str]:
    """Replace every layer the recorded shapes hold as two factors (``name.0.weight``, ``name.1.weight``) by an
    empty factor pair of those ranks; returns the layers replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        first, second = shapes.get(f"{name}.0.weight"), shapes.get(f"{name}.1.weight")
        if type(module) not in (nn.Linear, nn.Conv2d) or first is None or second is None:
            continue
        if len(first) != module.weight.dim() or len(second) != module.weight.dim() or not first[0]:
            raise ArtifactError(f"{directory}/model.shapes.json: {name}'s factors {first} and {second} do not "
                                f"factorize a {type(module).__name__}")
        # Spatial pairs end in a 1 x kw kernel; a 1 x 1 second layer is a channel pair (or an equivalent kw = 1).
        conv = "channel" if isinstance(module, nn.Linear) or second[2:] == [1, 1] else "spatial"
        replace_module(model, name, _empty_pair(module, first[0], conv))
        replaced.append(name)
    return replaced


@register_method("factorize", "svd", SvdConfig)
def factorize_layers(context, config: SvdConfig) -> TorchDeployable:
    """The recipe step: factorize ``context.model`` in place; the report gets ranks, energy, MACs and params."""
    result = factorize_svd(context.model, config, context.example_inputs(1))
    for layer, reason in result.skipped.items():
        context.skip_layer(layer, reason)
    # An earlier pruning step's mask names a weight that no longer exists; the factors are dense anyway.
    dropped = [name for name in result.ranks if context.masks.pop(f"{name}.weight", None) is not None]
    details = {"conv": config.conv, "macs_before": result.macs_before, "macs_after": result.macs_after,
               "params_before": result.params_before, "params_after": result.params_after,
               "ranks": result.ranks, "full_ranks": result.full_ranks,
               "retained_energy": {n: round(e, 6) for n, e in result.retained_energy.items()}}
    if config.target_macs:
        details["target_reached"] = result.target_reached
    if dropped:
        details["masks_dropped"] = dropped
    return TorchDeployable(context.model, details=details)


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "SvdFactorization": "SvdConfig",
    "load_factorized": "_load_factorized",
})
