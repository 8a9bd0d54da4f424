"""Channel dependency analysis on a captured graph.

Every channel a layer produces gets an integer id. Ids flow through the graph with the tensors that carry them
(one id vector per tracked dimension), and operations that force channels to be cut together *unite* ids in a
union-find: a residual addition unites its operands position by position, a depthwise convolution keeps its
input's ids, a concatenation lays its inputs' ids end to end, a flatten into a Linear repeats each channel's id
over the positions it expands to, an equal chunk unites its pieces position by position. A class of united ids
is one prunable channel: removing it removes the matching slice from every parameter that carries one of its
ids. Ids that must not change — the model's output, grouped convolutions, operations the analysis does not know —
are *blocked*, with the reason, and stay as they are.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

TensorIds = dict  # tensor dimension -> np.ndarray of channel ids (only dimensions that carry channel identity)


class UnionFind:
    """Union-find over channel ids 0..n-1 (grown on demand), with path halving."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(i) for i in ids.tolist()), dtype=np.int64, count=len(ids))


@dataclass
class ChannelGraph:
    """The result of the analysis.

    Attributes:
        param_ids: (parameter or buffer name, dimension) -> channel id per index along that dimension.
        producers: (module name, ids of the channels it creates) for every layer that creates channels.
        blocked: channel id -> why it must stay.
        skipped: layer name -> why its channels (some or all) stay as they are.
        modules: module name -> the kind of layer ("conv", "linear", "norm", "embedding"), for attribute updates.
        literal_reshapes: channel ids that pass a view/reshape whose target size names their count: fine when
            the code computes that size from the tensor, wrong when it is a constant of the model's code (the
            graph cannot tell); `torchslim.pruning.channel.prune` blocks them if the pruned model fails to run.
        sizes: (module name, attribute) -> the channel ids of a tensor the module's code creates with that
            attribute's value as a size (`torchslim.graph.sizes`); pruning sets the attribute to the kept count.
    """

    uf: UnionFind = field(default_factory=UnionFind)
    param_ids: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    producers: list[tuple[str, np.ndarray]] = field(default_factory=list)
    blocked: dict[int, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    literal_reshapes: list[tuple[np.ndarray, str]] = field(default_factory=list)
    sizes: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def block(self, ids: np.ndarray | None, reason: str, layer: str | None = None) -> None:
        if ids is None or len(ids) == 0:
            return
        for i in ids.tolist():
            self.blocked.setdefault(i, reason)
        if layer:
            self.skipped.setdefault(layer, reason)

    def use(self, name: str, dim: int, ids: np.ndarray) -> None:
        """Parameter ``name`` carries channel ``ids`` along ``dim`` (a shared parameter unites its uses)."""
        key = (name, dim)
        if key in self.param_ids:
            self.uf.union(self.param_ids[key], ids)
        else:
            self.param_ids[key] = ids

    def blocked_roots(self) -> dict[int, str]:
        roots: dict[int, str] = {}
        for i, reason in self.blocked.items():
            roots.setdefault(self.uf.find(i), reason)
        return roots


def _shape(node) -> tuple[int, ...] | None:
    value = node.meta.get("val") if hasattr(node, "meta") else None
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


# Python operators on tensors, as a traced graph (`torchslim.graph.trace`) names them.
DUNDER = {"__add__": "add", "__radd__": "add", "__iadd__": "add_", "__sub__": "sub", "__rsub__": "sub",
          "__isub__": "sub", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul_", "__truediv__": "div",
          "__rtruediv__": "div", "__itruediv__": "div", "__matmul__": "matmul", "__neg__": "neg", "__pow__": "pow",
          "__getitem__": "subscript", "__setitem__": "setitem"}


def _op_name(node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))
    if name == "__get__":  # a tensor property (x.T, x.data): the descriptor names it
        name = getattr(getattr(target, "__self__", None), "__name__", name)
    return DUNDER.get(name, name)


