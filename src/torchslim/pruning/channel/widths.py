"""Latency-aware widths (``round_to: auto``): each group keeps the channel count, near the one its ratio asks
for, that the CPU's kernels run fastest, looked up in a table of measured single-layer latencies
(`torchslim.measure.layer_latency`, NetAdapt-style), so that MACs removed turn into time removed.

For a group whose ratio asks to keep ``w`` of its ``n`` channels, the candidates are ``w`` itself and the
multiples of 8, 16, 32 and 64 nearest it (below and above), those within ``BAND`` (12%) of it or the nearest
multiples of 8 (a group of few positions, such as a grouped convolution's width per group, moves in coarse
steps), never above ``n`` nor below what ``max_ratio`` allows. A candidate
costs the summed table latency of every convolution and linear layer whose shape the group's width sets
(the layers creating its channels and the layers reading them, each at its real input size from one forward of
the example inputs; the layer's other channel count stays as it is). A group's candidates are compared by
timings of one session where it matters: when one is new, those whose table entries are provisional (all of
them, on a busy machine) are timed again with it, in rotated interleaved rounds (`LatencyTable.latencies` with
``together``). The group keeps the candidate with the
**least latency per kept channel** (cost / width): ``w`` itself unless another candidate beats it by more than
``TOLERANCE`` (5%), else the widest candidate within ``TOLERANCE`` of the best. A width the kernels process in
whole blocks (61 channels costing what 64 do) gives way to the block's full width, or to the width below whose
cost drops by more than its channels; where latency follows the channel count, ``w`` stays.

Under a MACs target the choices move many groups by whole steps at one ratio (44 grouped-convolution blocks
of RegNetX went from 16 to 8 channels per group together, leaving 0.29 of the MACs for a target of 0.5), so
after the bisection `select.fill_to_target` grows groups back one step at a time (`LatencyWidths.growth`: to
the next multiple of 8, 16, 32 or 64), the growth adding the least table latency per MAC first, while the
target holds. With ``reallocate: r`` the fill starts ``r`` deeper than the bisection's ratio, so it moves MACs
from the groups whose layers are slow per MAC (1x1 convolutions on large feature maps, bound by memory) to
those that are fast, at the same MACs.

Why per channel, not the cheapest: nearly every layer gets faster as it narrows, so "the cheapest candidate"
would be the narrowest one of every group, pruning deeper everywhere rather than where the kernels reward it;
a layer whose time is mostly fixed overhead (a small layer at batch 1) costs little more with more channels and
keeps them, and a MACs or latency target then takes the difference where channels cost time. Why 5%: on a
shared 2-core machine two tables of the same shapes, built minutes apart, differed by up to 10% in a group's
cost per channel, while the kernel effects worth acting on are larger (a 3x3 depthwise convolution at 56x56,
batch 1, one thread: 0.3 ms with 96 channels, 1.1 ms with 98).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.core.modules import call_model, is_depthwise
from torchslim.graph import ChannelGraph
from torchslim.measure.layer_latency import LatencyTable, LayerShape
from torchslim.pruning.channel.groups import Group

BAND = 0.12  # candidates lie within this fraction of the width the ratio asks for
TOLERANCE = 0.05  # latency per channel this close to the best counts as equal (above the table's noise)
STEPS = (8, 16, 32, 64)  # candidates: the multiples of each nearest the exact width


def candidate_widths(exact: int, lowest: int, highest: int) -> list[int]:
    """The widths tried for a group whose ratio asks for ``exact``: itself and, for each of `STEPS`, the
    multiples of it just below and just above ``exact``, those within ``[lowest, highest]``."""
    found = {exact}
    for step in STEPS:
        found.update({exact // step * step, -(-exact // step) * step})
    return sorted(w for w in found if lowest <= w <= highest and w > 0)


def layer_inputs(model: nn.Module, example_inputs: Any) -> dict[str, tuple[int, ...]]:
    """The input shape of every convolution and linear layer the table can time, from one forward of
    ``example_inputs`` (a layer called several times: its first call)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if LayerShape.handles(module):
            def record(_, args, name=name):
                if args and isinstance(args[0], torch.Tensor):
                    shapes.setdefault(name, tuple(args[0].shape))
            handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            call_model(model.eval(), example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def predicted_latency(model: nn.Module, inputs: dict[str, tuple[int, ...]], table: LatencyTable) -> float:
    """The sum of the table's latencies of ``model``'s convolution and linear layers at their current shapes
    (milliseconds; what the other operations cost is not in it)."""
    shapes = [LayerShape.of(model.get_submodule(name), shape) for name, shape in inputs.items()]
    return float(sum(table.latencies([s for s in shapes if s is not None])))


@dataclass
class WidthChoice:
    """One group's width: its channels, the count its ratio asks to keep, the count kept, and the summed
    table latency (ms) of the layers it shapes at each."""

    channels: int
    exact: int
    chosen: int
    exact_ms: float
    chosen_ms: float

    def as_dict(self) -> dict:
        """Plain JSON values: milliseconds rounded, None where a layer could not take the width."""
        return {k: (round(v, 4) if math.isfinite(v) else None) if isinstance(v, float) else v
                for k, v in asdict(self).items()}


@dataclass
class _Side:
    """One channel dimension of a layer: the channel class of each position along its weight dimension, and
    the channels each position stands for (a grouped convolution's weight holds one group's inputs)."""

    roots: np.ndarray
    multiplier: int


class LatencyWidths:
    """Chooses each group's kept width from a `LatencyTable` (see the module docstring).

    Args:
        model: the model being pruned (unchanged by this object).
        graph: its channel analysis.
        scores: channel class -> importance; a group's candidates remove its lowest-scoring classes first.
        inputs: `layer_inputs` of the model.
        table: the latency table.

    Attributes:
        choices: group (its first layer's name) -> `WidthChoice`, from the latest selection.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, scores: dict[int, float],
                 inputs: dict[str, tuple[int, ...]], table: LatencyTable, tolerance: float = TOLERANCE,
                 band: float = BAND):
        self.table, self.scores, self.tolerance, self.band = table, scores, tolerance, band
        self.inputs = inputs
        self.layers: list[tuple[str, nn.Module, dict[str, _Side]]] = []
        for name, kind in graph.modules.items():
            if kind not in ("conv", "linear") or name not in inputs:
                continue
            module = model.get_submodule(name)
            sides = {}
            for side, (dim, multiplier) in _weight_sides(module).items():
                ids = graph.param_ids.get((f"{name}.weight", dim))
                if ids is not None:
                    sides[side] = _Side(graph.uf.roots(ids), multiplier)
            if sides:
                self.layers.append((name, module, sides))
        self.choices: dict[str, WidthChoice] = {}
        self.grown: dict[str, int] = {}  # group -> width set by `select.fill_to_target` (overrides the choice)
        self._costs: dict[tuple[str, int], float] = {}
        self._macs: dict[tuple[str, int], int] = {}
        self._affected: dict[str, list[int]] = {}

    def removal(self, group: Group, exact: int, most: int) -> int:
        """How many channels ``group`` loses: ``exact`` is what its ratio asks, ``most`` the most it may."""
        name, size = group.modules[0], group.size
        width = size - exact
        if name in self.grown:
            chosen = self.grown[name]
            costs = self._cost(group, sorted({width, chosen})) if exact > 0 else {width: 0.0, chosen: 0.0}
            self.choices[name] = WidthChoice(size, width, chosen, costs[width], costs[chosen])
            return size - chosen
        if exact <= 0 or not self._layers_of(group):
            self.choices[name] = WidthChoice(size, width, width, 0.0, 0.0)
            return max(exact, 0)
        step = STEPS[0]
        low = max(size - most, min(math.ceil(width * (1 - self.band)), width // step * step), 1)
        high = min(size, max(math.floor(width * (1 + self.band)), -(-width // step) * step))
        candidates = candidate_widths(width, low, high)
        costs = self._cost(group, candidates)
        per_channel = {w: costs[w] / w for w in candidates}
        best = min(per_channel.values())
        chosen = width
        if math.isfinite(best) and per_channel[width] > best * (1 + self.tolerance):
            chosen = max(w for w in candidates if per_channel[w] <= best * (1 + self.tolerance))
        self.choices[name] = WidthChoice(size, width, chosen, costs[width], costs[chosen])
        return size - chosen

    def growth(self, group: Group, width: int, most: int | None = None) -> tuple[int, float] | None:
        """The group's best next width up from ``width``: of the next multiples of 8, 16, 32 and 64 and all its
        channels (those up to ``most``), the one adding the least table latency per MAC it adds (negative
        where the wider layers run faster: a width the kernels process in whole blocks), with that figure;
        None when there is none or no layer can take them."""
        most = group.size if most is None else min(most, group.size)
        wider = sorted(w for w in {*((width // step + 1) * step for step in STEPS), group.size}
                       if width < w <= most)
        if not wider or not self._layers_of(group):
            return None
        costs = self._cost(group, [width, *wider])
        name, options = group.modules[0], []
        for w in wider:
            if math.isfinite(costs[w]) and math.isfinite(costs[width]):
                added = self._macs[name, w] - self._macs[name, width]
                options.append(((costs[w] - costs[width]) / max(added, 1), w))
        if not options:
            return None
        per_mac, best = min(options)
        return best, per_mac

    def _layers_of(self, group: Group) -> list[int]:
        """The layers (indices into ``self.layers``) with a channel dimension the group's width sets."""
        name = group.modules[0]
        if name not in self._affected:
            mine = group.roots
            self._affected[name] = [i for i, (_, _, sides) in enumerate(self.layers)
                                    if any(np.isin(s.roots, mine).any() for s in sides.values())]
        return self._affected[name]

    def _cost(self, group: Group, widths: list[int]) -> dict[int, float]:
        """The summed table latency of the group's layers at each kept width (inf where a layer cannot take
        it). When any candidate is new to this group, all of them are looked up in one call (``together``):
        a session that must time a new shape times the candidates' provisional shapes (all of them, on a busy
        machine) in the same interleaved rounds."""
        name = group.modules[0]
        if all((name, w) in self._costs for w in widths):
            return {w: self._costs[name, w] for w in widths}
        order = np.array(sorted(group.roots.tolist(), key=lambda r: self.scores.get(r, 0.0)), dtype=np.int64)
        shapes: dict[int, list[LayerShape] | None] = {}
        for width in widths:
            removed = order[: group.size - width]
            layer_shapes = []
            for index in self._layers_of(group):
                layer, module, sides = self.layers[index]
                kept = {side: int((~np.isin(s.roots, removed)).sum()) * s.multiplier for side, s in sides.items()}
                shape = LayerShape.of(module, self.inputs[layer], kept.get("in"), kept.get("out"))
                if shape is None:
                    layer_shapes = None
                    break
                layer_shapes.append(shape)
            shapes[width] = layer_shapes
        flat = [s for layer_shapes in shapes.values() if layer_shapes for s in layer_shapes]
        times = dict(zip([s.key() for s in flat], self.table.latencies(flat, together=True)))
        for width, layer_shapes in shapes.items():
            self._costs[name, width] = math.inf if layer_shapes is None else sum(times[s.key()] for s in layer_shapes)
            self._macs[name, width] = sum(shape_macs(s) for s in layer_shapes or [])
        return {w: self._costs[name, w] for w in widths}


def shape_macs(shape: LayerShape) -> int:
    """Multiply-accumulates of one layer shape at its input size (a convolution's output size from its
    stride, padding and dilation; transposed: per input position)."""
    batch_and_positions = math.prod(shape.input_shape[:-1])
    if shape.kind == "linear":
        return batch_and_positions * shape.in_channels * shape.out_channels
    options = dict(shape.options)
    kernel, dims = options["kernel_size"], len(options["kernel_size"])
    spatial, batch = shape.input_shape[-dims:], math.prod(shape.input_shape[:-dims - 1])
    per_position = shape.in_channels * shape.out_channels // options["groups"] * math.prod(kernel)
    if options["transposed"] or isinstance(options["padding"], str):  # "same" keeps the size; "valid" near it
        return batch * math.prod(spatial) * per_position
    out = [(size + 2 * pad - dil * (k - 1) - 1) // stride + 1 for size, k, stride, pad, dil
           in zip(spatial, kernel, options["stride"], options["padding"], options["dilation"])]
    return batch * math.prod(out) * per_position


def _weight_sides(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Which weight dimension holds a layer's input and output channels, and how many channels one position
    along it stands for: {"in": (dim, multiplier), "out": (dim, multiplier)}. A depthwise convolution's input
    follows its output (`LayerShape.of` keeps it depthwise)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if is_depthwise(module):
            return {"out": (0, 1)} if not module.transposed else {"in": (0, 1)}
        if module.transposed:  # weight (in, out / groups, ...)
            return {"in": (0, 1), "out": (1, module.groups)}
        return {"out": (0, 1), "in": (1, module.groups)}  # weight (out, in / groups, ...)
    if isinstance(module, nn.Linear):
        return {"out": (0, 1), "in": (1, 1)}
    return {"in": (0, 1), "out": (1, 1)}  # transformers' Conv1D: weight (in, out)
