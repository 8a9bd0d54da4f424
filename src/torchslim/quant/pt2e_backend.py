"""The PyTorch int8 backend: torchao's PT2E flow with the x86 Inductor quantizer, compiled by torch.compile.

``torch.export`` captures the model, ``prepare_pt2e`` inserts observers (BatchNorm folded), calibration runs on
the data's ``calib`` split, ``convert_pt2e`` writes int8 weights with per-channel scales, and TorchInductor
(with freezing) lowers the quantize/dequantize patterns to oneDNN int8 kernels (VNNI/AMX). The first call
compiles (tens of seconds); later calls are fast.

Artifact (no pickle): one safetensors file holding the converted graph's tensors (int8 weights, scales, zero
points, biases) and the activation observers' ranges. Loading re-captures the float model's architecture,
restores the observer ranges, converts, and overwrites every tensor with the saved one, so the reloaded model
computes exactly what was measured.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._quiet import quiet_torch_compile_logs
from torchslim.core.calibration import calibration_batches
from torchslim.core.cpu import has_vnni, int8_features
from torchslim.core.modules import matches
from torchslim.runtime import Deployable, compile_module, compile_unavailable

ARTIFACT_FORMAT = "torchslim.pt2e-int8/1"
quiet_torch_compile_logs()  # before torchao's import (in this module only) logs its first line
OBSERVERS = {"minmax": "MinMaxObserver", "moving_average": "MovingAverageMinMaxObserver"}


def available() -> str | None:
    """None if this backend can run here, else what to install."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install 'torchslim[torchao]')"
    return compile_unavailable()


def _args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _capture(module: nn.Module, example: Any) -> nn.Module:
    args = _args(example)
    # Batch (and sequence, for token inputs) stay dynamic so one capture serves every batch the model sees.
    shapes = tuple({d: torch.export.Dim.AUTO for d in range(min(t.ndim, 2 if not t.is_floating_point() else 1))}
                   for t in args)
    return torch.export.export(copy.deepcopy(module).eval(), args, dynamic_shapes=shapes).module()


def _quantizer(module: nn.Module, config):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

    base = x86.get_default_x86_inductor_quantization_config(reduce_range=not has_vnni())
    observer = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver}.get(config.observer,
                                                                                            HistogramObserver)
    activation = dataclasses.replace(base.input_activation,
                                     observer_or_fake_quant_ctr=observer.with_args(eps=2 ** -12))
    if not config.per_channel:
        raise ValueError("per_channel: the torchinductor backend quantizes weights per channel only")
    quantizer = x86.X86InductorQuantizer().set_global(
        dataclasses.replace(base, input_activation=activation, output_activation=activation))
    skipped = [name for name, _ in module.named_modules()
               if name and matches(name, config.skip)]
    for name in skipped:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer, skipped


def weight_grid(config):
    """The grid torchao's x86 quantizer puts weights on (`torchslim.quant.adaround.WeightGrid`): its
    per-channel min-max observer gives the symmetric scale ``max(max|w| / 127.5, 2^-12)`` (codes [-128, 127]
    whatever ``reduce_range``, which narrows activations only; the floor is the ``eps`` its default config gives
    every observer, so a channel with max |w| below 0.031 gets fewer codes), and ``convert_pt2e`` stores
    ``round(w * (1 / scale))``. It matches exact ``nn.Conv2d``/``nn.Linear`` modules only, so only those are
    rounded for it."""
    from torchslim.quant.adaround import WeightGrid

    return WeightGrid(qmin=-128, qmax=127, per_channel=True, arithmetic="torchao", min_scale=2.0 ** -12,
                      exact_types=(nn.Conv2d, nn.Linear))


def activation_simulation(config):
    """How torchao's x86 quantizer quantizes a layer's input, in `torchslim.quant.qmath` terms: uint8 per tensor,
    asymmetric ([0, 127] without VNNI), with torchslim's nearest observer to the one `_quantizer` picks (min-max,
    or "mse" for torchao's L2-optimal histogram)."""
    from torchslim.quant.qmath import QScheme

    observer = config.observer if config.observer in OBSERVERS else "mse"
    return QScheme(signed=False, symmetric=False, reduce_range=not has_vnni()), observer


