"""Reading intermediate states for distillation: named layer outputs (with learned projections when the student's
width differs from the teacher's) and a transformer layer's query/key/value states.

The student is wrapped in `TappedStudent`, whose forward returns ``(outputs, features)`` so that the projections
train with it (and synchronise under DistributedDataParallel like any other parameter).
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch
from torch import nn

from torchslim.core.modules import call_model
from torchslim.errors import InputError

# Child-name triples of the query/key/value projections in common attention implementations.
_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"),
              ("to_q", "to_k", "to_v"))


def find_module(model: nn.Module, name: str, where: str) -> nn.Module:
    """The submodule called ``name``; an InputError naming the nearest existing names when there is none."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    near = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.4)
    hint = f" (nearest: {', '.join(near)})" if near else ""
    raise InputError(f"{where}: no layer named {name!r} in the model{hint}")


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"layer output of type {type(output).__name__} holds no tensor to distil")


class Taps:
    """Forward hooks recording the outputs of some modules (the first tensor of a tuple output)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.values: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def record(module, args, output):
            self.values[name] = _first_tensor(output)
        return record

    def take(self) -> dict[str, torch.Tensor]:
        values, self.values = self.values, {}
        return values

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def projection(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
    """A learned map from a student feature's width to the teacher's: a 1x1 convolution for (N, C, H, W) maps,
    a linear layer on the last dimension otherwise; identity when the widths already agree."""
    conv = student.ndim == 4
    s_width, t_width = (student.shape[1], teacher.shape[1]) if conv else (student.shape[-1], teacher.shape[-1])
    if s_width == t_width:
        return nn.Identity()
    layer = nn.Conv2d(s_width, t_width, 1, bias=False) if conv else nn.Linear(s_width, t_width, bias=False)
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    return layer


def find_attention(model: nn.Module, where: str, layer: int = -1) -> dict[str, str]:
    """Names of the query/key/value projections of one attention layer (default: the last)."""
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        for triple in _QKV_NAMES:
            if all(isinstance(children.get(c), nn.Linear) for c in triple):
                prefix = f"{name}." if name else ""
                found.append(dict(zip(("query", "key", "value"), (prefix + c for c in triple))))
    if not found:
        raise InputError(f"{where}: attention distillation needs query/key/value projections "
                         f"({', '.join('/'.join(t) for t in _QKV_NAMES)}); the model has none")
    return found[layer]


def attention_heads(model: nn.Module) -> int:
    """The model's attention head count (from a transformers config, or an attention module's attribute)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "num_attention_heads", None):
            return int(config.num_attention_heads)
    for module in model.modules():
        for attr in ("num_attention_heads", "num_heads", "n_heads"):
            if isinstance(getattr(module, attr, None), int):
                return getattr(module, attr)
    return 1


class TappedStudent(nn.Module):
    """The student plus what distillation reads from it: ``forward`` returns ``(outputs, features, attention)``.

    Attributes:
        model: the student (trained in place).
        projections: one learned map per distilled feature pair (identity where widths agree).
    """

    def __init__(self, model: nn.Module, feature_layers: list[str], attention_layers: dict[str, str] | None,
                 projections: list[nn.Module]):
        super().__init__()
        self.model = model
        self.projections = nn.ModuleList(projections)
        modules = dict(model.named_modules())
        self.feature_layers = list(feature_layers)
        self._features = Taps({n: modules[n] for n in feature_layers})
        self._attention = Taps({k: modules[v] for k, v in (attention_layers or {}).items()})

    def forward(self, *inputs):
        outputs = self.model(*inputs)
        taken = self._features.take()
        projections = list(self.projections) or [nn.Identity()] * len(self.feature_layers)  # before sizing
        features = [p(taken[n]) for p, n in zip(projections, self.feature_layers)]
        return outputs, features, self._attention.take()

    def remove_taps(self) -> nn.Module:
        self._features.remove()
        self._attention.remove()
        return self.model


class TappedTeacher:
    """The teacher, run without gradients, returning ``(outputs, features, attention)`` like `TappedStudent`."""

    def __init__(self, model: nn.Module, feature_layers: list[str], attention_layers: dict[str, str] | None):
        modules = dict(model.named_modules())
        self.model = model
        self.feature_layers = list(feature_layers)
        self._features = Taps({n: modules[n] for n in feature_layers})
        self._attention = Taps({k: modules[v] for k, v in (attention_layers or {}).items()})

    @torch.no_grad()
    def __call__(self, inputs: Any):
        outputs = call_model(self.model, inputs)
        taken = self._features.take()
        return outputs, [taken[n] for n in self.feature_layers], self._attention.take()

    def remove_taps(self) -> None:
        self._features.remove()
        self._attention.remove()
