"""One loader for every artifact torchslim writes: `load` reads the format stamp and rebuilds a callable model.

Formats (docs/artifacts.md describes each):

===================  ==============================  =================================================
format               files                           rebuilt as
===================  ==============================  =================================================
torch                model.safetensors +             the original class with the recorded shapes: pruned
                     model.shapes.json               channels, factor pairs, replaced tables, packed weights
weight-only          + model.weight_only.json        packed int4/int8 linear layers
compact              model.tslim                     the original class holding the decoded weights
pt2e-int8            model.int8.safetensors          a PT2E int8 graph compiled by TorchInductor
onnx                 model.onnx                      an ONNX Runtime session
state-dict           model.safetensors alone         the original class holding the weights
===================  ==============================  =================================================

Example:
    >>> model = torchslim.load("out/demo")               # a recipe run's folder: its model spec is rebuilt
    >>> model = torchslim.load("out/pruned", MyNet())     # a fresh instance of the original class
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.errors import ArtifactError, InputError

# Names a folder's artifact goes by, in the order they are looked for when no report.json names it.
_ARTIFACT_NAMES = ("model.weight_only.json", "model.shapes.json", "model.tslim", "model.int8.safetensors",
                   "model.onnx", "model.safetensors")


def load(path: str | Path, model: nn.Module | None = None, *, verify: bool = True,
         example_inputs: Any = None) -> Any:
    """Load the artifact at ``path`` (an output folder or the artifact file) as something callable.

    Args:
        path: a folder written by a recipe run or `ApplyResult.save`, or the artifact file inside it.
        model: a fresh instance of the original model class (its weights are replaced); not needed for ONNX,
            nor for a recipe run's folder, whose recipe.yaml names the model spec to build.
        verify: check every file against the folder's ``manifest.json`` first (see `torchslim.integrity`).
        example_inputs: one input batch, for a PT2E int8 file that records no input shapes.

    Returns:
        An ``nn.Module`` in eval mode, or for ONNX and PT2E int8 a runtime model called like one
        (``loaded(x)``, ``loaded(a, b)``).

    Raises:
        ArtifactError: no artifact there, a damaged or altered file, or one that does not fit ``model``.
        InputError: ``model`` is needed and not given.
    """
    format_name, artifact = find_artifact(Path(path))
    if format_name == "onnx":
        return _load_onnx(artifact, verify)
    folder = artifact.parent
    if model is None:
        model = _model_from_recipe(folder, format_name)
    elif not isinstance(model, nn.Module):
        raise InputError(f"model: expected a fresh instance of the original nn.Module class, got "
                         f"{type(model).__name__}")
    wrapped = _as_saved(model, format_name, artifact)
    loaded = _LOADERS[format_name](wrapped, artifact, verify, example_inputs)
    if not isinstance(loaded, nn.Module):
        return loaded
    return (loaded.model if wrapped is not model else loaded).eval()


def _as_saved(model: nn.Module, format_name: str, artifact: Path) -> nn.Module:
    """``model`` as it was saved: `torchslim.apply` saves a transformers model inside torchslim's wrapper (its
    tensor names start with ``model.``), other writers (the pipeline's ``hf:`` models aside) save it bare."""
    from torchslim._adapter import is_transformers_model, wrap_model

    if not is_transformers_model(model):
        return model
    if format_name in ("torch", "weight-only", "state-dict"):
        from torchslim._validate import safetensors_header

        weights = artifact if artifact.suffix == ".safetensors" else artifact.parent / "model.safetensors"
        names, _ = safetensors_header(weights)
        if not all(name.startswith("model.") for name in names):
            return model
    return wrap_model(model)[0]


def find_artifact(path: Path) -> tuple[str, Path]:
    """(format name, artifact file) for a folder or a file; raises ArtifactError when there is none."""
    if path.is_dir():
        named = _named_by_report(path)
        for name in ([named] if named else []) + list(_ARTIFACT_NAMES):
            if (path / name).is_file():
                return find_artifact(path / name)
        raise ArtifactError(f"{path}: holds no torchslim artifact (none of {', '.join(_ARTIFACT_NAMES)})")
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file or folder")
    if path.name == "model.weight_only.json" or (path.name == "model.safetensors" and
                                                   (path.parent / "model.weight_only.json").is_file()):
        return "weight-only", path.parent / "model.weight_only.json"
    if path.name == "model.shapes.json":
        return "torch", path
    if path.suffix == ".tslim":
        return "compact", path
    if path.suffix == ".onnx":
        return "onnx", path
    if path.suffix == ".safetensors":
        from torchslim._validate import safetensors_header
        from torchslim.quant.pt2e_backend import ARTIFACT_FORMAT

        _, metadata = safetensors_header(path)
        if metadata.get("format") == ARTIFACT_FORMAT:
            return "pt2e-int8", path
        shapes = path.parent / "model.shapes.json"
        return ("torch", shapes) if path.name == "model.safetensors" and shapes.is_file() else ("state-dict", path)
    raise ArtifactError(f"{path}: not a torchslim artifact (expected one of {', '.join(_ARTIFACT_NAMES)})")


def _named_by_report(folder: Path) -> str | None:
    """The artifact a recipe run's report.json names (a run folder also holds exports in other formats)."""
    try:
        name = json.loads((folder / "report.json").read_text()).get("artifact")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in _ARTIFACT_NAMES else None


def _model_from_recipe(folder: Path, format_name: str) -> nn.Module:
    """The model a recipe run's folder was made from, built from the model spec in its recipe.yaml."""
    recipe = folder / "recipe.yaml"
    if not recipe.is_file():
        raise InputError(f"{folder}: a {format_name} artifact is rebuilt on its original model class; pass "
                         f"model= (a fresh instance of it)")
    from torchslim.recipe import load_recipe
    from torchslim.zoo import resolve_model

    return resolve_model(load_recipe(recipe).model).model


def _load_torch(model: nn.Module, shapes_file: Path, verify: bool, example_inputs: Any) -> nn.Module:
    """Factor pairs, replayed steps (embedding tables, packed weights), pruned shapes, then the weights."""
    from torchslim._validate import read_json, read_shapes
    from torchslim.factorize.svd import refactorize_to_shapes
    from torchslim.integrity import verify_manifest
    from torchslim.pruning.channel import resize_to_shapes
    from torchslim.pruning.channel.surgery import set_size_attributes
    from torchslim.runtime import SHAPES_FORMAT, load_safetensors

    folder = shapes_file.parent
    verify_manifest(folder, [shapes_file.name, "model.safetensors"], verify=verify)
    shapes = read_shapes(folder, SHAPES_FORMAT)
    document = read_json(shapes_file)  # (read_shapes checked its format) the steps and attributes it records
    refactorize_to_shapes(model, shapes, folder)
    for index, step in enumerate(document.get("replayed") or []):
        _replay(model, step, f"{shapes_file}: replayed[{index}]")
    resize_to_shapes(model, shapes, folder)
    set_size_attributes(model, document.get("attributes"), str(shapes_file))
    load_safetensors(model, folder / "model.safetensors")
    return model


def _replay(model: nn.Module, step: Any, where: str) -> None:
    """Repeat a step recorded in the artifact (see `torchslim._context.REPLAYED_STEPS`) on ``model``."""
    from torchslim._config import FieldError, from_dict
    from torchslim._context import is_replayed
    from torchslim.registry import get_method

    if not isinstance(step, dict) or not is_replayed(str(step.get("kind")), str(step.get("method"))) \
            or not isinstance(step.get("config"), dict):
        raise ArtifactError(f"{where}: expected a recorded step (compress_embeddings, materialize, quantize: bf16)")
    try:
        config_cls = get_method(step["kind"], str(step.get("method"))).config_cls
        # A key renamed since the artifact was written only set how the step calibrated (compress_embeddings'
        # frequency_samples), which replaying the structure does not read: drop it rather than refuse the file.
        recorded = {k: v for k, v in step["config"].items() if k not in getattr(config_cls, "renamed_fields", {})}
        config = from_dict(config_cls, recorded)
    except (KeyError, FieldError) as error:
        raise ArtifactError(f"{where}: {error}") from None
    if step["kind"] == "materialize":
        from torchslim.compact.materialize import materialize_

        materialize_(model, config)
    elif step["kind"] == "quantize":
        from torchslim.quant.bf16 import to_bf16_

        to_bf16_(model, config)
    else:
        from torchslim.compact.embeddings import compress_embeddings_

        compress_embeddings_(model, config)


def _load_weight_only(model: nn.Module, path: Path, verify: bool, example_inputs: Any) -> nn.Module:
    from torchslim.quant.weight_only_step import _load_weight_only as load_weight_only

    return load_weight_only(model, path.parent, verify=verify)


def _load_compact(model: nn.Module, path: Path, verify: bool, example_inputs: Any) -> nn.Module:
    from torchslim.compact.artifact import _load_compact as load_compact

    return load_compact(model, path, verify=verify)


def _load_pt2e(model: nn.Module, path: Path, verify: bool, example_inputs: Any):
    from torchslim.api import RuntimeModel
    from torchslim.quant.pt2e_backend import load_saved

    return RuntimeModel(load_saved(model.eval(), path, example_inputs, verify=verify))


def _load_state_dict(model: nn.Module, path: Path, verify: bool, example_inputs: Any) -> nn.Module:
    from torchslim.integrity import verify_manifest
    from torchslim.runtime import load_safetensors

    verify_manifest(path.parent, [path.name], verify=verify)
    load_safetensors(model, path)
    return model


class OnnxModel:
    """An ONNX file on ONNX Runtime's CPU provider, called like a module: ``model(x)`` or ``model(a, b)``.

    Attributes:
        path: the file. session: the ``onnxruntime.InferenceSession``. metadata: its ``metadata_props``.
    """

    def __init__(self, path: Path, session):
        self.path, self.session = path, session
        self.metadata = dict(session.get_modelmeta().custom_metadata_map)
        self.runtime = "onnxruntime"

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        names = [i.name for i in self.session.get_inputs()]
        feed = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r})"


def _load_onnx(path: Path, verify: bool) -> OnnxModel:
    from torchslim.runtime import onnx_session

    return OnnxModel(path, onnx_session(path, verify=verify))


_LOADERS = {"torch": _load_torch, "weight-only": _load_weight_only, "compact": _load_compact,
            "pt2e-int8": _load_pt2e, "state-dict": _load_state_dict}

__all__ = ["OnnxModel", "find_artifact", "load"]
