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

Runtime: eager PyTorch runs each operator on its own, so at batch 1 a transformer spends more time between the
bfloat16 matrix multiplies (casts, layer norms, softmax, the Python of each module) than in them.
``runtime: torchinductor`` compiles the model with ``torch.compile`` and freezing (the weights become constants,
oneDNN's bfloat16 kernels get them prepacked, the element-wise operators fuse); measured on all-MiniLM-L6-v2 at
sequence 64 (Xeon with AMX, 2 threads): eager bfloat16 1.4x faster than float32 at batch 1, compiled 2.7x.
``runtime: auto`` (the default) builds both and keeps the faster by measurement (`time_candidates`: alternating
rounds at batch 1 and the recipe's batch), and keeps eager where no C++ compiler is installed or the compiled
model is clearly less faithful to float32 than eager (`COMPILED_MARGIN`). The artifact is the same for both (the
weights); a compiled choice is repeated where the model runs (``torch.compile(torchslim.load(...))``).

Example:
    >>> result = torchslim.apply(model, torchslim.Bf16Config(skip=["classifier"]))
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from torchslim._config import check
from torchslim.core.cpu import cpu_flags
from torchslim.core.modules import call_model, matches, output_tensors
from torchslim.errors import InputError, describe
from torchslim.registry import register_method
from torchslim.runtime import TorchDeployable, compile_module, compile_unavailable

RUNTIMES = ("auto", "torch", "torchinductor")
# The compiled model may be at most this much less faithful to float32 than eager bfloat16 (relative errors against
# the float32 outputs; compiled kernels round in other places, so neither is exact and they differ from each other).
COMPILED_MARGIN = (1.5, 0.005)  # compiled error <= 1.5 x eager's + 0.005


@dataclass(frozen=True)
class Bf16Config:
    """Config of ``quantize: {method: bf16, ...}``.

    Args:
        skip: module-name patterns (fnmatch) kept in float32, e.g. ["classifier"] (inputs cast to float32 before
            them, outputs back to bfloat16 after).
        channels_last: store 4-D convolution weights and feed 4-D inputs channels-last, the layout oneDNN's
            bfloat16 convolutions are fastest in.
        runtime: "torch" (eager), "torchinductor" (``torch.compile`` with freezing) or "auto" (build both, keep
            the faster by measurement).
        prefer: what "faster" means for ``runtime: auto``: "balanced" (geometric mean of the batch-1 and batched
            latencies), "batch" or "bs1".
    """

    skip: list[str] = field(default_factory=list)
    channels_last: bool = True
    runtime: Literal["auto", "torch", "torchinductor"] = "auto"
    prefer: Literal["balanced", "batch", "bs1"] = "balanced"
    version: int = 1

    def __post_init__(self) -> None:
        check(self.runtime in RUNTIMES, "runtime", f"must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        check(self.prefer in ("balanced", "batch", "bs1"), "prefer",
              f"must be balanced, batch or bs1, got {self.prefer!r}")


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (AMX or AVX-512 BF16)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def _map_tensors(value: Any, fn) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (nested tuples, named tuples, lists, dicts, keeping
    their types where they can be rebuilt); other values unchanged."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value) if not hasattr(value, "_fields") \
            else type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, dict):
        mapped = {k: _map_tensors(v, fn) for k, v in value.items()}
        try:
            return type(value)(mapped)  # transformers' ModelOutput and OrderedDict keep their type
        except TypeError:
            return mapped
    return value


def _cast(value: Any, dtype: torch.dtype, channels_last: bool = False) -> Any:
    """Floating tensors in ``value`` (nested tuples, lists, dicts) cast to ``dtype``; other values unchanged."""
    def cast(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor
        tensor = tensor.to(dtype)
        return tensor.contiguous(memory_format=torch.channels_last) if channels_last and tensor.ndim == 4 \
            else tensor

    return _map_tensors(value, cast)


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


class CompiledTorchDeployable(TorchDeployable):
    """A module run through ``torch.compile`` (TorchInductor) with freezing: one compile per new input shape
    (after the second shape, one graph with dynamic sizes), cached. Saved and reloaded as the eager module is
    (its weights); the compile is repeated where it runs."""

    runtime = "torchinductor"

    def __init__(self, module: nn.Module, details: dict | None = None):
        super().__init__(module, details)
        self.compiled = compile_module(self.module)

    def __call__(self, inputs: Any) -> torch.Tensor:
        # Freezing folds the weights into the graph as constants (prepacked for oneDNN); it must be on whenever a
        # call (re)compiles, and needs gradients off. Calls always run outside inference mode, on ordinary
        # tensors: a tensor made under inference mode differs from one made under no_grad in what the compiled
        # graph is guarded on, and alternating the two recompiles until torch.compile's limit.
        with torch.inference_mode(False), torch.no_grad(), torch._inductor.config.patch(freezing=True), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # compile-time chatter
            return call_model(self.compiled, _ordinary(inputs))

    def load_and_run(self, path, inputs: Any) -> Any:
        """Load a fresh copy from the artifact and run it as it is deployed: compiled again (the same kernels
        round as this model's do, so the outputs match; eager bfloat16 rounds elsewhere)."""
        return CompiledTorchDeployable(self.reloaded(path), details={})(inputs)


def _ordinary(value: Any) -> Any:
    """``value`` with every inference-mode tensor cloned into an ordinary one (other values unchanged)."""
    return _map_tensors(value, lambda tensor: tensor.clone() if tensor.is_inference() else tensor)


def _relative_error(reference: Any, output: Any) -> float:
    pairs = list(zip(output_tensors(reference), output_tensors(output)))
    if not pairs:
        return 0.0
    return max(float((o.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)) for r, o in pairs)


def _timing_batch(context) -> Any:
    """A batch of the recipe's size: real samples (validation, else calibration, else test) where the data has
    any, else the model's example inputs."""
    splits = getattr(context.data, "splits", None) or {}
    for split in ("val", "calib", "test", "train"):
        if len(splits.get(split) or ()):
            return context.data.fill_batch(split, context.bundle.preprocess, context.batch_size)
    return context.example_inputs(context.batch_size)


def _choose_runtime(context, config: Bf16Config, eager: TorchDeployable, batch: Any, reference: Any
                    ) -> TorchDeployable:
    """``runtime: torchinductor`` or ``auto``: the compiled model, or for auto whichever of eager and compiled
    is faster on ``batch`` (whose float32 outputs are ``reference``); the figures and the reason go into the
    details."""
    details = eager.details
    compiled = CompiledTorchDeployable(context.model, details=details)
    try:
        eager_error = _relative_error(reference, eager(batch))
        error = _relative_error(reference, compiled(batch))
    except Exception as failure:  # a model Inductor cannot compile stays eager (auto) or stops the step
        if config.runtime == "torchinductor":
            raise RuntimeError(f"{context.where}: torch.compile failed on this model: {describe(failure)}") \
                from failure
        details["runtime_choice"] = f"torch (torchinductor failed on this model: {describe(failure)})"
        return eager
    details["relative_error"] = {"torch": round(eager_error, 6), "torchinductor": round(error, 6)}
    if config.runtime == "torchinductor":
        details["runtime_choice"] = "torchinductor"
        return compiled
    factor, slack = COMPILED_MARGIN
    if error > factor * eager_error + slack:
        details["runtime_choice"] = (f"torch (compiled: relative error {error:.3g} to float32, more than {factor} x "
                                     f"eager's {eager_error:.3g} + {slack})")
        return eager
    from torchslim.quant.choose import criterion, time_candidates

    with torch.inference_mode():
        figures = time_candidates({"torch": eager, "torchinductor": compiled}, batch, config.prefer)
    best = min(figures, key=lambda n: figures[n]["score"])
    details["runtime_choice"] = f"{best}: fastest by {criterion(config.prefer, context.batch_size)}"
    details["candidates"] = figures
    return compiled if best == "torchinductor" else eager


@register_method("quantize", "bf16", Bf16Config)
def quantize_bf16(context, config: Bf16Config) -> TorchDeployable:
    """The recipe step: ``context.model`` in bfloat16, on eager PyTorch or compiled by TorchInductor."""
    unavailable = None if config.runtime == "torch" else compile_unavailable()
    if unavailable is not None and config.runtime == "torchinductor":
        raise InputError(f"{context.where}.runtime: torchinductor: {unavailable}")
    batch = reference = None
    if config.runtime != "torch" and unavailable is None:  # the float32 outputs both runtimes are checked against
        batch = _timing_batch(context)
        with torch.inference_mode():
            reference = call_model(context.model, batch)
    details = to_bf16_(context.model, config)
    for name in details["float32_layers"]:
        context.skip_layer(name, "kept in float32 (matched quantize.skip)")
    if not details["native_bf16"]:
        details["note"] = ("this CPU has neither AMX nor AVX-512 BF16: bfloat16 is emulated here and usually "
                           "slower than float32")
    eager = TorchDeployable(context.model, details=details)
    if config.runtime == "torch":
        details["runtime_choice"] = "torch"
        return eager
    if unavailable is not None:
        details["runtime_choice"] = f"torch (torchinductor left out: {unavailable})"
        return eager
    return _choose_runtime(context, config, eager, batch, reference)


__all__ = ["Bf16Config", "CompiledTorchDeployable", "native_bf16", "quantize_bf16", "to_bf16_"]