def graph_tensors(graph_module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the converted graph reads through get_attr (int8 weights, scales, zero points, biases)."""
    tensors = {}
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            value = graph_module
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                tensors[node.target] = value
    return tensors


def _set_graph_tensor(graph_module: nn.Module, target: str, value: torch.Tensor) -> None:
    *path, name = target.split(".")
    owner = graph_module
    for part in path:
        owner = getattr(owner, part)
    current = getattr(owner, name)
    if current.shape != value.shape or current.dtype != value.dtype:
        raise ValueError(f"artifact tensor {target}: {tuple(value.shape)} {value.dtype} does not fit the model's "
                         f"{tuple(current.shape)} {current.dtype}")
    if isinstance(current, nn.Parameter):
        current.data = value
    else:
        setattr(owner, name, value)


def _observer_ranges(prepared: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in prepared.state_dict().items() if k.startswith("activation_post_process_")}


def _convert(module: nn.Module, example: Any, config, calibrate=None, ranges: dict | None = None):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from torchslim._progress import bar

    quantizer, skipped = _quantizer(module, config)
    prepared = prepare_pt2e(_capture(module, example), quantizer)
    if ranges is not None:
        prepared.load_state_dict(ranges, strict=False)
    with torch.no_grad():
        for batch in bar(calibrate or (), desc="calibrating (torchao)"):
            prepared(*_args(batch))
    ranges = _observer_ranges(prepared)
    return convert_pt2e(prepared), ranges, skipped


class InductorInt8Deployable(Deployable):
    """A PT2E int8 graph compiled by TorchInductor (oneDNN int8 kernels on x86)."""

    runtime = "torchinductor"

    def __init__(self, converted: nn.Module, ranges: dict[str, torch.Tensor], module: nn.Module, example: Any,
                 config, details: dict | None = None):
        self.converted, self.ranges, self.module = converted, ranges, module
        self.example, self.config = example, config
        self.details = details or {}
        # Static shapes: a recompile per batch size (cached), since the int8 conv lowering fails on dynamic batch.
        self.compiled = compile_module(converted, dynamic=False)  # its own compile cache (see compile_module)

    def __call__(self, inputs: Any) -> torch.Tensor:
        # Freezing folds the int8 weight prepacking into constants; it must be on whenever a call (re)compiles.
        with torch.no_grad(), torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # compile-time chatter from Inductor's int8 lowerings
            return self.compiled(*_args(inputs))

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "model.int8.safetensors"
        tensors = {f"graph/{k}": v.contiguous() for k, v in graph_tensors(self.converted).items()}
        # Observers shared between tensors (e.g. around a concat) share storage: store each copy on its own.
        tensors.update({f"observer/{k}": v.detach().clone() for k, v in self.ranges.items()})
        # equalize/smoothquant rewrote the float model this graph was captured from: a reload needs that model.
        settings = {"observer": self.config.observer, "per_channel": self.config.per_channel,
                    "skip": list(self.config.skip), "equalize": getattr(self.config, "equalize", False),
                    "smoothquant": getattr(self.config, "smoothquant", False),
                    "adaround": bool(getattr(getattr(self.config, "adaround", None), "enabled", False)),
                    # what the graph was captured on, so that `load_saved` can capture it again without inputs
                    "example": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                                for t in _args(self.example)]}
        save_file(tensors, str(path), metadata={"format": ARTIFACT_FORMAT, "settings": json.dumps(settings),
                                                "torch": torch.__version__})
        return path

    def load_and_run(self, path: Path, inputs: Any) -> Any:
        loaded = load_artifact(self.module, self.example, path, self.config)
        return loaded(inputs)


def load_artifact(module: nn.Module, example: Any, path: Path, config, *, verify: bool = True
                  ) -> InductorInt8Deployable:
    """Rebuild the int8 model saved at ``path`` on ``module``'s architecture (its weights are not used).

    Raises:
        ArtifactError: a damaged or altered file (checked against the folder's ``manifest.json`` unless
            ``verify=False``), another format, or a tensor that does not fit the model.
    """
    from torchslim._validate import load_tensors, require, safetensors_header
    from torchslim.errors import ArtifactError
    from torchslim.integrity import verify_manifest

    path = Path(path)
    verify_manifest(path.parent, [path.name], verify=verify)
    names, metadata = safetensors_header(path)
    require(metadata.get("format") == ARTIFACT_FORMAT, path, f"not a {ARTIFACT_FORMAT} file")
    require(all(k.startswith(("graph/", "observer/")) for k in names), path, "holds tensors of another format")
    saved = load_tensors(path)
    ranges = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith("observer/")}
    converted, _, _ = _convert(module, example, config, ranges=ranges)
    for key, value in saved.items():
        if key.startswith("graph/"):
            try:
                _set_graph_tensor(converted, key.split("/", 1)[1], value)
            except (AttributeError, ValueError) as error:
                raise ArtifactError(f"{path}: {key}: {error}") from None
    return InductorInt8Deployable(converted, ranges, module, example, config)


def load_saved(module: nn.Module, path: Path, example: Any = None, *, verify: bool = True) -> InductorInt8Deployable:
    """`load_artifact` with the settings the file records (observer, skip) and, unless ``example`` is given, zero
    inputs of the recorded example shapes.

    Raises:
        ArtifactError: as `load_artifact`, or settings that are not what `InductorInt8Deployable.save` writes.
    """
    from types import SimpleNamespace

    from torchslim._validate import require, safetensors_header

    path = Path(path)
    _, metadata = safetensors_header(path)
    require(metadata.get("format") == ARTIFACT_FORMAT, path, f"not a {ARTIFACT_FORMAT} file")
    try:
        settings = json.loads(metadata.get("settings", ""))
        config = SimpleNamespace(observer=str(settings["observer"]), per_channel=bool(settings["per_channel"]),
                                 skip=[str(p) for p in settings["skip"]])
        recorded = [torch.zeros(e["shape"], dtype=getattr(torch, e["dtype"])) for e in settings.get("example", [])]
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        from torchslim.errors import ArtifactError

        raise ArtifactError(f"{path}: its settings metadata is not what torchslim writes") from None
    if example is None:
        require(bool(recorded), path, "records no example input shapes; pass example_inputs")
        example = tuple(recorded) if len(recorded) > 1 else recorded[0]
    return load_artifact(module, example, path, config, verify=verify)


def float_layers(converted: nn.Module) -> tuple[int, dict[str, str]]:
    """Conv/linear calls of a converted graph: how many there are, and ``{layer: op}`` of those whose weight is
    not dequantized from int8 — the quantizer left them float (torchao's x86 quantizer matches only exact
    ``nn.Conv2d``/``nn.Linear`` patterns, so a subclass such as a "same"-padding conv is passed over)."""
    ops = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}
    layers = [n for n in converted.graph.nodes if n.op == "call_function" and n.target in ops]
    left = {}
    for node in layers:
        weight = node.args[1]
        if not (isinstance(weight, torch.fx.Node) and "dequantize" in str(weight.target)):
            stack = node.meta.get("nn_module_stack") or {}
            left[list(stack.values())[-1][0] if stack else node.name] = str(node.target).split(".")[-2]
    return len(layers), left


def build(context, config) -> InductorInt8Deployable:
    """Quantize ``context.model`` with PT2E and calibration; compile lazily on first call."""
    example = context.example_inputs(2)
    calibration = list(calibration_batches(context, config))
    converted, ranges, skipped = _convert(context.model, example, config, calibrate=calibration)
    for name in skipped:
        context.skip_layer(name, "kept in float (matched quantize.skip)")
    total, left = float_layers(converted)
    for name, op in left.items():
        if name not in skipped:
            context.skip_layer(name, f"{op}: not matched by torchao's x86 Inductor quantizer, kept in float")
    details = {"format": "PT2E x86-inductor", "weights": "int8 per-channel", "activations": "uint8 per-tensor",
               "int8_layers": f"{total - len(left)} of {total} conv/linear",
               "observer": "torchao " + OBSERVERS.get(config.observer, "HistogramObserver"),
               "reduce_range": not has_vnni(), "cpu_int8_features": int8_features(),
               "calibration_samples": sum(len(_args(b)[0]) for b in calibration)}
    return InductorInt8Deployable(converted, ranges, context.model, example, config, details=details)