def _arg(node, index: int, name: str, default=None):
    """Argument ``index`` of ``node``, or its keyword ``name`` (traced calls keep the caller's keywords)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


UNARY = {
    "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardtanh", "hardtanh_", "hardswish", "hardswish_",
    "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "dropout", "clone", "contiguous", "alias", "detach",
    "_to_copy", "to", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "clamp", "clamp_min", "erf", "relu6",
    "type_as", "lift_fresh_copy", "feature_dropout", "dropout_", "feature_dropout_", "alpha_dropout", "float", "half",
    "double", "bfloat16", "data",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "nan_to_num",
}
FRESH = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}  # a new tensor: its sizes are given
# New tensors of one value everywhere, whose sizes a module attribute may give (`torchslim.graph.sizes`).
FILLED = {"zeros", "ones", "empty", "full", "new_zeros", "new_ones", "new_empty", "new_full"}
ELEMENTWISE = {"add", "add_", "sub", "mul", "mul_", "div", "maximum", "minimum", "where", "pow"}
SPATIAL = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
           "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d", "max_pool2d_with_indices",
           "upsample_nearest2d", "upsample_bilinear2d", "pad", "constant_pad_nd", "reflection_pad2d",
           "_max_pool2d", "max_pool2d_with_indices", "interpolate", "adaptive_max_pool1d", "_adaptive_max_pool2d"}
REDUCE = {"mean", "sum", "amax", "amin", "std", "var"}
RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unflatten"}
MATMUL = {"baddbmm", "einsum"}
IGNORED = {"sym_size", "sym_numel", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
           "_set_grad_enabled", "size"}


class ChannelAnalysis:
    """Walks an ExportedProgram once, assigning and uniting channel ids (see the module docstring)."""

    def __init__(self, program: torch.export.ExportedProgram, recurrent: bool = False, model=None):
        self.program = program
        self.model = model  # for the attributes that size the tensors its code creates (`torchslim.graph.sizes`)
        self.recurrent = recurrent  # prune the hidden size of recurrent layers (`torchslim.graph.recurrent`)
        signature = program.graph_signature
        self.param_names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        self.graph = ChannelGraph()
        self.env: dict[str, Any] = {}

    # -- helpers --------------------------------------------------------------------------------------------
    def ids(self, arg) -> TensorIds:
        if isinstance(arg, torch.fx.Node):
            value = self.env.get(arg.name)
            return value if isinstance(value, dict) else {}
        return {}

    def param(self, arg) -> str | None:
        return self.param_names.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    @staticmethod
    def module_of(param_name: str) -> str:
        return param_name.rsplit(".", 1)[0] if "." in param_name else ""

    def layer_of(self, node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return path or node.name  # an op of the root module's own forward: the op names itself

    def block_all(self, node, reason: str) -> None:
        for arg in node.all_input_nodes:
            for ids in self.ids(arg).values():
                self.graph.block(ids, reason, self.layer_of(node))

    # -- the walk -------------------------------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                self.env[node.name] = {}
            elif node.op == "call_function":
                self.env[node.name] = self.visit(node)
                if not node.users and isinstance(self.env[node.name], dict) and not _unused_state(node):
                    # An unused result (e.g. a pooler the wrapper ignores) keeps its width: the module's own
                    # structure (a Hugging Face config, say) may still promise it.
                    for ids in self.env[node.name].values():
                        self.graph.block(ids, "result not used by the model's output", self.layer_of(node))
            elif node.op == "output":
                self._block_outputs(node.args)
            else:
                self.env[node.name] = {}
        self.graph.skipped.update(getattr(self.program, "notes", {}))
        unseen = getattr(self.program, "unseen", [])
        if unseen:
            # Layers the trace never ran may read any channel: nothing can be pruned safely.
            reason = f"{len(unseen)} layer(s) did not run on the example inputs (e.g. {unseen[0]}): nothing pruned"
            for module, ids in self.graph.producers:
                self.graph.block(ids, reason, module)
        return self.graph

    def _block_outputs(self, arg) -> None:
        if isinstance(arg, (list, tuple)):
            for item in arg:
                self._block_outputs(item)
        elif isinstance(arg, torch.fx.Node):
            for ids in self.ids(arg).values():
                self.graph.block(ids, "model output: its shape must not change")

    def visit(self, node) -> Any:
        try:
            return self._visit(node)
        except Exception as error:  # an op whose arguments surprise a rule is handled conservatively
            self.block_all(node, f"could not analyse {_op_name(node)} ({type(error).__name__}): channels kept")
            return {}

    def _visit(self, node) -> Any:
        name = _op_name(node)
        handler = getattr(self, f"op_{name}", None)
        if handler is not None:
            return handler(node)
        if name in UNARY:
            return dict(self.ids(node.args[0]))
        if name in ELEMENTWISE:
            return self.elementwise(node)
        if name in SPATIAL:
            return self.spatial(node)
        if name in REDUCE:
            return self.reduce(node)
        if name in RESHAPE:
            return self.reshape(node)
        if name in FILLED:
            from torchslim.graph.sizes import filled_tensor

            return filled_tensor(self, node, self.model)
        if name in IGNORED or name in FRESH:
            return {}
        if name in MATMUL:
            self.block_all(node, f"{name}: not analysed yet, coupled channels kept")
            return {}
        if any(self.ids(arg) for arg in node.all_input_nodes):
            self.block_all(node, f"unsupported operation {name}: coupled channels kept")
        return {}

    # -- layers with parameters -----------------------------------------------------------------------------
    def op_conv2d(self, node) -> TensorIds:
        x, weight, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
        groups = _arg(node, 6, "groups", 1)
        return self._conv(node, x, weight, bias, groups)

    op_conv1d = op_conv3d = op_conv2d

    def op_conv_transpose2d(self, node) -> TensorIds:
        x, weight, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
        groups = _arg(node, 6, "groups", 1)
        return self._conv(node, x, weight, bias, groups, transposed=True)

    op_conv_transpose1d = op_conv_transpose3d = op_conv_transpose2d

    def op_convolution(self, node) -> TensorIds:
        x, weight, bias, _, _, _, transposed, _, groups = node.args[:9]
        return self._conv(node, x, weight, bias, groups, transposed=bool(transposed))

    def _conv(self, node, x, weight, bias, groups: int, transposed: bool = False) -> TensorIds:
        """A convolution's weight is (out, in / groups, ...), a transposed one's (in, out / groups, ...)."""
        weight_name = self.param(weight)
        if weight_name is None:
            self.block_all(node, "convolution with a computed weight")
            return {}
        shape = _shape(weight)
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        in_channels = shape[0] if transposed else shape[1] * groups
        out_channels = shape[1] * groups if transposed else shape[0]
        x_ids = self.ids(x).get(1)
        module = self.module_of(weight_name)
        self.graph.modules[module] = "conv"
        if groups == 1:
            out = self.graph.uf.new(out_channels)
            if x_ids is not None:
                self.graph.use(weight_name, in_dim, x_ids)
            self.graph.producers.append((module, out))
            self.graph.use(weight_name, out_dim, out)
        elif in_channels == out_channels == groups and x_ids is not None:
            out = x_ids  # depthwise: each output channel belongs to its input channel, groups follow
            self.graph.use(weight_name, 0, out)
        else:
            out = self._grouped(weight_name, x_ids, groups, in_channels, out_channels, in_dim, out_dim)
            self.graph.producers.append((module, out))
        if self.param(bias):
            self.graph.use(self.param(bias), 0, out)
        return {1: out}

    def _grouped(self, weight_name: str, x_ids, groups: int, in_channels: int, out_channels: int,
                 in_dim: int, out_dim: int) -> np.ndarray:
        """A grouped convolution keeps its groups and loses the same positions in every group (equal widths
        per group): position j of every group is one channel class, on its input and on its output side."""
        out = self.graph.uf.new(out_channels)
        sides = [(out, out_channels, out_dim)] + ([(x_ids, in_channels, in_dim)] if x_ids is not None else [])
        for ids, count, dim in sides:
            columns = ids.reshape(groups, count // groups)
            for row in columns[1:]:
                self.graph.uf.union(columns[0], row)
            # Weight dim 1 holds one group's width (in / groups, or out / groups when transposed), dim 0 all.
            self.graph.use(weight_name, dim, columns[0] if dim == 1 else ids)
        return out

    def _dense(self, node, weight, bias, in_ids, out_axis: int, kind: str) -> np.ndarray | None:
        """A parameter matrix with outputs along ``out_axis`` and inputs along the other: new output channels."""
        weight_name = self.param(weight)
        if weight_name is None:
            self.block_all(node, f"{_op_name(node)} with a computed weight")
            return None
        module = self.module_of(weight_name)
        self.graph.modules[module] = kind
        out = self.graph.uf.new(_shape(weight)[out_axis])
        if in_ids is not None:
            self.graph.use(weight_name, 1 - out_axis, in_ids)
        self.graph.use(weight_name, out_axis, out)
        if self.param(bias):
            self.graph.use(self.param(bias), len(_shape(bias)) - 1, out)
        self.graph.producers.append((module, out))
        return out

    def op_linear(self, node) -> TensorIds:
        x, weight = node.args[0], node.args[1]
        bias = _arg(node, 2, "bias")
        x_ids, last = self.ids(x), len(_shape(x)) - 1
        out = self._dense(node, weight, bias, x_ids.get(last), 0, "linear")
        return {} if out is None else {**{d: v for d, v in x_ids.items() if d != last}, last: out}

    def op_batch_norm(self, node) -> TensorIds:
        x_ids = self.ids(node.args[0])
        channel = x_ids.get(1)
        for arg in node.args[1:5]:
            name = self.param(arg)
            if name is not None:
                self.graph.modules[self.module_of(name)] = "norm"
                if channel is not None:
                    self.graph.use(name, 0, channel)
        return dict(x_ids)

    def op__native_batch_norm_legit_no_training(self, node) -> list:
        return [self.op_batch_norm(node), {}, {}]

    op_instance_norm = op_batch_norm

    def op_layer_norm(self, node) -> TensorIds:
        x, normalized = node.args[0], node.args[1]
        x_ids, ndim = self.ids(x), len(_shape(x))
        params = [self.param(a) for a in node.args[2:4] if self.param(a)]
        for name in params:
            self.graph.modules[self.module_of(name)] = "norm"
        if len(normalized) == 1:
            if ndim - 1 in x_ids:
                for name in params:
                    self.graph.use(name, 0, x_ids[ndim - 1])
        else:
            for d in range(ndim - len(normalized), ndim):
                self.graph.block(x_ids.get(d), "LayerNorm over several dimensions", self.layer_of(node))
        return dict(x_ids)

    def op_group_norm(self, node) -> TensorIds:
        """GroupNorm keeps its group count: position j of every group is one channel class (equal widths)."""
        x_ids, groups = self.ids(node.args[0]), _arg(node, 1, "num_groups")
        channel = x_ids.get(1)
        if channel is not None:
            columns = channel.reshape(groups, -1)
            for row in columns[1:]:
                self.graph.uf.union(columns[0], row)
        for arg in node.args[2:4]:
            name = self.param(arg)
            if name is not None:
                self.graph.modules[self.module_of(name)] = "norm"
                if channel is not None:
                    self.graph.use(name, 0, channel)
        return dict(x_ids)

    def op_embedding(self, node) -> TensorIds:
        weight_name = self.param(node.args[0])
        if weight_name is None:
            return {}
        module = self.module_of(weight_name)
        self.graph.modules[module] = "embedding"
        out = self.graph.uf.new(_shape(node.args[0])[1])
        self.graph.use(weight_name, 1, out)
        self.graph.producers.append((module, out))
        return {len(_shape(node)) - 1: out}

    def op_embedding_bag(self, node) -> list:
        ids = self.op_embedding(node)
        return [{1: ids[max(ids)]} if ids else {}, {}, {}, {}]

    op__embedding_bag = op_embedding_bag

    # -- data movement --------------------------------------------------------------------------------------
    def op_getitem(self, node) -> TensorIds:
        value = self.env.get(node.args[0].name)
        if isinstance(value, list) and isinstance(node.args[1], int) and node.args[1] < len(value):
            return value[node.args[1]]
        if isinstance(value, dict) and node.args[1] == 0:  # e.g. a traced max_pool2d(return_indices=True)
            return value
        return {}

    def elementwise(self, node) -> TensorIds:
        out_shape = _shape(node)
        if out_shape is None:
            return {}
        out: TensorIds = {}
        operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
        for d, size in enumerate(out_shape):
            tracked, fixed, params = [], [], []
            for arg in operands:
                shape = _shape(arg)
                if shape is None:
                    continue
                dim = d - (len(out_shape) - len(shape))
                if dim < 0 or shape[dim] != size or size == 1:
                    continue
                ids = self.ids(arg).get(dim)
                if ids is not None:
                    tracked.append(ids)
                elif self.param(arg):
                    params.append((self.param(arg), dim))
                else:
                    fixed.append(arg.name)
            if not tracked:
                continue
            for other in tracked[1:]:
                self.graph.uf.union(tracked[0], other)
            for name, dim in params:
                self.graph.use(name, dim, tracked[0])
            if fixed:
                self.graph.block(tracked[0], f"combined with {fixed[0]}, whose channels cannot change",
                                 self.layer_of(node))
            out[d] = tracked[0]
        return out

    def spatial(self, node) -> Any:
        x_ids = self.ids(node.args[0])
        for d, ids in x_ids.items():
            if d != 1:
                self.graph.block(ids, f"{_op_name(node)} over a channel dimension", self.layer_of(node))
        out = {1: x_ids[1]} if 1 in x_ids else {}
        return [out, {}] if _op_name(node).endswith("with_indices") else out

    def reduce(self, node) -> TensorIds:
        x_ids, ndim = self.ids(node.args[0]), len(_shape(node.args[0]))
        dims = _arg(node, 1, "dim", None)
        dims = [dims] if isinstance(dims, int) else list(dims or range(ndim))
        dims = sorted(d % ndim for d in dims)
        keepdim = _arg(node, 2, "keepdim", False) is True
        out = {}
        for d, ids in x_ids.items():
            if d in dims:
                self.graph.block(ids, f"{_op_name(node)} across channels", self.layer_of(node))
            else:
                out[d if keepdim else d - sum(r < d for r in dims)] = ids
        return out

    def reshape(self, node) -> TensorIds:
        x_ids = self.ids(node.args[0])
        if not x_ids:
            return {}
        before, after = list(_shape(node.args[0])), list(_shape(node))
        out: TensorIds = {}
        for (a0, a1), (b0, b1) in _dim_groups(before, after):
            tracked = [d for d in range(a0, a1) if d in x_ids]
            if not tracked:
                continue
            if a1 - a0 == 1 and b1 - b0 == 1:
                out[b0] = x_ids[a0]
                if _op_name(node) != "flatten" and after[b0] > 1:
                    self.graph.literal_reshapes.append((x_ids[a0], self.layer_of(node)))
            elif b1 - b0 == 1 and len(tracked) == 1:
                # Several dims merge into one: each channel's id repeats over the positions it expands to.
                d = tracked[0]
                grid = np.broadcast_to(x_ids[d].reshape([-1 if i == d else 1 for i in range(a0, a1)]),
                                       before[a0:a1])
                out[b0] = np.ascontiguousarray(grid).reshape(-1)
                if _op_name(node) != "flatten":
                    self.graph.literal_reshapes.append((x_ids[d], self.layer_of(node)))
            elif a1 - a0 == 1 and b1 - b0 > 1:
                # One dim splits into several, e.g. (B, T, H*D) -> (B, T, H, D): each block of the trailing dims
                # (a head) becomes one channel class, carried by the leading output dim.
                blocks = x_ids[a0].reshape(after[b0], -1)
                for column in range(1, blocks.shape[1]):
                    self.graph.uf.union(blocks[:, 0], blocks[:, column])
                out[b0] = blocks[:, 0].copy()
                self.graph.literal_reshapes.append((x_ids[a0], self.layer_of(node)))
            else:
                for d in tracked:
                    self.graph.block(x_ids[d], "reshape that mixes channels across dimensions", self.layer_of(node))
        return out

    def op_permute(self, node) -> TensorIds:
        x_ids, order = self.ids(node.args[0]), list(node.args[1])
        ndim = len(order)
        return {new: x_ids[old % ndim] for new, old in enumerate(order) if old % ndim in x_ids}

    def op_transpose(self, node) -> TensorIds:
        x_ids, ndim = self.ids(node.args[0]), len(_shape(node.args[0]))
        a, b = _arg(node, 1, "dim0") % ndim, _arg(node, 2, "dim1") % ndim
        swap = {a: b, b: a}
        return {swap.get(d, d): ids for d, ids in x_ids.items()}

    def op_t(self, node) -> TensorIds:
        x_ids = self.ids(node.args[0])
        return {1 - d: ids for d, ids in x_ids.items()}

    def op_T(self, node) -> TensorIds:
        x_ids, ndim = self.ids(node.args[0]), len(_shape(node.args[0]))
        return {ndim - 1 - d: ids for d, ids in x_ids.items()}

    def op_mT(self, node) -> TensorIds:
        x_ids, ndim = self.ids(node.args[0]), len(_shape(node.args[0]))
        swap = {ndim - 1: ndim - 2, ndim - 2: ndim - 1}
        return {swap.get(d, d): ids for d, ids in x_ids.items()}

    def op_unsqueeze(self, node) -> TensorIds:
        x_ids, ndim = self.ids(node.args[0]), len(_shape(node))
        at = _arg(node, 1, "dim") % ndim
        return {d + (d >= at): ids for d, ids in x_ids.items()}

    def op_squeeze(self, node) -> TensorIds:
        before, after = _shape(node.args[0]), _shape(node)
        x_ids = self.ids(node.args[0])
        removed = [d for d, s in enumerate(before) if s == 1 and len(after) < len(before)]
        if len(node.args) > 1:
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
            removed = [d % len(before) for d in dims if before[d % len(before)] == 1]
        return {d - sum(r < d for r in removed): ids for d, ids in x_ids.items() if d not in removed}

    def op_cat(self, node) -> TensorIds:
        ndim = len(_shape(node))
        # Legacy cat accepts 1-D empty tensors beside n-D ones (e.g. an empty cache): they add nothing.
        tensors = [a for a in node.args[0] if _shape(a) is not None and len(_shape(a)) == ndim]
        dim = _arg(node, 1, "dim", 0) % ndim
        pieces = []
        for arg in tensors:
            ids = self.ids(arg).get(dim)
            if ids is None:
                ids = self.graph.uf.new(_shape(arg)[dim])
                self.graph.block(ids, f"concatenated with {arg.name}, whose channels cannot change")
            pieces.append(ids)
        out = {dim: np.concatenate(pieces)} if any(self.ids(a).get(dim) is not None for a in tensors) else {}
        for d in range(len(_shape(node))):
            if d == dim:
                continue
            tracked = [self.ids(a)[d] for a in tensors if d in self.ids(a)]
            if not tracked:
                continue
            for other in tracked[1:]:
                self.graph.uf.union(tracked[0], other)
            for arg in tensors:
                if d not in self.ids(arg) and _shape(arg)[d] > 1:
                    if self.param(arg):
                        self.graph.use(self.param(arg), d, tracked[0])
                    else:  # e.g. a class token expanded from a parameter: its width is fixed
                        self.graph.block(tracked[0], f"concatenated with {arg.name}, whose width cannot change",
                                         self.layer_of(node))
            out[d] = tracked[0]
        return out

    def op_chunk(self, node) -> list:
        x_ids, shape = self.ids(node.args[0]), _shape(node.args[0])
        chunks = _arg(node, 1, "chunks")
        dim = _arg(node, 2, "dim", 0) % len(shape)
        return self._split(node, x_ids, shape, dim, chunks)

    def op_split(self, node) -> list:
        x_ids, shape = self.ids(node.args[0]), _shape(node.args[0])
        dim = _arg(node, 2, "dim", 0) % len(shape)
        size = _arg(node, 1, "split_size", None) or _arg(node, 1, "split_size_or_sections")
        if isinstance(size, (list, tuple)):
            return self._split(node, x_ids, shape, dim, len(size), sizes=list(size))
        if dim in x_ids:  # the piece size is a number in the model's code: fine only if it is computed
            self.graph.literal_reshapes.append((x_ids[dim], self.layer_of(node)))
        return self._split(node, x_ids, shape, dim, -(-shape[dim] // size))

    def op_split_with_sizes(self, node) -> list:
        x_ids, shape = self.ids(node.args[0]), _shape(node.args[0])
        dim = _arg(node, 2, "dim", 0) % len(shape)
        return self._split(node, x_ids, shape, dim, len(node.args[1]), sizes=list(node.args[1]))

    def _split(self, node, x_ids: TensorIds, shape, dim: int, count: int, sizes: list[int] | None = None) -> list:
        rest = {d: ids for d, ids in x_ids.items() if d != dim}
        if dim not in x_ids:
            return [dict(rest) for _ in range(count)]
        ids = x_ids[dim]
        equal = shape[dim] % count == 0 and (sizes is None or len(set(sizes)) == 1)
        if not equal or sizes is not None:
            # Fixed sizes in the model's code would no longer match once channels go.
            self.graph.block(ids, "split into fixed sizes: its sizes are written in the model's code",
                             self.layer_of(node))
            bounds = np.cumsum([0] + (sizes or [shape[dim] // count] * count))
            return [{**rest, dim: ids[a:b]} for a, b in zip(bounds[:-1], bounds[1:])]
        # Equal chunks stay equal only if every chunk loses the same positions: unite them position by position.
        pieces = np.split(ids, count)
        for piece in pieces[1:]:
            self.graph.uf.union(pieces[0], piece)
        return [{**rest, dim: piece} for piece in pieces]

    def op_unbind(self, node) -> list:
        x_ids, shape = self.ids(node.args[0]), _shape(node.args[0])
        dim = _arg(node, 1, "dim", 0) % len(shape)
        self.graph.block(x_ids.get(dim), "unbind over channels", self.layer_of(node))
        return [{d - (d > dim): ids for d, ids in x_ids.items() if d != dim} for _ in range(shape[dim])]

    def op_slice(self, node) -> TensorIds:
        x_ids, shape = self.ids(node.args[0]), _shape(node.args[0])
        dim = _arg(node, 1, "dim", 0) % len(shape)
        out = dict(x_ids)
        if dim in x_ids:
            if _shape(node)[dim] == shape[dim]:
                return out  # a full slice (x[:, :]) changes nothing
            self.graph.block(x_ids[dim], "slice of channels: its bounds are written in the model's code",
                             self.layer_of(node))
            out.pop(dim)
        return out

    def op_select(self, node) -> TensorIds:
        x_ids, ndim = self.ids(node.args[0]), len(_shape(node.args[0]))
        dim = node.args[1] % ndim
        self.graph.block(x_ids.get(dim), "indexing into channels", self.layer_of(node))
        return {d - (d > dim): ids for d, ids in x_ids.items() if d != dim}

    def op_subscript(self, node) -> TensorIds:
        """``x[index]`` in a traced graph: basic indexing by ints, slices, None and Ellipsis."""
        x_ids, shape, out_shape = self.ids(node.args[0]), _shape(node.args[0]), _shape(node)
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) or isinstance(i, bool) for i in index):
            self.block_all(node, "indexing with tensors or lists")
            return {}
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: list = []
        for i in index:
            expanded += [slice(None)] * (len(shape) - consumed) if i is Ellipsis else [i]
        expanded += [slice(None)] * (len(shape) - sum(1 for i in expanded if i is not None))
        out: TensorIds = {}
        d_in = d_out = 0
        for i in expanded:
            if i is None:
                d_out += 1
                continue
            ids = x_ids.get(d_in)
            if isinstance(i, int):
                self.graph.block(ids, "indexing into channels", self.layer_of(node))
            else:
                if out_shape[d_out] == shape[d_in] and i.step in (None, 1):
                    if ids is not None:
                        out[d_out] = ids
                else:
                    self.graph.block(ids, "slice of channels: its bounds are written in the model's code",
                                     self.layer_of(node))
                d_out += 1
            d_in += 1
        return out

    def op_setitem(self, node) -> TensorIds:
        self.block_all(node, "assignment into a tensor (x[...] = ...): its channels stay")
        return {}

    def op_softmax(self, node) -> TensorIds:
        x_ids, ndim = self.ids(node.args[0]), len(_shape(node.args[0]))
        dim = _arg(node, 1, "dim") % ndim
        self.graph.block(x_ids.get(dim), "softmax across channels", self.layer_of(node))
        return dict(x_ids)

    op__softmax = op_log_softmax = op__log_softmax = op_softmax

    def _batched_product(self, node, left, right, out_shape) -> TensorIds:
        """(..., M, K) @ (..., K, N): batch dims are united like an element-wise op, K is contracted (its
        channels stay), M comes from the left operand and N from the right."""
        out: TensorIds = {}
        n_out = len(out_shape)
        for arg, row in ((left, True), (right, False)):
            shape, ids = _shape(arg), self.ids(arg)
            for d, vector in ids.items():
                from_end = len(shape) - d
                if from_end > 2:  # a batch dim
                    position = n_out - from_end
                    if position in out:
                        self.graph.uf.union(out[position], vector)
                    else:
                        out[position] = vector
                elif (from_end == 2) == row:  # M of the left operand, N of the right one
                    out[n_out - from_end] = vector
                else:
                    self.graph.block(vector, "contracted by a matmul of activations", self.layer_of(node))
        return out

    def op_matmul(self, node) -> TensorIds:
        left, right = node.args[0], node.args[1]
        if len(_shape(left)) < 2 or len(_shape(right)) < 2:
            self.block_all(node, "matmul with a vector operand")
            return {}
        return self._batched_product(node, left, right, _shape(node))

    op_bmm = op_mm = op_matmul

    def op_addmm(self, node) -> TensorIds:
        """bias + x @ W with W a parameter of shape (in, out): a Linear stored transposed (e.g. GPT-2's Conv1D)."""
        bias, x, weight = node.args[:3]
        self.graph.block(self.ids(x).get(0), "addmm over tracked rows", self.layer_of(node))
        fits = _shape(bias) and _shape(weight) and _shape(bias)[-1] == _shape(weight)[1]
        out = self._dense(node, weight, bias if fits else None, self.ids(x).get(1), 1, "linear-transposed")
        return {} if out is None else {1: out}

    def op_multi_head_attention_forward(self, node) -> list:
        from torchslim.graph.attention import multi_head_attention

        return multi_head_attention(self, node)

    def op_lstm(self, node) -> list:
        from torchslim.graph.recurrent import recurrent

        return recurrent(self, node, _op_name(node))

    op_gru = op_rnn_tanh = op_rnn_relu = op_lstm

    def op_scaled_dot_product_attention(self, node) -> TensorIds:
        q, k, v = node.args[:3]
        q_ids, k_ids, v_ids = self.ids(q), self.ids(k), self.ids(v)
        ndim = len(_shape(q))
        out: TensorIds = {}
        for d in range(ndim - 2):  # batch and head dims: q, k and v pair up head by head
            vectors = [ids[d] for ids in (q_ids, k_ids, v_ids) if d in ids]
            for other in vectors[1:]:
                self.graph.uf.union(vectors[0], other)
            if vectors:
                out[d] = vectors[0]
        for ids in (q_ids, k_ids):
            self.graph.block(ids.get(ndim - 1), "attention feature dim (within a head)", self.layer_of(node))
        self.graph.block(k_ids.get(ndim - 2), "attention key positions", self.layer_of(node))
        self.graph.block(v_ids.get(ndim - 2), "attention value positions", self.layer_of(node))
        if ndim - 2 in q_ids:
            out[ndim - 2] = q_ids[ndim - 2]
        if ndim - 1 in v_ids:
            out[ndim - 1] = v_ids[ndim - 1]
        if node.kwargs.get("enable_gqa") or any(a is True for a in node.args[6:7]):
            for d in list(out):
                if d < ndim - 2:
                    self.graph.block(out[d], "grouped-query attention expanded inside the kernel",
                                     self.layer_of(node))
        return out

    def op_expand(self, node) -> TensorIds:
        x_ids, before, after = self.ids(node.args[0]), _shape(node.args[0]), _shape(node)
        shift = len(after) - len(before)
        return {d + shift: ids for d, ids in x_ids.items() if before[d] == after[d + shift]}


def _unused_state(node) -> bool:
    """A recurrent layer's final states, discarded by the caller (``y, _ = self.lstm(x)``): free to shrink."""
    source = node.args[0] if node.target is operator.getitem and node.args else None
    return isinstance(source, torch.fx.Node) and _op_name(source) in ("lstm", "gru", "rnn_tanh", "rnn_relu")


def _dim_groups(before: list[int], after: list[int]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pair runs of input and output dimensions whose sizes multiply to the same product (a reshape's blocks)."""
    groups, i, j = [], 0, 0
    while i < len(before) and j < len(after):
        a0, b0 = i, j
        pa, pb = before[i], after[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa *= before[i]
                i += 1
            else:
                pb *= after[j]
                j += 1
        while i < len(before) and before[i] == 1 and (j >= len(after) or after[j] != 1):
            i += 1
        while j < len(after) and after[j] == 1 and (i >= len(before) or before[i] != 1):
            j += 1
        groups.append(((a0, i), (b0, j)))
    return groups


def analyse_channels(program: torch.export.ExportedProgram, recurrent: bool = False, model=None) -> ChannelGraph:
    """Run the channel analysis on a captured program; ``recurrent``: prune recurrent layers' hidden sizes;
    ``model``: the captured model, whose integer attributes may size the tensors its code creates (without it,
    those tensors keep what they meet)."""
    return ChannelAnalysis(program, recurrent, model).run()
