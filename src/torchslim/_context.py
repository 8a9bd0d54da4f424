"""What a method handler works on (`_StepContext`) and the one function that runs a step (`run_step`).

Both the recipe runner (`torchslim.pipeline.Pipeline`) and the Python API (`torchslim.apply`) call `run_step`, so a
method behaves the same whichever way it is reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.data import DataBundle
from torchslim.zoo import ModelBundle

# Steps whose changes to the model no shapes record can describe (a replaced embedding table, a packed weight,
# bfloat16 tensors with casts around the model): the saved artifact lists them with their config, and
# `torchslim.load` repeats them on the template before loading the weights (what they change depends only on
# the config and the layers' shapes). (kind, method); a method of None stands for every method of the kind.
REPLAYED_STEPS = (("compress_embeddings", None), ("materialize", None), ("quantize", "bf16"))


def is_replayed(kind: str, method: str) -> bool:
    """Whether a step of this kind and method is recorded in the artifact and repeated by `torchslim.load`."""
    return any(kind == k and m in (None, method) for k, m in REPLAYED_STEPS)


@dataclass
class _StepContext:
    """What a step handler works on. Torch steps change ``model`` in place; ``teacher`` is the untouched original.

    Attributes:
        batch_size: the recipe's batched-latency batch size (runtime choices are timed at it).
        where: the recipe location of the running step (e.g. "recipe.yaml: steps[1].finetune"), for messages.
        masks: parameter name -> keep-mask of pruned weights, honoured by every later training step.
        skipped: layer name -> reason, for layers a method left as they were.
        replayed: (kind, method, config as a dict) of the structural steps applied so far (see `REPLAYED_STEPS`).
    """

    model: nn.Module
    teacher: nn.Module
    bundle: ModelBundle
    data: DataBundle
    seed: int
    threads: int
    workdir: Path
    batch_size: int = 64
    progress: bool = True
    where: str = ""
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    checkpoints: Path | None = None
    step_index: int = 0
    recipe_dict: dict = field(default_factory=dict)
    replayed: list[dict] = field(default_factory=list)

    def example_inputs(self, batch_size: int) -> Any:
        return self.bundle.example_inputs(batch_size)

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def skip_layer(self, name: str, reason: str) -> None:
        self.skipped[name] = reason

    def resolve_model(self, spec: Any) -> nn.Module:
        """The model a spec names (a distillation teacher, say), frozen in eval mode. Raises InputError."""
        from torchslim.zoo import resolve_model

        return resolve_model(spec).model.eval().requires_grad_(False)

    def checkpoint_dir(self, name: str) -> Path | None:
        """Where the running step keeps its training checkpoints (None when the run keeps none)."""
        return None if self.checkpoints is None else self.checkpoints / f"step{self.step_index}-{name}"

    def apply_masks(self) -> None:
        """Zero the pruned weights again (after an optimiser step moved them)."""
        if self.masks:
            parameters = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, mask in self.masks.items():
                    parameters[name].mul_(mask.to(parameters[name].device))


def run_step(context: _StepContext, kind: str, method: str, config: Any, *, onnx_metadata: bool = True):
    """Apply one registered method to ``context.model``; returns the handler's Deployable.

    An ONNX result carries the model's preprocessing and class names in its metadata (unless ``onnx_metadata`` is
    False: a search trial's artifacts are only sized); a torch result records the structural steps applied so
    far, so that its artifact reloads (see `torchslim.load`).
    """
    from torchslim._config import to_dict
    from torchslim.registry import get_method
    from torchslim.runtime import OnnxRuntimeDeployable, TorchDeployable

    deployable = get_method(kind, method).handler(context, config)
    # A method that applies another one (quantize: auto) names it and its config under details["chosen"].
    chosen = deployable.details.get("chosen")
    applied, settings = (chosen["method"], chosen["config"]) if isinstance(chosen, dict) else (method, None)
    if is_replayed(kind, applied):
        context.replayed.append({"kind": kind, "method": applied,
                                 "config": settings if settings is not None else to_dict(config)})
    if isinstance(deployable, OnnxRuntimeDeployable) and onnx_metadata:
        from torchslim.export.optimum import metadata

        deployable.metadata = metadata(context)  # preprocessing and labels travel inside the file
    elif isinstance(deployable, TorchDeployable) and context.replayed:
        deployable.replayed = list(context.replayed)
    return deployable
