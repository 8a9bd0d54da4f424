"""Dependency groups: the producers that share channel classes (every layer writing into one residual stream,
a block's hidden width) are cut together; a group answers to any of its layer names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from torch import nn

from torchslim.core.modules import matches
from torchslim.graph import ChannelGraph, analyse_channels, capture


@dataclass
class Group:
    roots: np.ndarray  # prunable channel classes of this group
    size: int  # every channel class of the group, prunable or not
    modules: list[str]


def dependency_groups(graph: ChannelGraph, skip: list[str]) -> list[Group]:
    """Producers that share channel classes form one group (e.g. every conv writing into a residual stream)."""
    blocked = set(graph.blocked_roots())
    owner: dict[int, int] = {}
    parent = list(range(len(graph.producers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    roots_of = []
    for index, (_, ids) in enumerate(graph.producers):
        roots = set(graph.uf.roots(ids).tolist())
        roots_of.append(roots)
        for r in roots:
            if r in owner:
                parent[find(index)] = find(owner[r])
            else:
                owner[r] = index
    merged: dict[int, list[int]] = {}
    for index in range(len(graph.producers)):
        merged.setdefault(find(index), []).append(index)
    groups = []
    for members in merged.values():
        modules = [graph.producers[i][0] for i in members]
        roots = set().union(*(roots_of[i] for i in members))
        excluded = any(matches(m, skip) for m in modules)
        if excluded:
            for m in modules:
                graph.skipped.setdefault(m, "excluded by the config (skip)")
            continue
        prunable = np.array(sorted(r for r in roots if r not in blocked), dtype=np.int64)
        if len(prunable):
            groups.append(Group(prunable, len(roots), modules))
    return groups


def channel_groups(model: nn.Module, example_inputs: Any, how: str = "auto",
                   skip: Sequence[str] = ()) -> list[tuple[list[str], int, int]]:
    """The dependency groups structured pruning cuts together, as ``(layers creating the group's channels,
    prunable channels, all channels)``; a group answers to any of its layer names in `ChannelPruningConfig.ratios`."""
    graph = analyse_channels(capture(model, example_inputs, how), model=model)
    return [(list(g.modules), len(g.roots), g.size) for g in dependency_groups(graph, list(skip))]
