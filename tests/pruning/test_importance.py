"""Importance criteria are registered callables: the built-in names match the config's, a new one is usable by
name, and an unknown name is one clear error."""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

from torchslim._config import FieldError
from torchslim.pruning.channel import CRITERIA, ChannelPruningConfig, prune, register_importance
from torchslim.pruning.channel.importance import STATISTICS


def test_builtin_criteria_are_the_config_names():
    hints = typing.get_type_hints(ChannelPruningConfig)
    assert set(typing.get_args(hints["importance"])) <= set(CRITERIA)
    assert STATISTICS["activation"] == ("sq_norm",) and STATISTICS["l1"] == ()


def test_a_registered_criterion_decides_which_channels_go():
    # Score = channel index: the lowest-numbered channels go, whatever their weights.
    @register_importance("index-order")
    def index_order(model, graph, config, stats):
        return {int(r): float(i) for i, r in enumerate(sorted({int(x) for ids in graph.param_ids.values()
                                                                for x in graph.uf.roots(ids).tolist()}))}

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        kept_rows = model[0].weight.detach()[4:].clone()
        result = prune(model, ChannelPruningConfig(ratio=0.5, importance="index-order"), torch.randn(3, 4))
        assert model[0].out_features == 4 and result.removed_channels == {"0": 4}
        assert torch.equal(model[0].weight.detach(), kept_rows)
    finally:
        del CRITERIA["index-order"], STATISTICS["index-order"]


def test_an_unknown_criterion_is_named():
    with pytest.raises(FieldError, match="importance.*'l3' is not a registered criterion; known: .*l1"):
        ChannelPruningConfig(importance="l3")
