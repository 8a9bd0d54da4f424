"""The proxy pass on the tiny model: every option scored without training, the cost model's ratios, int8 and
its float-layer options measured on ONNX Runtime."""

from __future__ import annotations

import pytest
import torch

from torchslim.data.config import CalibrationConfig
from torchslim.recipe import parse_recipe
from torchslim.search.allocation import Predictor
from torchslim.search.config import SpaceConfig
from torchslim.search.sensitivity import SensitivityPass, add_float_decisions, output_loss, output_sqnr
from torchslim.search.space import build_space
from torchslim.search.trial import TrialRunner


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    recipe = parse_recipe({"model": "builtin:tiny-test-cnn", "data": "builtin:digits",
                           "measure": {"batch_size": 16, "max_eval_samples": 64}})
    runner = TrialRunner(recipe, tmp_path_factory.mktemp("sensitivity"), repeats=2)
    space = build_space(runner.bundle, runner.data, SpaceConfig(ratios=[0.0, 0.5], precision=["float", "int8-static"],
                                                                round_to=1), "auto")
    result = SensitivityPass(runner, space, CalibrationConfig(samples=32), float_layers=1, log=lambda message: None).run()
    return runner, space, result


def test_pruning_options_are_scored_and_shrink_the_layers_on_both_sides(measured):
    _, _, result = measured
    entry = result["options"]["prune:conv1"]["0.5"]
    assert entry["loss"] > 0 and entry["sqnr"] < 120
    # conv1 loses half its outputs (0.5), conv2 half its inputs and outputs (0.25), fc half its inputs.
    assert entry["scale"]["conv1"] == pytest.approx(0.5) and entry["scale"]["conv2"] == pytest.approx(0.25)
    assert entry["scale"]["fc"] == pytest.approx(0.5)
    assert result["samples"] == 32 and result["split"] == "calib" and result["total_ms"] > 0


def test_int8_and_its_float_layer_options_are_measured_on_their_runtime(measured):
    _, space, result = measured
    int8 = result["precision"]["int8-static"]
    assert 0 < int8["size_ratio"] < 0.6 and int8["latency_ratio"] > 0 and int8["sqnr"] > 5
    (layer, entry), = result["float_layers"].items()
    assert layer in ("conv1", "conv2", "fc") and "db" in entry and entry["loss"] >= 0 and entry["size_ratio"] > 0
    add_float_decisions(space, result)
    assert space.names("float") == [f"float:{layer}"]
    predictor = Predictor(space, result)
    plan = space.complete({"prune:conv1": 0.5, "precision": "int8-static", f"float:{layer}": False})
    assert predictor.predict(plan)["size"] < predictor.predict({"prune:conv1": 0.5, "precision": "float"})["size"]


def test_output_loss_and_sqnr():
    reference = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert output_loss("classification", reference, reference) == pytest.approx(0.0, abs=1e-7)
    assert output_loss("embedding", -reference, reference) == pytest.approx(2.0)
    assert output_sqnr(reference * 1.1, reference) == pytest.approx(20.0)
    assert output_sqnr(reference, reference) == 120.0
