"""Selection: which channel classes go, for a ratio, under the config's scope, limits and widths; and the
bisection that finds the ratio meeting a MACs or latency target."""

from __future__ import annotations

import copy

import numpy as np
from torch import nn

from torchslim.core.modules import matches
from torchslim.graph import ChannelGraph
from torchslim.pruning.channel.config import ChannelPruningConfig
from torchslim.pruning.channel.groups import Group, dependency_groups
from torchslim.pruning.channel.importance import score
from torchslim.pruning.channel.surgery import remove_channels
from torchslim.pruning.channel.widths import LatencyWidths

AROUND = 0.08  # how far from the exact-width ratio `bisect_ratio` looks with latency-aware widths


def _removal(group: Group, fraction: float, config: ChannelPruningConfig, widths: LatencyWidths | None) -> int:
    """How many channels a group loses for ``fraction`` under the config's ``round_to`` (the latency table's
    choice with "auto")."""
    if config.rounding != "auto":
        return _removable(group, fraction, config.rounding)
    if widths is None:
        raise ValueError("round_to: auto chooses widths from a latency table: pass widths=LatencyWidths(...) "
                         "(torchslim.prune builds one)")
    return widths.removal(group, _removable(group, fraction, 1), _removable(group, config.max_ratio, 1))


def _removable(group: Group, fraction: float, round_to: int) -> int:
    """How many channels a group loses for ``fraction``, keeping a multiple of ``round_to`` (and at least one)."""
    keep = group.size - round(fraction * group.size)
    keep = max(round_to, -(-keep // round_to) * round_to) if round_to > 1 else max(1, keep)
    return max(0, min(len(group.roots), group.size - keep))


def _lowest(group: Group, scores: dict[int, float], count: int) -> list[int]:
    return sorted(group.roots.tolist(), key=lambda r: scores.get(r, 0.0))[:count]


def _group_ratio(group: Group, ratios: dict[str, float], default: float) -> float:
    """The ratio of the first pattern in ``ratios`` that matches one of the group's layers, else ``default``."""
    for pattern, value in ratios.items():
        if any(matches(m, [pattern]) for m in group.modules):
            return value
    return default


def select_channels(model: nn.Module, graph: ChannelGraph, config: ChannelPruningConfig, ratio: float,
                    scores: dict[int, float] | None = None, widths: LatencyWidths | None = None) -> set[int]:
    """The channel classes to remove for ``ratio`` under ``config``'s importance, scope, limits and widths.

    ``scores`` (channel class -> importance) are computed from ``model`` unless given, so that repeated
    selections on one graph (a bisection, a retry) score once. ``widths`` chooses the kept widths when
    ``round_to`` is "auto" (required then; its ``choices`` record them).
    """
    scores = scores if scores is not None else score(model, graph, config)
    groups = dependency_groups(graph, config.skip)
    chosen: set[int] = set()
    if config.scope == "local":
        for group in groups:
            fraction = min(_group_ratio(group, config.ratios, ratio), config.max_ratio)
            chosen.update(_lowest(group, scores, _removal(group, fraction, config, widths)))
        return _keep_every_layer(graph, chosen, scores)
    ranked = []
    for index, group in enumerate(groups):
        values = np.array([scores.get(r, 0.0) for r in group.roots.tolist()])
        scale = values.mean() if values.mean() > 0 else 1.0
        ranked += [(v / scale, index, r) for v, r in zip(values.tolist(), group.roots.tolist())]
    ranked.sort()
    budget = int(ratio * sum(g.size for g in groups))
    taken = [0] * len(groups)
    limit = [_removable(g, config.max_ratio, 1) for g in groups]
    for _, index, root in ranked:
        if budget <= 0:
            break
        if taken[index] < limit[index]:
            taken[index] += 1
            budget -= 1
    for index, group in enumerate(groups):
        chosen.update(_lowest(group, scores, _removal(group, taken[index] / group.size, config, widths)))
    return _keep_every_layer(graph, chosen, scores)


def fill_to_target(model: nn.Module, graph: ChannelGraph, config: ChannelPruningConfig, ratio: float,
                   scores: dict[int, float], widths: LatencyWidths, reached, limit: int = 400) -> int:
    """Grow groups back after a ``round_to: auto`` bisection landed under the target: from the widths of
    ``ratio`` (the bisection's, or deeper by the config's ``reallocate``), the group whose next step up
    (`LatencyWidths.growth`) adds the least table latency per MAC grows first, while ``reached(trial)`` holds;
    a step that breaks the target caps the group below it (a smaller step may still fit). Sets
    ``widths.grown`` (later selections keep these widths); returns how many steps were taken."""
    groups = dependency_groups(graph, config.skip)
    select_channels(model, graph, config, ratio, scores, widths)
    widths.grown = {g.modules[0]: widths.choices[g.modules[0]].chosen for g in groups
                    if g.modules[0] in widths.choices}
    closed: set[str] = set()
    cap: dict[str, int] = {}
    steps = 0
    for _ in range(limit):
        options = []
        for group in groups:
            name = group.modules[0]
            if name in closed or name not in widths.grown:
                continue
            step = widths.growth(group, widths.grown[name], cap.get(name))
            if step is None:
                closed.add(name)
            else:
                options.append((step[1], name, step[0]))
        if not options:
            break
        _, name, wider = min(options)
        before, widths.grown[name] = widths.grown[name], wider
        trial = copy.deepcopy(model)
        remove_channels(trial, graph, select_channels(trial, graph, config, ratio, scores, widths))
        if reached(trial):
            steps += 1
        else:
            widths.grown[name] = before
            cap[name] = wider - 1
    return steps


def _keep_every_layer(graph: ChannelGraph, chosen: set[int], scores: dict[int, float]) -> set[int]:
    """A class can hold every output channel of a layer (a branch concatenated into a stream that a reshape
    splits into whole blocks): keep the best-scoring class of any layer that would lose all its channels."""
    for _, ids in graph.producers:
        roots = set(graph.uf.roots(ids).tolist())
        if roots and roots <= chosen:
            chosen.discard(max(roots, key=lambda r: scores.get(r, 0.0)))
    return chosen


def bisect_ratio(model: nn.Module, graph: ChannelGraph, config: ChannelPruningConfig, scores: dict[int, float],
                 reached, widths: LatencyWidths | None = None, around: float | None = None) -> float:
    """The smallest ratio (to max_ratio / 4096) whose pruning, tried on copies, satisfies ``reached(trial)``.

    ``around``: a ratio known to be close (found with exact widths, which cost nothing to try): only
    ``AROUND`` either side of it is searched, in fewer steps, so that ``round_to: auto`` times the layer widths
    of a few ratios rather than of twelve.
    """

    def meets(ratio: float) -> bool:
        trial = copy.deepcopy(model)
        remove_channels(trial, graph, select_channels(trial, graph, config, ratio, scores, widths))
        return reached(trial)

    low, high, steps = 0.0, config.max_ratio, 12
    if around is not None:
        low, high, steps = max(0.0, around - AROUND), min(config.max_ratio, around + AROUND), 7
        if high < config.max_ratio and not meets(high):
            low, high = high, config.max_ratio
        elif low > 0.0 and meets(low):
            low, high = 0.0, low
    for _ in range(steps):
        middle = (low + high) / 2
        if meets(middle):
            high = middle
        else:
            low = middle
    return high
