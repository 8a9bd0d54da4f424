"""Capturing a graph by running the model once: the fallback for models torch.export cannot capture.

torch.export traces with symbolic tensors, so a forward that branches on tensor values, calls ``.item()`` or
leaves PyTorch for NumPy fails to capture. Here the model runs on the real example inputs inside a
``TorchFunctionMode`` that records every torch function it calls (``F.conv2d``, ``Tensor.__add__``,
``torch.cat``, ...) with the tensors it read and wrote; module hooks record which layer each call belongs to.
The record becomes an ``fx.Graph`` in the shape `torchslim.graph.channels` reads from an ExportedProgram.

The trace follows the path the example inputs take: a branch not taken is not analysed, and layers whose
parameters it never reads are reported as skipped. Calls the analysis does not know block the channels they
touch, as with torch.export.
"""

from __future__ import annotations

import inspect
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from torchslim.core.modules import output_tensors

# Torch functions whose argument order differs from the aten operator the analysis reads: (names, reorder).
_REORDER = {
    F.batch_norm: ("input", "weight", "bias", "running_mean", "running_var"),
    F.instance_norm: ("input", "weight", "bias", "running_mean", "running_var"),
    F.embedding: ("weight", "input"),
    F.embedding_bag: ("weight", "input", "offsets"),
}
_VARARGS = {"permute", "view", "reshape", "repeat", "expand", "tile"}  # x.permute(0, 2, 1) == x.permute((0, 2, 1))


@dataclass
class Signature:
    inputs_to_parameters: dict[str, str] = field(default_factory=dict)
    inputs_to_buffers: dict[str, str] = field(default_factory=dict)


@dataclass
class TracedProgram:
    """What the channel analysis reads from an ExportedProgram, plus why tracing was used and what it missed."""

    graph: torch.fx.Graph
    graph_signature: Signature
    notes: dict[str, str] = field(default_factory=dict)
    unseen: list[str] = field(default_factory=list)  # layers with parameters the trace never read


def _name_of(func) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a tensor property such as x.T: the descriptor names it
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _sanitize(text: str) -> str:
    return re.sub(r"\W", "_", text).strip("_") or "op"


def _positional(func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A Python function's arguments in declaration order, as an aten operator takes them (F.layer_norm passes
    its weight and bias by keyword); keyword-only ones stay keywords."""
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    bound.apply_defaults()
    positional, keywords = [], {}
    for parameter in inspect.signature(func).parameters.values():
        value = bound.arguments.get(parameter.name)
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            positional.append(value)
        elif parameter.kind == parameter.VAR_POSITIONAL:
            positional.extend(value or ())
        elif parameter.kind == parameter.KEYWORD_ONLY:
            keywords[parameter.name] = value
        else:
            keywords.update(value or {})
    return tuple(positional), keywords


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.graph = torch.fx.Graph()
        self.signature = Signature()
        self.nodes: dict[int, tuple[torch.Tensor, torch.fx.Node]] = {}  # id(tensor) -> (tensor, latest node)
        self.stack: list[tuple[str, type]] = []
        self.read: set[int] = set()  # ids of the parameters and buffers the run read
        self.count = 0
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            node = self._placeholder(f"p_{_sanitize(name)}", tensor)
            self.signature.inputs_to_parameters[node.name] = name

    def _placeholder(self, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        node = self.graph.placeholder(name)
        node.meta["val"] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        self.nodes[id(tensor)] = (tensor, node)
        return node

    def node_for(self, tensor: torch.Tensor) -> torch.fx.Node:
        entry = self.nodes.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            self.count += 1
            return self._placeholder(f"constant_{self.count}", tensor)
        self.read.add(id(tensor))
        return entry[1]

    def _node_args(self, value):
        return pytree.tree_map_only(torch.Tensor, self.node_for, value)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name_of(func)
        tensors_out = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not tensors_out and name != "__setitem__":
            return out  # sizes, dtypes, Python numbers: nothing flows through them
        if func in _REORDER:
            bound = inspect.signature(func).bind(*args, **kwargs)
            args, kwargs = tuple(bound.arguments.get(k) for k in _REORDER[func]), {}
        elif inspect.isfunction(func):
            args, kwargs = _positional(func, args, kwargs)
        elif name in _VARARGS and len(args) > 2 or (name in _VARARGS and len(args) == 2 and isinstance(args[1], int)):
            args = (args[0], tuple(args[1:]))
        self.count += 1
        node = self.graph.create_node("call_function", func, self._node_args(tuple(args)),
                                      self._node_args(dict(kwargs)), name=f"{_sanitize(name)}_{self.count}")
        if self.stack:
            node.meta["nn_module_stack"] = {path: (path, kind) for path, kind in self.stack}
        if isinstance(out, torch.Tensor):
            node.meta["val"] = torch.empty(out.shape, dtype=out.dtype, device="meta")
            self.nodes[id(out)] = (out, node)
        else:
            for index, tensor in enumerate(tensors_out):
                item = self.graph.create_node("call_function", operator.getitem, (node, index),
                                              name=f"{node.name}_out{index}")
                item.meta = {**node.meta, "val": torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")}
                self.nodes[id(tensor)] = (tensor, item)
        return out


def trace(model: nn.Module, args: tuple, why: str) -> TracedProgram:
    """Run ``model(*args)`` once and record its graph (see the module docstring); ``why``: why not torch.export."""
    recorder = _Recorder(model)
    names = {id(m): name for name, m in model.named_modules() if name}  # the root is not a layer
    for index, tensor in enumerate(pytree.tree_leaves(args)):
        if isinstance(tensor, torch.Tensor):
            recorder._placeholder(f"input_{index}", tensor)

    def enter(module, _inputs):
        if id(module) in names:
            recorder.stack.append((names[id(module)], type(module)))

    def leave(module, _inputs, _output):
        if id(module) in names and recorder.stack:
            recorder.stack.pop()

    hooks = [nn.modules.module.register_module_forward_pre_hook(enter),
             nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recorder:
            output = model(*args)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    outputs = [recorder.node_for(t) for t in output_tensors(output)]
    recorder.graph.output(tuple(outputs))
    notes = {"(graph)": f"captured by running the example inputs ({why}): branches the inputs did not take "
                        f"were not analysed"}
    unseen = []
    for module_name, module in model.named_modules():
        own = [id(p) for p in module.parameters(recurse=False)]
        if own and not any(p in recorder.read for p in own):
            unseen.append(module_name)
            notes[module_name] = "not run on the example inputs (the trace follows one path)"
    return TracedProgram(recorder.graph, recorder.signature, notes, unseen)
