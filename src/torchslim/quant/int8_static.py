"""``quantize: {method: int8-static}``: post-training static int8 quantization with calibration, executed on
real integer kernels of an existing runtime.

Backends (one module each): ``onnxruntime`` (QDQ ONNX run by ONNX Runtime's integer kernels) and
``torchinductor`` (torchao PT2E, compiled by torch.compile to oneDNN int8 kernels). ``runtime: auto`` builds
every backend available here, times each on the same validation batches (batch 1 and the recipe's batch size)
and keeps the fastest — by the geometric mean of the two latencies unless ``prefer`` says batch or bs1; every
candidate's figures (and any failure) are kept in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from torchslim._config import check
from torchslim._deprecated import renamed
from torchslim._progress import bar
from torchslim.core.calibration import check_calibration
from torchslim.core.modules import call_model
from torchslim.data.config import CalibrationConfig
from torchslim.errors import InputError, describe
from torchslim.measure.metrics import cosine_similarity_stats, top1_agreement
from torchslim.quant import mixed, onnx_backend, pt2e_backend
from torchslim.quant.adaround import AdaRoundConfig
from torchslim.quant.choose import criterion, time_candidates
from torchslim.registry import register_method
from torchslim.runtime import Deployable

BACKENDS = {"onnxruntime": onnx_backend, "torchinductor": pt2e_backend}


@dataclass(frozen=True)
class Int8StaticConfig:
    """Config of ``quantize: {method: int8-static, ...}``.

    Args:
        runtime: "onnxruntime", "torchinductor", or "auto" (measure the available ones, keep the fastest).
        observer: activation range estimation (`torchslim.quant.observers`): "minmax", "moving_average",
            "percentile" (99.99th), "mse" or "entropy" (KL). torchinductor uses torchao's observers: min-max,
            moving-average min-max, or its histogram (an L2-optimal range) for the last three.
        per_channel: one weight scale per output channel (else per tensor; onnxruntime only).
        calibration: the calibration samples (`CalibrationConfig`: ``samples``, ``batch_size``, ``split``;
            default 256 samples of the ``calib`` split in batches of 32).
        skip: module-name patterns (fnmatch) kept in float, e.g. ["fc"].
        fallback_layers: keep in float the layers whose own quantization error, measured in the simulated int8
            model on calibration data, is largest (this many; onnxruntime). 0 = quantize every layer.
        bias_correction: subtract each layer's expected weight-rounding offset from its bias, measured with the
            calibration data's channel means (`torchslim.quant.bias_correction`; onnxruntime).
        equalize: before calibration, fold BatchNorms into their layers and apply cross-layer equalization with
            high-bias absorption (`torchslim.quant.equalize`): per-channel weight ranges of Conv/Linear pairs
            joined by ReLU or nothing become alike; the float function is unchanged. Pairs through ReLU6 are
            left alone (ReLU6 is not positively homogeneous). The step details list the pairs.
        smoothquant: before calibration, smooth the Linear layers fed only by a LayerNorm
            (`torchslim.quant.smooth`, alpha searched per LayerNorm on the calibration data); the float function
            is unchanged. LayerNorms whose output also feeds a residual (post-LN encoders) are left alone.
        adaround: learned weight rounding (`AdaRoundConfig`, `torchslim.quant.adaround`), after equalize and
            smoothquant, on each runtime's own weight grid (BatchNorms folded first); the runtime then stores
            exactly the learned integers. With ``bias_correction`` each rounded layer's bias also takes its
            output's mean error, measured on the calibration batch.
        prefer: what "fastest" means for ``runtime: auto``: "balanced" (geometric mean of the batch-1 and
            batched latencies), "batch" (batched latency) or "bs1" (batch-1 latency); also how
            ``fallback_slow_layers`` scores a layer.
        max_drop: keep in float the fewest layers, most sensitive first, for the validation metric to drop at
            most this much against the float model (a difference of scores, e.g. 0.01 = one point of top-1
            agreement; relative for perplexity); each candidate is rebuilt and scored on ONNX Runtime
            (`torchslim.quant.mixed`; onnxruntime). null: no limit. Not with ``fallback_layers`` or ``adaround``.
        fallback_slow_layers: keep in float the layers whose int8 kernel is measured slower than their float
            one on ONNX Runtime here, each timed alone at its input shape (batch 1 and the recipe's batch;
            cached per machine; onnxruntime).
    """

    runtime: Literal["auto", "onnxruntime", "torchinductor"] = "auto"
    observer: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = "minmax"
    per_channel: bool = True
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    skip: list[str] = field(default_factory=list)
    prefer: Literal["balanced", "batch", "bs1"] = "balanced"
    fallback_layers: int = 0
    bias_correction: bool = True
    equalize: bool = False
    smoothquant: bool = False
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    max_drop: float | None = None
    fallback_slow_layers: bool = False
    version: int = 1
    renamed_fields: ClassVar[dict[str, str]] = {
        "calibration_batches": "calibration.samples (samples, not batches: calibration_batches x "
                               "calibration_batch_size)",
        "calibration_batch_size": "calibration.batch_size"}

    def __post_init__(self) -> None:
        check(self.fallback_layers >= 0, "fallback_layers", f"must be >= 0, got {self.fallback_layers}")
        check(self.max_drop is None or 0.0 <= self.max_drop < 1.0, "max_drop",
              f"must be in [0, 1), got {self.max_drop}")
        check(self.max_drop is None or not self.fallback_layers, "max_drop",
              "chooses the float layers by sensitivity as fallback_layers does: give one of them")
        check(self.max_drop is None or not self.adaround.enabled, "max_drop",
              "cannot give float layers their float weights back after adaround rounded them: give one of them")


def _unavailable(name: str, config: Int8StaticConfig) -> str | None:
    if name == "torchinductor" and not config.per_channel:
        return "quantizes weights per channel only (per_channel: false)"
    if name == "torchinductor" and config.fallback_layers:
        return "does not measure per-layer sensitivity (fallback_layers is onnxruntime's)"
    if name == "torchinductor" and config.max_drop is not None:
        return "does not keep layers float by measured drop (max_drop is onnxruntime's)"
    if name == "torchinductor" and config.fallback_slow_layers:
        return "does not time layers one by one (fallback_slow_layers is onnxruntime's)"
    return BACKENDS[name].available()


def _candidates(context, config: Int8StaticConfig) -> list[str]:
    if config.runtime != "auto":
        reason = _unavailable(config.runtime, config)
        if reason:
            raise InputError(f"{context.where}.runtime: {config.runtime}: {reason}")
        return [config.runtime]
    names = [name for name in BACKENDS if _unavailable(name, config) is None]
    if not names:
        reasons = "; ".join(f"{n}: {_unavailable(n, config)}" for n in BACKENDS)
        raise InputError(f"{context.where}.runtime: no int8 runtime is available ({reasons})")
    return names


def _fidelity(deployable: Deployable, batch, reference, task: str) -> dict:
    outputs = deployable(batch).float()
    if task == "embedding":
        return {"val_cosine": round(cosine_similarity_stats(outputs, reference)[0], 4)}
    return {"val_agreement": round(top1_agreement(outputs, reference), 4)}


@register_method("quantize", "int8-static", Int8StaticConfig)
def quantize_int8_static(context, config: Int8StaticConfig) -> Deployable:
    """Quantize ``context.model`` to int8 with calibration; returns it on the chosen (or fastest) runtime."""
    check_calibration(context, config)
    names = _candidates(context, config)
    validation = mixed.reference_for(context, config)  # the float model as the step receives it
    prepared = _prepare(context, config)
    if len(names) == 1:
        deployable = _build(names[0], context, config, validation)
        deployable.details["runtime_choice"] = names[0] + (" (the only candidate)" if config.runtime == "auto" else "")
        deployable.details.update(prepared)
        if config.adaround.enabled:
            context.model = deployable.module  # the copy whose weights sit on this runtime's grid
        return deployable
    batch = context.data.fill_batch("val", context.bundle.preprocess, context.batch_size)
    with torch.inference_mode():
        reference = call_model(context.model, batch)
    built, figures = {}, {}
    for name in bar(names, desc="building each int8 runtime", unit="runtime", show=context.progress):
        try:
            built[name] = _build(name, context, config, validation)
            figures[name] = _fidelity(built[name], batch, reference, context.bundle.task)
        except Exception as error:  # a backend that fails on this model is reported, and the others compete
            built.pop(name, None)
            figures[name] = {"error": describe(error)}
    if not built:
        raise RuntimeError(f"{context.where}: every int8 runtime failed: {figures}")
    try:  # in alternating rounds, so that load from other work weighs on every runtime alike
        with torch.inference_mode():
            for name, latency in time_candidates(dict(built), batch, config.prefer).items():
                figures[name].update(latency)
    except Exception as error:
        raise RuntimeError(f"{context.where}: timing the int8 runtimes failed: {describe(error)}") from error
    best = min(built, key=lambda n: figures[n]["score"])
    chosen = built[best]
    chosen.details["runtime_choice"] = f"{best}: fastest by {criterion(config.prefer, context.batch_size)}"
    chosen.details["candidates"] = figures
    chosen.details.update(prepared)
    if config.adaround.enabled:
        context.model = chosen.module
    return chosen


def _build(name: str, context, config: Int8StaticConfig, validation=None) -> Deployable:
    """Build one backend. With ``adaround``, on a copy of the model whose weights learned their rounding on that
    backend's grid (the grids differ: ONNX Runtime's scale is max|w| / 127, torchao's max|w| / 127.5), so each
    runtime stores exactly its own learned integers. ``max_drop`` and ``fallback_slow_layers`` choose float
    layers on ONNX Runtime (`torchslim.quant.mixed`), scored against ``validation``."""
    options = {"choose": mixed.chooser(context, config, validation)} if name == "onnxruntime" and \
        mixed.wanted(config) else {}
    if not config.adaround.enabled:
        return BACKENDS[name].build(context, config, **options)
    import copy

    original = context.model
    context.model = copy.deepcopy(original)
    try:
        rounding = _adaround(context, config, BACKENDS[name])
        deployable = BACKENDS[name].build(context, config, **options)
    finally:
        context.model = original
    deployable.details["adaround"] = rounding
    return deployable


def _adaround(context, config: Int8StaticConfig, backend) -> dict:
    """Learn the rounding of ``context.model``'s weights in place on ``backend``'s weight grid, its inputs
    quantized as the backend quantizes them; what was done, for the details."""
    import dataclasses

    from torchslim.quant.adaround import adaround_
    from torchslim.core.calibration import calibration_batches

    options = config.adaround
    samples = min(options.samples, config.calibration.samples or options.samples)
    one_batch = dataclasses.replace(config.calibration, samples=samples, batch_size=samples)
    inputs = next(iter(calibration_batches(context, one_batch)))
    grid = backend.weight_grid(config)
    activations, observer = backend.activation_simulation(config)
    result = adaround_(context.model.eval(), inputs, grid, iterations=options.iterations,
                       time_budget=options.time_budget, regularization=options.regularization,
                       correct_bias=config.bias_correction, skip=config.skip, activations=activations,
                       observer=observer, seed=context.seed)
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    return {"grid": f"[{grid.qmin}, {grid.qmax}] " + ("per-channel" if grid.per_channel else "per-tensor")
                    + f", {grid.arithmetic} arithmetic", "samples": int(first.shape[0]),
            "activations": f"{observer} ranges on the {int(first.shape[0])} samples",
            "bias_updated": config.bias_correction, **result.summary()}


def _prepare(context, config: Int8StaticConfig) -> dict:
    """Equalize and smooth ``context.model`` in place as the config asks; what was done, for the details."""
    done = {}
    if config.equalize:
        done["equalization"] = _equalize(context)
    elif config.adaround.enabled:
        done["folded_batchnorms"] = _fold(context)
    if config.smoothquant:
        from torchslim.core.calibration import calibration_batches
        from torchslim.quant.smooth import smooth_

        result = smooth_(context.model.eval(), context.example_inputs(1), calibration_batches(context, config))
        done["smoothing"] = {"smoothed": result.smoothed, "refused": result.refused}
    return done


def _equalize(context) -> dict:
    """Fold BatchNorms and cross-layer equalize ``context.model`` in place (quantize is the last step, as in
    QAT); every backend then calibrates and quantizes the equalized model."""
    from torchslim.quant.equalize import fold_and_equalize_

    result, folded, not_folded = fold_and_equalize_(context.model.eval(), context.example_inputs(1))
    for name, why in not_folded.items():
        context.skip_layer(name, f"BatchNorm not folded before equalization: {why}")
    return {"folded_batchnorms": len(folded), **result.summary()}


def _fold(context) -> int:
    """Fold BatchNorms into their layers in place, as the runtimes would: learned rounding must see the weights
    the runtime quantizes."""
    from torchslim.quant.fold import fold_batchnorms

    folded, not_folded = fold_batchnorms(context.model.eval(), context.example_inputs(1))
    for name, why in not_folded.items():
        context.skip_layer(name, f"BatchNorm not folded before learned rounding: {why}")
    return len(folded)


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "Int8Static": "Int8StaticConfig",
})
