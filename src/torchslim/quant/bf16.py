"""``quantize: {method: bf16}``: weights and activations in bfloat16, run by PyTorch on the CPU's bfloat16 units.

bfloat16 keeps float32's exponent range with an 8-bit mantissa (about 3 significant digits): no calibration, no
ranges to estimate, and no layer whose outliers clip. Where the CPU has AMX (``amx_bf16``) or AVX-512 BF16
(``avx512_bf16``), oneDNN runs bfloat16 matrix multiplies and convolutions many times faster than float32 —
measured on this project's Xeon (AMX, one thread): a 2048x384 by 384x1536 Linear 31 ms -> 2-6 ms, a 64-channel
3x3 convolution on 8x28x28 7.1 ms -> 0.4 ms in channels-last layout. Without those units bfloat16 is emulated and
slower than float32; the step says so in its details.

The model's floating parameters and buffers become bfloat16 (convolution weights channels-last); its floating
inputs are cast on the way in and its floating outputs back to float32 on the way out, so callers and metrics
see float32. Layers matching ``skip`` stay float32, with casts around them. The step is recorded in the
artifact, so `torchslim.load` rebuilds the same model.

Example:
    >>> result = torchslim.apply(model, torchslim.Bf16Config(skip=["classifier"]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim.core.cpu import cpu_flags
from torchslim.core.modules import matches
from torchslim.registry import register_method
from torchslim.runtime import TorchDeployable


@dataclass(frozen=True)
class Bf16Config:
    """Config of ``quantize: {method: bf16, ...}``.

    Args:
        skip: module-name patterns (fnmatch) kept in float32, e.g. ["classifier"] (inputs cast to float32 before
            them, outputs back to bfloat16 after).
        channels_last: store 4-D convolution weights and feed 4-D inputs channels-last, the layout oneDNN's
            bfloat16 convolutions are fastest in.
    """

    skip: list[str] = field(default_factory=list)
    channels_last: bool = True
    version: int = 1


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (AMX or AVX-512 BF16)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def _cast(value: Any, dtype: torch.dtype, channels_last: bool = False) -> Any:
    """Floating tensors in ``value`` (nested tuples, lists, dicts) cast to ``dtype``; other values unchanged."""
    if torch.is_tensor(value):
        if not value.is_floating_point():
            return value
        value = value.to(dtype)
        return value.contiguous(memory_format=torch.channels_last) if channels_last and value.ndim == 4 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype, channels_last) for v in value) if not hasattr(value, "_fields") \
            else type(value)(*(_cast(v, dtype, channels_last) for v in value))
    if isinstance(value, dict):
        cast = {k: _cast(v, dtype, channels_last) for k, v in value.items()}
        try:
            return type(value)(cast)  # transformers' ModelOutput and OrderedDict keep their type
        except TypeError:
            return cast
    return value


def _hooks(module: nn.Module, inside: torch.dtype, outside: torch.dtype, channels_last: bool) -> None:
    """Cast ``module``'s floating inputs to ``inside`` and its floating outputs to ``outside``."""
    def before(mod, args, kwargs):
        return _cast(args, inside, channels_last), _cast(kwargs, inside, channels_last)

    def after(mod, args, output):
        return _cast(output, outside)

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after)


def to_bf16_(model: nn.Module, config: Bf16Config | None = None) -> dict[str, Any]:
    """Turn ``model`` into a bfloat16 model in place (see the module docstring).

    Args:
        model: any module; float32 inputs and outputs stay float32 to the caller.
        config: which layers stay float32, and the convolution layout.

    Returns:
        ``{"bf16_tensors": n, "float32_layers": [...], "native_bf16": bool}``.
    """
    config = config or Bf16Config()
    kept = [name for name, _ in model.named_modules() if name and matches(name, config.skip)]
    inside_kept = {name for name, _ in model.named_modules()
                   if any(name == k or name.startswith(k + ".") for k in kept)}
    done: dict[int, torch.Tensor] = {}  # tied tensors (an LM head sharing the embedding) stay one tensor
    for name, module in model.named_modules(remove_duplicate=False):
        if name in inside_kept:
            continue
        for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.bfloat16:
                continue
            if id(tensor) not in done:
                with torch.no_grad():
                    value = tensor.detach().to(torch.bfloat16)
                    if config.channels_last and value.ndim == 4:
                        value = value.contiguous(memory_format=torch.channels_last)
                done[id(tensor)] = (nn.Parameter(value, requires_grad=tensor.requires_grad)
                                    if isinstance(tensor, nn.Parameter) else value)
            if key in module._parameters:
                module._parameters[key] = done[id(tensor)]
            else:
                module._buffers[key] = done[id(tensor)]
    converted = len(done)
    for name in kept:
        if not any(name.startswith(other + ".") for other in kept):
            _hooks(model.get_submodule(name), torch.float32, torch.bfloat16, False)
    _hooks(model, torch.bfloat16, torch.float32, config.channels_last)
    return {"bf16_tensors": converted, "float32_layers": sorted(kept), "native_bf16": native_bf16()}


@register_method("quantize", "bf16", Bf16Config)
def quantize_bf16(context, config: Bf16Config) -> TorchDeployable:
    """The recipe step: ``context.model`` in bfloat16, on eager PyTorch."""
    details = to_bf16_(context.model, config)
    for name in details["float32_layers"]:
        context.skip_layer(name, "kept in float32 (matched quantize.skip)")
    if not details["native_bf16"]:
        details["note"] = ("this CPU has neither AMX nor AVX-512 BF16: bfloat16 is emulated here and usually "
                           "slower than float32")
    return TorchDeployable(context.model, details=details)


__all__ = ["Bf16Config", "native_bf16", "quantize_bf16", "to_bf16_"]
