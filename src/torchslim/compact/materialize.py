"""Weights generated at run time (``materialize: {method: on-demand, ...}``): only a compact form stays resident.

Each selected layer keeps its weight as packed low-bit codes with per-row (int8) or per-group (int4) scales; the
float weight is generated from them just before the layer's forward and freed when the forward returns, so at
any moment at most one layer's float weight exists (the seed's ``M = G(x)``). Embedding tables never generate
the whole table: only the rows a batch looks up are decoded. Layers already generated on demand (a codebook
parametrization from ``share_weights``, low-rank factors from ``factorize``, which are simply smaller layers) are
counted as they are; layers with no on-demand form here (EmbeddingBag, convolutions with non-zero padding
modes, ...) stay as they were and are reported.

Example:
    >>> materialize_(model, MaterializeConfig(bits=8))   # in place; returns {layer: reason} for layers left alone
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from torchslim._config import check
from torchslim._deprecated import renamed
from torchslim.core.modules import matches, replace_module
from torchslim.measure.size import resident_parameter_bytes
from torchslim.registry import register_method
from torchslim.runtime import TorchDeployable


@dataclass(frozen=True)
class MaterializeConfig:
    """Config of ``materialize: {method: on-demand, ...}``.

    Args:
        bits: 8 (symmetric int8 codes, one scale per output row) or 4 (two codes a byte, one scale per
            ``group_size`` weights of a row).
        group_size: int4 group length along the input dimension.
        layers: module-name patterns (fnmatch) to convert; ``["*"]``: every Linear, Conv1d/2d and Embedding.
        skip: module-name patterns left as they are.
    """

    bits: int = 8
    group_size: int = 64
    layers: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=list)
    version: int = 1

    def __post_init__(self) -> None:
        check(self.bits in (4, 8), "bits", f"must be 8 or 4, got {self.bits}")
        check(self.group_size >= 2 and self.group_size % 2 == 0, "group_size",
              f"must be an even number >= 2, got {self.group_size}")


class PackedWeight(nn.Module):
    """A weight tensor's compact form: int8 codes (or int4 codes packed two a byte) and float16 scales per row
    (int8) or per row group (int4). ``forward()`` generates the float32 weight; ``rows(index)`` only some rows."""

    def __init__(self, weight: torch.Tensor, bits: int = 8, group_size: int = 64):
        super().__init__()
        self.shape = tuple(weight.shape)
        self.bits = bits
        matrix = weight.detach().float().reshape(weight.shape[0], -1)
        cols = matrix.shape[1]
        self.group = cols if bits == 8 else min(group_size, cols + cols % 2)
        padded = -cols % self.group
        groups = F.pad(matrix, (0, padded)).reshape(matrix.shape[0], -1, self.group)
        qmax = 127 if bits == 8 else 7
        scale = (groups.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-7).to(torch.float16)  # fp16 subnormals
        codes = torch.round(groups / scale.float()).clamp(-qmax - (bits == 4), qmax).to(torch.int8)
        codes = codes.reshape(matrix.shape[0], -1)
        if bits == 4:  # two's-complement nibbles, low nibble first
            nibbles = (codes & 0x0F).to(torch.uint8)
            codes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.squeeze(-1).contiguous())
        self.cols = cols

    def _decode(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            low = (codes & 0x0F).to(torch.int8)
            high = (codes >> 4).to(torch.int8)
            values = torch.stack([low, high], -1).reshape(codes.shape[0], -1)
            values = torch.where(values > 7, values - 16, values)
        else:
            values = codes
        values = values.reshape(codes.shape[0], -1, self.group).float() * scale.float().unsqueeze(-1)
        return values.reshape(codes.shape[0], -1)[:, :self.cols]

    def forward(self) -> torch.Tensor:
        return self._decode(self.codes, self.scale).reshape(self.shape)

    def logical_numel(self) -> int:
        """The number of weights this form stands for (see `torchslim.measure.params`)."""
        return int(torch.Size(self.shape).numel())

    def logical_nonzero(self) -> int:
        with torch.no_grad():
            return int(self().count_nonzero())

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Decoded rows ``index`` (any shape) -> ``(*index.shape, row width)``; no other row is generated."""
        flat = index.reshape(-1)
        return self._decode(self.codes[flat], self.scale[flat]).reshape(*index.shape, self.cols)


