"""Deployables: a compressed model as it runs on its deployment runtime (eager PyTorch or ONNX Runtime).

Every stage of a pipeline is a Deployable, so one measurement code path times, sizes and evaluates them all.
"""

from __future__ import annotations

import copy
import json
import shutil
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.core.modules import call_model
from torchslim.errors import ArtifactError, describe, shorten


class Deployable(ABC):
    """A runnable model on one runtime.

    Attributes:
        runtime: the runtime's name as reported ("torch", "onnxruntime", ...).
        module: the float PyTorch module this deployable computes (or approximates); used for parameter and
            MAC counts, which quantization does not change.
        details: facts about how it was built, copied into the report.
    """

    runtime: str
    module: nn.Module
    details: dict

    @abstractmethod
    def __call__(self, inputs: Any) -> torch.Tensor:
        """Outputs for one input batch (as a float torch tensor)."""

    @abstractmethod
    def save(self, directory: Path) -> Path:
        """Write the deployable artifact (no pickle) into ``directory``; returns the file written."""

    @abstractmethod
    def load_and_run(self, path: Path, inputs: Any) -> Any:
        """Load a fresh copy from the artifact at ``path`` and run one batch (used to measure peak memory)."""


SHAPES_FORMAT = "torchslim.model-shapes/1"
# The root module's record of attributes structural pruning set (``{"module.attribute": count}``, e.g. the
# ``hidden`` that sizes a state the model's code creates): saved as the shapes file's "attributes".
SIZE_ATTRIBUTES = "_torchslim_size_attributes"


class TorchDeployable(Deployable):
    """An eager PyTorch module; its artifact is the state dict in safetensors plus ``model.shapes.json`` (every
    tensor's shape), from which `torchslim.load` rebuilds a structurally pruned or factorized model on
    its original class."""

    runtime = "torch"

    def __init__(self, module: nn.Module, details: dict | None = None):
        self.module = module.eval()
        self.details = details or {}
        # Structural steps `torchslim.load` repeats before loading the weights (set by `torchslim._context`).
        self.replayed: list[dict] = []

    def __call__(self, inputs: Any) -> torch.Tensor:
        with torch.inference_mode():
            return call_model(self.module, inputs)

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_model

        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "model.safetensors"
        save_model(self.module, str(path))
        shapes = {name: list(t.shape) for name, t in self.module.state_dict().items()}
        document = {"format": SHAPES_FORMAT, "shapes": shapes}
        if getattr(self.module, SIZE_ATTRIBUTES, None):
            document["attributes"] = dict(getattr(self.module, SIZE_ATTRIBUTES))
        if self.replayed:
            document["replayed"] = self.replayed
        (directory / "model.shapes.json").write_text(json.dumps(document))
        return path

    def load_and_run(self, path: Path, inputs: Any) -> Any:
        with torch.inference_mode():
            return call_model(self.reloaded(path), inputs)

    def reloaded(self, path: Path) -> nn.Module:
        """A copy of the module with the weights of the artifact at ``path``."""
        fresh = copy.deepcopy(self.module)
        load_safetensors(fresh, path)
        return fresh


def load_safetensors(module: nn.Module, path: Path) -> None:
    """Load a safetensors state dict into ``module``, as strictly as ``load_state_dict`` but for tied weights
    (saved once, by safetensors' ``save_model``), keeping the module's own state-dict metadata: some modules
    (e.g. torchvision's MNASNet) check the version recorded there."""
    from torchslim._validate import load_tensors

    state = OrderedDict(load_tensors(Path(path)))
    metadata = getattr(module.state_dict(), "_metadata", None)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a size mismatch
        raise ArtifactError(f"{path}: state dict does not fit the model: {describe(error, 200)}") from None
    owners: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        owners.setdefault(id(tensor), []).append(name)
    loaded = set(state)
    missing = [k for k in result.missing_keys
               if not any(alias in loaded for names in owners.values() if k in names for alias in names)]
    if missing or result.unexpected_keys:
        raise ArtifactError(f"{path}: state dict does not fit the model (missing {missing[:5]}, "
                            f"unexpected {[shorten(k) for k in result.unexpected_keys[:5]]})")


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot build CPU kernels here, or None."""
    if not (shutil.which("c++") or shutil.which("g++")):
        return "torch.compile needs a C++ compiler (g++) on the CPU"
    return None


def compile_module(module: nn.Module, **options: Any):
    """``torch.compile`` of a function that calls ``module``, with a code object of its own.

    torch.compile keeps its compiled graphs, and counts recompilations against its limit (8), per code object
    of the compiled frame; every module compiled directly shares one wrapper frame, so in a process that builds
    many compiled models (a search's trials, candidates compared by a step) the ninth graph is silently not
    compiled and that model runs eagerly. Here each call gets its own code object: its graphs are its own, and
    are freed with it."""
    import types

    def forward(*args, **kwargs):
        return module(*args, **kwargs)

    fresh = types.FunctionType(forward.__code__.replace(), forward.__globals__, "forward", None,
                               forward.__closure__)
    return torch.compile(fresh, **options)


def _as_numpy_feed(session, inputs: Any) -> dict[str, np.ndarray]:
    tensors = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    names = [i.name for i in session.get_inputs()]
    return {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)}


def onnx_session(path: Path, threads: int = 0, *, verify: bool = True):
    """An ONNX Runtime CPU session on the ONNX file at ``path``, checked first (`torchslim._validate.check_onnx`:
    its folder's manifest, else onnx's checker).

    Raises:
        ArtifactError: the file is damaged, altered or not a model ONNX Runtime can load; the message names it.
    """
    import onnxruntime as ort

    from torchslim._validate import check_onnx

    check_onnx(Path(path), verify=verify)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own error types (InvalidProtobuf, Fail, ...)
        raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({describe(error, 160)})") from None


class OnnxRuntimeDeployable(Deployable):
    """An ONNX model run by ONNX Runtime's CPU execution provider with a fixed thread count."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, module: nn.Module, threads: int, details: dict | None = None):
        self.path = Path(path)
        self.module = module
        self.threads = threads
        self.details = details or {}
        self.session = self._session(self.path)
        self.metadata: dict[str, str] = {}  # metadata_props written into the saved file (see `save`)

    def _session(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, inputs: Any) -> torch.Tensor:
        outputs = self.session.run(None, _as_numpy_feed(self.session, inputs))
        return torch.from_numpy(outputs[0])

    def save(self, directory: Path) -> Path:
        """Copy the ONNX file, with ``self.metadata`` (the run's preprocessing and labels, set by the pipeline)
        in its ``metadata_props``."""
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "model.onnx"
        if self.metadata:
            from torchslim.runtime.onnx import write_onnx

            write_onnx(self.path, target, self.metadata)
        else:
            shutil.copyfile(self.path, target)
        return target

    def load_and_run(self, path: Path, inputs: Any) -> Any:
        session = self._session(path)
        return session.run(None, _as_numpy_feed(session, inputs))


__all__ = ["Deployable", "OnnxRuntimeDeployable", "TorchDeployable", "compile_module", "compile_unavailable",
           "onnx_session"]
