"""``quantize: {method: int8-weight | int4-weight, ...}``: weight-only low-bit quantization of Linear layers.

For large language models the memory bottleneck is the weights: activations stay in float, every Linear (and
GPT-2's Conv1D) keeps only packed integer codes with group-wise scales and zero points, and runs on CPU kernels
that read the packed weights (aten's int4/int8 weight-packed matmuls; see `torchslim.quant.weight_only`).
How the codes are chosen is the ``algorithm``:

- ``rtn``: round to nearest with min-max group ranges (no data);
- ``hqq``: half-quadratic optimisation of each group's zero point and scale (no data);
- ``gptq``: column-by-column quantization with error compensation from calibration Hessians;
- ``awq``: per-input-channel scales searched on calibration activations to protect salient channels.

``gptq`` and ``awq`` calibrate block by block (`torchslim.core.calibration.run_sequential`): only one transformer
block's statistics are in memory at a time, and each block sees the already-quantized blocks before it. The
output head (and the input embedding tied to it) gets ``head_bits`` (int8 per row by default: it is the most
sensitive layer and one table then serves both). Weights pruned by an earlier step stay exactly zero. Layers a
group size does not fit, or that match ``skip``, stay in float and are reported.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from torchslim._config import check
from torchslim._deprecated import renamed
from torchslim.core.modules import matches, output_head, replace_module
from torchslim.data.config import CalibrationConfig
from torchslim.errors import InputError
from torchslim.registry import register_method
from torchslim.runtime import TorchDeployable, load_safetensors

FORMAT = "torchslim.weight-only/1"


@dataclass(frozen=True)
class WeightOnly:
    """Config shared by ``int4-weight`` and ``int8-weight``.

    Args:
        group_size: weights of a row sharing one scale/zero point (0: one per output row, i.e. per channel).
        algorithm: "rtn", "hqq" (no data), "gptq" or "awq" (calibrated on the recipe's ``calib`` split).
        calibration: the calibration samples of gptq/awq (`CalibrationConfig`; default 128 samples of the
            ``calib`` split in batches of 8).
        symmetric: symmetric codes (no zero point) instead of asymmetric ones.
        head_bits: bits of the output head and the embedding tied to it (8, 4, or 0 to keep them in float).
        act_order: gptq only: quantize columns in order of decreasing Hessian diagonal.
        damping: gptq only: fraction of the mean Hessian diagonal added to it.
        skip: module-name patterns (fnmatch) kept in float.
    """

    group_size: int = 128
    algorithm: Literal["rtn", "hqq", "gptq", "awq"] = "rtn"
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(samples=128, batch_size=8))
    symmetric: bool = False
    head_bits: int = 8
    act_order: bool = False
    damping: float = 0.01
    skip: list[str] = field(default_factory=list)
    version: int = 1
    renamed_fields: ClassVar[dict[str, str]] = {
        "damp": "damping", "batch_size": "calibration.batch_size",
        "calibration_batches": "calibration.samples (samples, not batches: calibration_batches x batch_size)"}

    bits = 4

    def __post_init__(self) -> None:
        check(self.group_size == 0 or (self.group_size >= 8 and self.group_size % 8 == 0), "group_size",
              f"must be 0 (per output channel) or a multiple of 8, got {self.group_size}")
        check(self.head_bits in (0, 4, 8), "head_bits", f"must be 8, 4 or 0 (float), got {self.head_bits}")
        check(0.0 < self.damping < 1.0, "damping", f"must be in (0, 1), got {self.damping}")


@dataclass(frozen=True)
class Int4WeightConfig(WeightOnly):
    """Config of ``quantize: {method: int4-weight, ...}`` (fields: see `WeightOnly`); group 128 by default."""

    bits = 4


@dataclass(frozen=True)
class Int8WeightConfig(WeightOnly):
    """Config of ``quantize: {method: int8-weight, ...}`` (fields: see `WeightOnly`); per channel by default."""

    group_size: int = 0
    bits = 8


def _matches(name: str, patterns: list[str]) -> bool:
    return matches(name, patterns)


class _Quantizer:
    """Quantizes named layers of one model with one config, recording what it did."""

    def __init__(self, context, config: WeightOnly):
        self.context, self.config, self.model = context, config, context.model
        self.done: dict[str, str] = {}
        self.seconds = 0.0

    def quantize_layer(self, name: str, module: nn.Module, stats=None, bits: int | None = None,
                       group_size: int | None = None, algorithm: str | None = None) -> None:
        from torchslim.quant import awq, gptq, groupwise
        from torchslim.quant.weight_only import WeightOnlyLinear, linear_bias, linear_weight

        config = self.config
        bits = config.bits if bits is None else bits
        group = config.group_size if group_size is None else group_size
        algorithm = algorithm or config.algorithm
        weight = linear_weight(module).detach().float()
        if group and weight.shape[1] % group:
            self.context.skip_layer(name, f"kept in float: group size {group} does not divide its "
                                          f"{weight.shape[1]} inputs")
            return
        started = time.perf_counter()
        mask = self.context.masks.get(f"{name}.weight")
        if mask is not None and not isinstance(module, nn.Linear):
            mask = mask.t()  # masks are in the parameter's layout: GPT-2's Conv1D stores (in, out)
        input_scale = None
        if algorithm == "gptq":
            qweight, _ = gptq.gptq_quantize(weight, stats.hessian, bits, group, symmetric=config.symmetric,
                                            damping=config.damping, act_order=config.act_order, mask=mask)
        elif algorithm == "awq":
            qweight, input_scale = awq.awq_quantize(weight, stats.samples, bits, group)
        elif algorithm == "hqq":
            qweight = groupwise.hqq_quantize(weight, bits, group)
        else:
            qweight = groupwise.quantize_rtn(weight, bits, group, symmetric=config.symmetric)
        if mask is not None and algorithm != "gptq":  # keep pruned weights exactly zero
            qweight.codes = torch.where(mask, qweight.codes, _zero_codes(qweight))
        replace_module(self.model, name, WeightOnlyLinear.from_quantized(qweight, linear_bias(module), input_scale))
        self.done[name] = f"int{bits} {algorithm} " + (f"g{group}" if group else "per-channel")
        self.seconds += time.perf_counter() - started


def _zero_codes(qweight) -> torch.Tensor:
    """The code of an exact 0 in every position (the group's zero point)."""
    group = qweight.group_length
    return qweight.zeros.round().repeat_interleave(group, dim=1).to(qweight.codes.dtype)


def _calibration_batches(context, config: WeightOnly) -> list:
    from torchslim.core.calibration import calibration_batches

    return list(calibration_batches(context, config.calibration))


def quantize_weights_(context, config: WeightOnly) -> dict:
    """Replace the model's linear layers in place by packed weight-only layers; returns the step's details."""
    from torchslim.core.calibration import run_sequential
    from torchslim.core.modules import is_linear_like
    from torchslim.quant.weight_only import WeightOnlyEmbedding

    model = context.model
    head, tied_embedding = output_head(model)
    linears = {n: m for n, m in model.named_modules() if is_linear_like(m) and n != head}
    if not linears:
        raise InputError(f"{context.where}: {context.bundle.spec} has no Linear layers to quantize")
    for name in [n for n in linears if _matches(n, config.skip)]:
        context.skip_layer(name, "kept in float (matched quantize.skip)")
        linears.pop(name)
    quantizer = _Quantizer(context, config)
    tokens = 0
    if config.algorithm in ("gptq", "awq"):
        want = ("hessian",) if config.algorithm == "gptq" else ("samples",)
        from torchslim.core.calibration import require_calibration_tokens

        batches = _calibration_batches(context, config)
        tokens = require_calibration_tokens(batches, context.where, config.algorithm)

        def process(block_name, block, stats) -> None:
            for name, layer_stats in stats.items():
                if name in linears:
                    quantizer.quantize_layer(name, model.get_submodule(name), layer_stats)

        run_sequential(model, batches, process, want=want, skip=list(config.skip) + ([head] if head else []))
    else:
        for name, module in linears.items():
            quantizer.quantize_layer(name, module)
    if head is not None and config.head_bits and not _matches(head, config.skip):
        quantizer.quantize_layer(head, model.get_submodule(head), bits=config.head_bits,
                                 group_size=0 if config.head_bits == 8 else config.group_size, algorithm="rtn")
        if tied_embedding is not None and head in quantizer.done:
            replace_module(model, tied_embedding, WeightOnlyEmbedding.shared(model.get_submodule(head)))
            quantizer.done[tied_embedding] = f"shares {head}'s packed table"
    elif head is not None:
        context.skip_layer(head, "output head kept in float (head_bits: 0 or skip)")
    return {"bits": config.bits, "group_size": config.group_size, "algorithm": config.algorithm,
            "quantized_layers": len(quantizer.done), "head": quantizer.done.get(head, "float"),
            "calibration_tokens": tokens, "quantize_seconds": round(quantizer.seconds, 2)}


class WeightOnlyDeployable(TorchDeployable):
    """An eager model with packed weight-only layers. Its artifact is ``model.safetensors`` (packed codes,
    scales, zero points, float layers) plus ``model.weight_only.json`` (which layers are packed, and how), from
    which `torchslim.load` rebuilds it on a float copy of the model: no pickle anywhere."""

    def save(self, directory: Path) -> Path:
        from torchslim.quant.weight_only import weight_only_layers

        path = super().save(directory)
        (directory / "model.weight_only.json").write_text(json.dumps(
            {"format": FORMAT, "layers": weight_only_layers(self.module)}, indent=1))
        return path


def _load_weight_only(model: nn.Module, directory: str | Path, *, verify: bool = True) -> nn.Module:
    """Turn a float model (the same architecture, e.g. freshly built from its spec) into the saved weight-only
    model in ``directory`` (written by `WeightOnlyDeployable.save`), in place; returns it.

    Args:
        verify: check the files against the folder's ``manifest.json`` (see `torchslim.integrity`).

    Raises:
        ArtifactError: a damaged, altered or inconsistent file, named (every packed table's shape is checked
            against the weights file's header before anything is allocated).
    """
    from torchslim._validate import check_weight_only_layers, read_json
    from torchslim.integrity import verify_manifest
    from torchslim.quant.weight_only import restore_weight_only_

    directory = Path(directory)
    path, weights = directory / "model.weight_only.json", directory / "model.safetensors"
    verify_manifest(directory, [path.name, weights.name], verify=verify)
    layers = check_weight_only_layers(read_json(path), path, weights, FORMAT)
    try:
        restore_weight_only_(model, layers)
    except ValueError as error:  # a recorded module the model does not have
        raise InputError(f"{path}: {error}") from None
    load_safetensors(model, directory / "model.safetensors")
    return model.eval()


def _handler(context, config: WeightOnly) -> WeightOnlyDeployable:
    details = quantize_weights_(context, config)
    return WeightOnlyDeployable(context.model, details=details)


register_method("quantize", "int4-weight", Int4WeightConfig)(_handler)
register_method("quantize", "int8-weight", Int8WeightConfig)(_handler)


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "Int4Weight": "Int4WeightConfig",
    "Int8Weight": "Int8WeightConfig",
    "load_weight_only": "_load_weight_only",
})