class OnDemandLinear(nn.Module):
    """``nn.Linear`` whose weight is generated from a `PackedWeight` at each call and freed after it."""

    def __init__(self, layer: nn.Linear, packed: PackedWeight):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.packed = packed
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads .weight (shapes, dtypes)
        return self.packed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.packed().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class OnDemandConv(nn.Module):
    """``nn.Conv1d``/``nn.Conv2d`` (zero padding) whose weight is generated at each call and freed after it."""

    def __init__(self, layer: nn.Conv1d | nn.Conv2d, packed: PackedWeight):
        super().__init__()
        self.conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        self.in_channels, self.out_channels, self.kernel_size = layer.in_channels, layer.out_channels, layer.kernel_size
        self.packed = packed
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.packed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self.conv(x, self.packed().to(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups)


class OnDemandEmbedding(nn.Module):
    """``nn.Embedding`` that decodes only the rows a batch looks up."""

    def __init__(self, layer: nn.Embedding, packed: PackedWeight):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = (layer.num_embeddings, layer.embedding_dim,
                                                                     layer.padding_idx)
        self.packed = packed

    @property
    def weight(self) -> torch.Tensor:
        return self.packed()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.packed.rows(ids)


def _why_not(module: nn.Module) -> str | None:
    if parametrize.is_parametrized(module, "weight"):
        return "already generated on demand (weight parametrization, e.g. a share_weights codebook)"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r} has no on-demand form here"
    if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
        return None
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "Embedding with max_norm or sparse gradients has no on-demand form here"
    return None


def _convert(module: nn.Module, config: MaterializeConfig, packs: dict[int, PackedWeight]) -> nn.Module:
    weight = module.weight
    if id(weight) not in packs:  # tied weights share one compact form
        packs[id(weight)] = PackedWeight(weight, config.bits, config.group_size)
    packed = packs[id(weight)]
    if isinstance(module, nn.Linear):
        return OnDemandLinear(module, packed)
    if isinstance(module, nn.Embedding):
        return OnDemandEmbedding(module, packed)
    return OnDemandConv(module, packed)


def materialize_(model: nn.Module, config: MaterializeConfig) -> dict[str, str]:
    """Replace the selected layers of ``model`` in place; returns ``{layer: reason}`` for those left alone."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
    skipped, packs = {}, {}
    targets = []
    for name, module in model.named_modules():
        if not name or not matches(name, config.layers):
            continue
        if matches(name, config.skip):
            continue
        if isinstance(module, nn.EmbeddingBag):
            skipped[name] = "EmbeddingBag: use compress_embeddings (row-wise packed kernels) instead"
        elif isinstance(module, kinds):
            reason = _why_not(module)
            if reason:
                skipped[name] = reason
            else:
                targets.append(name)
    modules = dict(model.named_modules())
    for name in targets:
        replace_module(model, name, _convert(modules[name], config, packs))
    return skipped


@register_method("materialize", "on-demand", MaterializeConfig)
def materialize_on_demand(context, config: MaterializeConfig) -> TorchDeployable:
    """The recipe step: convert ``context.model`` in place; details hold resident bytes before and after."""
    before = resident_parameter_bytes(context.model)
    skipped = materialize_(context.model, config)
    for name, reason in skipped.items():
        context.skip_layer(name, reason)
    after = resident_parameter_bytes(context.model)
    converted = sum(isinstance(m, (OnDemandLinear, OnDemandConv, OnDemandEmbedding)) for m in context.model.modules())
    return TorchDeployable(context.model.requires_grad_(False), details={
        "bits": config.bits, "layers_on_demand": converted, "resident_param_bytes_before": before,
        "resident_param_bytes_after": after, "resident_ratio": round(after / max(before, 1), 4)})


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "Materialize": "MaterializeConfig",
})
