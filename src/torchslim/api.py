"""The Python front door: `apply` one method config to a plain ``nn.Module``, get an `ApplyResult`.

The name follows the anchors users know: torchao's ``quantize_(model, config)`` (the config's type picks the
method) and NNCF's ``nncf.quantize(model, calibration_dataset)`` (data as an iterable of batches, a new model
returned). torchslim's methods are not only quantizers (pruning, factorization, fine-tuning, ...), so the verb is
``apply``; like NNCF and unlike torchao's trailing-underscore ``quantize_``, the model passed in is left as it was
unless ``inplace=True``.

Example:
    >>> import torchslim
    >>> result = torchslim.apply(model, torchslim.MagnitudePruningConfig(sparsity=0.5), example_inputs=x)
    >>> result.model(x).shape, result.skipped
    >>> result.save("out/pruned")                    # reloads with torchslim.load("out/pruned", model)
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from torchslim.errors import InputError, shorten


class ApplyResult:
    """What `apply` returns: the transformed model, how to run and save it, and what the method reported.

    Attributes:
        model: the PyTorch module after the method (for a result on another runtime, the float module it was
            built from).
        deployable: what to run: ``model`` itself on PyTorch, else a callable on the method's runtime
            (ONNX Runtime, TorchInductor) taking the model's inputs.
        runtime: "torch", "onnxruntime" or "torchinductor".
        skipped: layer name -> why the method left it as it was.
        details: facts about what the method did (its report entry).
        method: "kind:name" of the method applied.
    """

    def __init__(self, deployable, context, method: str, workdir):
        from torchslim._adapter import unwrap_model

        # The scratch folder lives as long as the result: an ONNX result's file is in it.
        self._deployable, self._context, self._workdir = deployable, context, workdir
        self.method = method
        self.runtime: str = deployable.runtime
        self.skipped: dict[str, str] = dict(context.skipped)
        self.details: dict = dict(deployable.details)
        self.model: nn.Module = unwrap_model(deployable.module)
        self.deployable = self.model if self.runtime == "torch" else RuntimeModel(deployable)

    def __call__(self, *inputs: Any) -> Any:
        return self.deployable(*inputs)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the artifact a recipe run would write for this model (see docs/artifacts.md) and a
        ``manifest.json`` into the folder ``path`` (created whole or not at all); returns the artifact's path.

        Reload it with ``torchslim.load(path, model)`` (``model``: a fresh instance of the original class).
        """
        from torchslim._output import atomic_output_dir, check_output_dir
        from torchslim.integrity import current_umask, write_manifest

        target = check_output_dir(path, overwrite=overwrite)
        with atomic_output_dir(target) as tmp:
            artifact = self._deployable.save(tmp)
            artifact.chmod(0o666 & ~current_umask())
            write_manifest(tmp)
        return target / artifact.name

    def __repr__(self) -> str:
        return (f"ApplyResult(method={self.method!r}, runtime={self.runtime!r}, skipped={len(self.skipped)} "
                f"layers, details={shorten(self.details, 80)})")


class RuntimeModel:
    """A model on a runtime other than eager PyTorch, called like a module: ``model(x)`` or ``model(a, b)``."""

    def __init__(self, deployable):
        self.deployable = deployable
        self.runtime: str = deployable.runtime

    def __call__(self, *inputs: Any) -> torch.Tensor:
        if not inputs:
            raise TypeError("expected the model's inputs")
        return self.deployable(inputs if len(inputs) > 1 else inputs[0])

    def __repr__(self) -> str:
        return f"RuntimeModel(runtime={self.runtime!r})"


def resolve_config(config: Any) -> tuple[str, str, Any]:
    """(kind, method, config) of a method config object or a recipe step mapping such as
    ``{"prune": {"method": "magnitude", "sparsity": 0.5}}`` (checked as a recipe step is)."""
    from torchslim.registry import method_for_config

    if isinstance(config, dict):
        from torchslim.errors import RecipeError
        from torchslim.recipe import _parse_step, _Problems

        problems = _Problems()
        step = _parse_step(config, 0, problems)
        if step is None or problems.items:
            raise RecipeError("config", problems.items)
        return step.kind, step.method, step.config
    from torchslim._config import FieldError, check_version

    entry = method_for_config(config)
    try:
        check_version(type(config), getattr(config, "version", None))
    except FieldError as error:
        raise InputError(f"config: {error}") from None
    return entry.kind, entry.name, config


