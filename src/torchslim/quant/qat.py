"""``quantize: {method: qat}``: quantization-aware fine-tuning, converted to the same int8 artifact as PTQ.

1. BatchNorms are folded into their convolutions (`torchslim.quant.fold`): the runtime's integer kernels see
   folded weights, so training must too.
2. Every Conv/Linear weight is fake-quantized (a parametrization: per-channel symmetric, on exactly the grid
   ONNX Runtime writes — ±127 codes, ±64 where the CPU lacks VNNI) and every Conv/Linear input is fake-quantized
   per tensor (uint8, asymmetric) with ranges calibrated by the recipe's observer on the ``calib`` split.
   Gradients pass straight through the rounding (and stop where a value was clipped).
3. The model is fine-tuned by the recipe's ``finetune`` settings (distillation from the model before the step,
   `torchslim.recover.finetune`).
4. The weights are left on their integer grid and the model goes through the ONNX Runtime int8 backend —
   calibration with the same observer, QDQ with our scales — so QAT and PTQ produce the same kind of artifact and
   the deployed model reproduces the trained weights' integer codes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim._config import check
from torchslim._deprecated import renamed
from torchslim._progress import bar
from torchslim.core.calibration import calibration_batches, check_calibration
from torchslim.core.modules import call_model, matches
from torchslim.data.config import CalibrationConfig
from torchslim.errors import InputError
from torchslim.quant import onnx_backend
from torchslim.quant.bias_correction import quantized_weight
from torchslim.quant.fold import fold_batchnorms
from torchslim.quant.observers import make_observer
from torchslim.quant.qmath import QScheme, fake_quantize
from torchslim.recover.finetune import FinetuneConfig, finetune
from torchslim.recover.trainer import OptimizerConfig
from torchslim.registry import register_method
from torchslim.runtime import OnnxRuntimeDeployable

QUANTIZED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _qat_finetune() -> FinetuneConfig:
    return FinetuneConfig(epochs=2, batch_size=32, optimizer=OptimizerConfig(name="adamw", lr=1e-5, weight_decay=0.0))


@dataclass(frozen=True)
class QatConfig:
    """Config of ``quantize: {method: qat, ...}``.

    Args:
        runtime: "onnxruntime" (the runtime the fine-tuned model is converted for).
        observer: activation ranges, as in int8-static (calibrated before training, recalibrated after).
        per_channel: one weight scale per output channel (else per tensor).
        calibration: the calibration samples, as in int8-static (`CalibrationConfig`).
        skip: module-name patterns (fnmatch) kept in float, neither simulated nor quantized.
        fallback_layers: as in int8-static, measured after training.
        bias_correction: as in int8-static (after QAT the weights sit on their grid, so it moves little).
        finetune: the fine-tuning run (epochs, batch size, optimiser, schedule, distillation); a small learning
            rate: the weights only need to move by a fraction of a quantization step.
    """

    runtime: Literal["onnxruntime"] = "onnxruntime"
    observer: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = "minmax"
    per_channel: bool = True
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    skip: list[str] = field(default_factory=list)
    fallback_layers: int = 0
    bias_correction: bool = True
    finetune: FinetuneConfig = field(default_factory=_qat_finetune)
    version: int = 1
    renamed_fields: ClassVar[dict[str, str]] = {
        "calibration_batches": "calibration.samples (samples, not batches: calibration_batches x "
                               "calibration_batch_size)",
        "calibration_batch_size": "calibration.batch_size"}

    def __post_init__(self) -> None:
        check(self.fallback_layers >= 0, "fallback_layers", f"must be >= 0, got {self.fallback_layers}")


class WeightFakeQuant(nn.Module):
    """Parametrization: the weight as its runtime will hold it (max-abs scale per output channel, rounded)."""

    def __init__(self, scheme: QScheme):
        super().__init__()
        self.scheme = scheme

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return quantized_weight(weight, self.scheme)


class InputFakeQuant:
    """Forward pre-hook: observes a layer's input (calibration), then fake-quantizes it with the frozen range."""

    def __init__(self, observer: str):
        self.observer = make_observer(observer, onnx_backend.ACTIVATIONS)
        self.scale = self.zero_point = None

    def freeze(self) -> None:
        if self.observer.lo is not None:
            self.scale, self.zero_point = self.observer.qparams()

    def __call__(self, module, args):
        x = args[0]
        if not torch.is_tensor(x) or not x.is_floating_point():
            return None
        if self.scale is None:
            self.observer.observe(x.detach())
            return None
        return (fake_quantize(x, self.scale, self.zero_point, self.observer.scheme), *args[1:])


def _quantized_layers(model: nn.Module, skip: list[str]) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QUANTIZED) and not matches(name, skip)}


@register_method("quantize", "qat", QatConfig)
def quantize_qat(context, config: QatConfig) -> OnnxRuntimeDeployable:
    """Fold, simulate int8, fine-tune, and convert ``context.model`` to an ONNX Runtime int8 model."""
    reason = onnx_backend.available()
    if reason:
        raise InputError(f"{context.where}.runtime: onnxruntime: {reason}")
    check_calibration(context, config)
    if len(context.data.splits.get("train", [])) == 0:
        raise InputError(f"{context.where}: the data has no training samples to fine-tune on")
    model = context.model.eval()
    folded, not_folded = fold_batchnorms(model, context.example_inputs(2))
    for name, why in not_folded.items():
        context.skip_layer(name, f"BatchNorm not folded: {why}")
    layers = _quantized_layers(model, config.skip)
    if not layers:
        raise InputError(f"{context.where}: the model has no Conv/Linear layer to quantize")
    hooks, handles = {}, []
    scheme = onnx_backend.weight_scheme(config.per_channel)
    try:
        for name, layer in layers.items():
            hooks[name] = InputFakeQuant(config.observer)
            handles.append(layer.register_forward_pre_hook(hooks[name]))
        batches = -(-config.calibration.samples // config.calibration.batch_size)  # the last one may be short
        with torch.inference_mode():
            for inputs in bar(calibration_batches(context, config), total=batches, desc="calibrating",
                              show=context.progress):
                call_model(model, inputs)
        for hook in hooks.values():
            hook.freeze()
        for layer in layers.values():
            parametrize.register_parametrization(layer, "weight", WeightFakeQuant(scheme))
        trained = finetune(context, config.finetune)
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers.values():
            if parametrize.is_parametrized(layer, "weight"):
                # Keep the rounded weights: the runtime's max-abs scales reproduce exactly these codes.
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    model.eval()
    deployable = onnx_backend.build(context, config)
    deployable.details.update(folded_batchnorms=len(folded), simulated_layers=len(layers),
                              train_loss=trained.details["train_loss"], runtime_choice="onnxruntime")
    return deployable


# Old names, kept for one release (see torchslim._deprecated).
__getattr__ = renamed(__name__, {
    "Qat": "QatConfig",
})
