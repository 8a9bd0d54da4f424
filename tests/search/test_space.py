"""The search space built from a model's dependency graph, and plans turned into runnable recipes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.data import resolve_data
from torchslim.errors import InputError
from torchslim.recipe import parse_recipe
from torchslim.search.config import SearchConfig, SpaceConfig
from torchslim.search.space import SearchSpace, build_space, layer_macs
from torchslim.zoo import resolve_model


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("builtin:tiny-test-cnn"), resolve_data("builtin:digits")


def test_tied_groups_share_one_decision_and_plans_become_recipes(tiny):
    bundle, data = tiny
    space = build_space(bundle, data, SpaceConfig(ratios=[0.0, 0.5], precision=["float", "int8-static"],
                                                  epochs=[1, 2], round_to=1), "auto")
    prune = space.names("prune")
    # conv1 and conv2 both write the residual stream y: one group, one decision (the fc output stays).
    assert prune == ["prune:conv1"] and set(space["prune:conv1"].layers) == {"conv1", "conv2"}
    assert space["precision"].options == ("float", "int8-static") and space["epochs"].options == (1, 2)
    assert space.combinations() == 2 * 2 * 2
    plan = {"prune:conv1": 0.5, "epochs": 2, "precision": "int8-static"}
    raw = space.recipe(plan, bundle.spec, data.spec, 0, {"batch_size": 32}, SearchConfig().finetune)
    recipe = parse_recipe(raw, "plan")
    assert [s.name for s in recipe.steps] == ["prune:channel", "finetune:distill", "quantize:int8-static"]
    assert recipe.steps[0].config.ratios == {"conv1": 0.5, "conv2": 0.5} and recipe.steps[1].config.epochs == 2
    neutral = space.recipe(space.neutral_plan(), bundle.spec, data.spec, 0, {}, SearchConfig().finetune)
    assert neutral["steps"] == []  # no compression: nothing to recover either
    assert SearchSpace.from_dict(space.to_dict()).decisions == space.decisions


def test_float_layer_decisions_apply_under_int8_static_only(tiny):
    bundle, data = tiny
    space = build_space(bundle, data, SpaceConfig(ratios=[0.0, 0.5], precision=["float", "int8-static"]), "auto")
    space.add_float_layers(["conv1"], {})
    assert [d.name for d in space.active({"precision": "float"})][-1] == "precision"
    assert "float:conv1" in [d.name for d in space.active({"precision": "int8-static"})]
    raw = space.recipe({"precision": "int8-static", "float:conv1": True}, bundle.spec, data.spec, 0, {},
                       SearchConfig().finetune)
    assert raw["steps"][-1]["quantize"]["skip"] == ["conv1"]


def test_options_this_model_or_runtime_cannot_use_are_left_out_with_a_reason(tiny):
    bundle, data = tiny
    space = build_space(bundle, data, SpaceConfig(precision=["float", "int8-dynamic", "int4-weight", "bf16"]),
                        "torch")
    notes = " ".join(space.notes)
    assert "precision int8-dynamic: left out (runs on ONNX Runtime" in notes
    assert "precision int4-weight: left out (quantizes Linear layers only" in notes
    from torchslim.quant.bf16 import native_bf16

    if native_bf16():  # bf16 runs convolutions too, on this CPU's AMX / AVX-512 BF16 units
        decision = next(d for d in space.decisions if d.name == "precision")
        assert decision.options == ("float", "bf16")
    else:
        assert "precision bf16: left out (this CPU has no native bfloat16" in notes
        assert "precision" not in space.names()


def test_a_space_with_nothing_to_decide_is_an_input_error(tiny):
    bundle, data = tiny
    with pytest.raises(InputError, match="search.space: nothing to search on builtin:tiny-test-cnn"):
        build_space(bundle, data, SpaceConfig(ratios=[0.0], precision=["float"]), "auto")


def test_layer_macs_counts_convolutions_and_linears():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    macs = layer_macs(model, torch.randn(1, 1, 8, 8))
    assert macs == {"0": 4 * 64 * 9, "2": 256 * 10}