def apply(model: nn.Module | ApplyResult, config: Any, data: Iterable | None = None, *,
          example_inputs: Any = None, validation: Iterable | None = None, teacher: nn.Module | None = None,
          task: str | None = None, seed: int = 0, inplace: bool = False, progress: bool = False) -> ApplyResult:
    """Apply one registered method to ``model``.

    Args:
        model: a plain ``nn.Module`` (its forward takes one batch's tensors), a transformers model, or the
            result of an earlier `apply` to continue from, as a recipe's next step does: its model is changed
            in place, and its pruning masks are kept by later fine-tuning.
        config: a method config (e.g. ``Int8StaticConfig()``, see ``torchslim.list_methods()``) or a recipe step
            mapping (``{"prune": {"method": "wanda", "sparsity": 0.5}}``).
        data: a ``DataLoader`` or any iterable of batches (tensors, ``(inputs, labels)`` pairs, or mappings of
            named inputs); it feeds calibration and training. Read once and held in memory.
        example_inputs: one input batch, for methods that trace the model; default: the first samples of data.
        validation: batches for early stopping and the methods' own scoring (default: ``data``).
        teacher: the model to distil from (default: a copy of ``model`` as given).
        task: "classification" (default), "ctr", "embedding" or "lm" (a causal LM from transformers is "lm").
        seed: seeds sampling and training.
        inplace: change ``model`` itself instead of a copy.
        progress: show training progress bars.

    Returns:
        An `ApplyResult`.

    Raises:
        InputError: a config of no registered method, a newer config version, or data of the wrong form.
    """
    from torchslim._context import run_step

    kind, method, config = resolve_config(config)
    if isinstance(model, ApplyResult):
        context, workdir = _continue(model, data, validation)
    else:
        if not isinstance(model, nn.Module):
            raise InputError(f"model: expected an nn.Module, got {type(model).__name__}")
        context, workdir = _new_context(model, data, validation, example_inputs=example_inputs,
                                        teacher=teacher, task=task, seed=seed, inplace=inplace)
    context.progress = progress
    context.where = f"apply({type(config).__name__})"
    torch.manual_seed(seed)
    deployable = run_step(context, kind, method, config)
    return ApplyResult(deployable, context, f"{kind}:{method}", workdir)


def _new_context(model: nn.Module, data, validation, *, example_inputs, teacher, task, seed, inplace):
    from torchslim._adapter import data_bundle, model_bundle, wrap_model
    from torchslim._context import _StepContext

    working = model if inplace else copy.deepcopy(model)
    wrapped, model_task = wrap_model(working)
    bundle_data, collate = data_bundle(data, validation, wrapped)
    bundle = model_bundle(wrapped, task=task or model_task, data=bundle_data, collate=collate,
                          example_inputs=example_inputs)
    wrapped.eval()
    teacher = copy.deepcopy(wrapped) if teacher is None else wrap_model(teacher)[0]
    teacher = teacher.eval().requires_grad_(False)
    workdir = tempfile.TemporaryDirectory(prefix="torchslim-apply-")
    context = _StepContext(model=wrapped, teacher=teacher, bundle=bundle, data=bundle_data, seed=seed,
                           threads=torch.get_num_threads(), workdir=Path(workdir.name))
    return context, workdir


def _continue(previous: ApplyResult, data, validation):
    """The context of an earlier result, on the model it left (masks and replayed steps carry on)."""
    from torchslim._adapter import data_bundle

    if previous.runtime != "torch":
        raise InputError(f"model: the {previous.method} result runs on {previous.runtime}; no method applies to it")
    context = previous._context
    context.model = previous._deployable.module
    context.skipped = {}
    if data is not None or validation is not None:
        context.data, collate = data_bundle(data, validation, context.model)
        if collate is not None:
            context.bundle.preprocess = collate
    return context, previous._workdir


__all__ = ["ApplyResult", "RuntimeModel", "apply"]
