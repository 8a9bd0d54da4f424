"""Data-aware channel pruning: activation importance and the least-squares refit of layers that lost inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchslim._config import FieldError
from torchslim.data.config import CalibrationConfig
from torchslim.errors import InputError
from torchslim.pruning.channel import ChannelPruningConfig, prune


class MLP(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def calibration(batches: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 6, generator=generator) for _ in range(batches)]


def test_the_refit_recovers_exactly_what_kept_neurons_can_express():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():  # neurons 4..7 are half of neurons 0..3 (relu(z/2) = relu(z)/2) with smaller weights
        model.fc1.weight[4:] = model.fc1.weight[:4] / 2
        model.fc1.bias[4:] = model.fc1.bias[:4] / 2
        model.fc2.weight[:, 4:] = model.fc2.weight[:, :4] / 4
    x = torch.randn(32, 6)
    reference = model(x).detach()
    plain = copy.deepcopy(model)
    prune(plain, ChannelPruningConfig(ratio=0.5), x[:2])
    damped = copy.deepcopy(model)
    prune(damped, ChannelPruningConfig(ratio=0.5, reconstruct=True), x[:2], calibration=calibration())
    result = prune(model, ChannelPruningConfig(ratio=0.5, reconstruct=True, damping=0.0), x[:2], calibration=calibration())
    assert model.fc1.out_features == plain.fc1.out_features == 4
    assert torch.equal(model.fc1.weight, plain.fc1.weight)  # the same neurons go (l1 picks the small ones)
    assert (plain(x) - reference).abs().max() > 0.05  # without the refit their share is lost ...
    assert (model(x) - reference).abs().max() < 1e-4  # ... with it the kept columns take it over exactly
    assert (damped(x) - reference).abs().max() < 0.2 * (plain(x) - reference).abs().max()  # 1% damping: close
    assert set(result.refit_errors) == {"fc2"} and result.refit_errors["fc2"] < 1e-4


def test_a_constant_neuron_moves_into_the_bias():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[0] = 0.0
        model.fc1.bias[0] = 0.5  # always 0.5 after the relu, the lowest l1 score
    x = torch.randn(16, 6)
    reference = model(x).detach()
    prune(model, ChannelPruningConfig(ratio=1 / 8, reconstruct=True, damping=0.0), x[:2], calibration=calibration())
    assert model.fc1.out_features == 7
    assert (model(x) - reference).abs().max() < 1e-4


def test_activation_importance_removes_neurons_the_data_never_uses():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[:4] *= 10  # large weights, but a bias no input in the data overcomes: never active
        model.fc1.bias[:4] = -1000.0
        model.fc2.weight[:, :4] *= 10
    x = torch.randn(16, 6)
    reference = model(x).detach()
    by_magnitude = copy.deepcopy(model)
    prune(by_magnitude, ChannelPruningConfig(ratio=0.5), x[:2])
    assert (by_magnitude.fc1.bias == -1000.0).sum() == 4  # weight magnitude keeps the dead neurons
    prune(model, ChannelPruningConfig(ratio=0.5, importance="activation"), x[:2], calibration=calibration())
    assert (model.fc1.bias == -1000.0).sum() == 0  # activation importance removes them
    assert (model(x) - reference).abs().max() < 1e-5  # and nothing the data uses is lost


def test_calibrated_pruning_without_calibration_inputs_is_a_clear_error():
    for config in (ChannelPruningConfig(importance="activation"), ChannelPruningConfig(reconstruct=True)):
        with pytest.raises(InputError, match="need calibration inputs"):
            prune(MLP(), config, torch.randn(2, 6))
    with pytest.raises(FieldError, match=r"samples: must be >= 0 \(0: the whole split\), got -1"):
        ChannelPruningConfig(calibration=CalibrationConfig(samples=-1, split="train"))


def test_recipe_step_prunes_a_gpt2_ffn_with_activation_importance_and_refits_its_conv1d_layers(tmp_path):
    pytest.importorskip("transformers")
    from test_oneshot import relative_error, text_context

    from torchslim.registry import get_method

    errors = {}
    for name, config in {"l1": ChannelPruningConfig(ratio=0.5, skip=["*attn*", "*wte*", "*wpe*", "*ln*"]),
                         "activation+refit": ChannelPruningConfig(ratio=0.5, skip=["*attn*", "*wte*", "*wpe*", "*ln*"],
                                                            importance="activation", reconstruct=True)}.items():
        context = text_context(tmp_path)
        deployable = get_method("prune", "channel").handler(context, config)
        mlp = context.model.model.transformer.h[0].mlp
        assert mlp.c_fc.nf == 128 and mlp.c_proj.weight.shape == (128, 64)  # Conv1D: (in, out)
        errors[name] = relative_error(context)
        if name != "l1":
            refit = deployable.details["refit_relative_error"]
            assert refit["layers"] == 2 and 0 < refit["mean"] <= refit["max"] < 1
    assert errors["activation+refit"] < 0.5 * errors["l1"]


@pytest.mark.parametrize("importance", ["activation", "obs"])
def test_data_aware_importance_reads_convolution_channels_along_dim_1(importance):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[0].weight[:4] *= 10  # large weights, never active on the data
        model[0].bias[:4] = -1000.0
    x = torch.randn(4, 3, 8, 8)
    reference = model(x).detach()
    batches = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    prune(model, ChannelPruningConfig(ratio=0.5, importance=importance), x[:2], calibration=batches)
    assert model[0].out_channels == 4 and (model[0].bias == -1000.0).sum() == 0
    assert (model(x) - reference).abs().max() < 1e-5


def test_removal_costs_pick_the_column_whose_least_squares_removal_costs_least():
    from torchslim.pruning.channel.importance import removal_costs

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    x[:, 3] = 0.9 * x[:, 1] + 0.1 * x[:, 3]  # columns 1 and 3 nearly collinear
    weight = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    y = x @ weight.T
    brute = []  # output RMS error of removing each column alone, the others re-solved by least squares
    for j in range(8):
        kept = [i for i in range(8) if i != j]
        solution = torch.linalg.lstsq(x[:, kept], y).solution
        brute.append(float(((x[:, kept] @ solution - y) ** 2).sum() / 300) ** 0.5)
    scores = removal_costs(weight, x.T @ x / 300, damping=0.0, steps=7)
    first = int(scores.argmin())
    assert first == min(range(8), key=brute.__getitem__)
    assert scores[first].item() == pytest.approx(brute[first], rel=1e-6)
    assert sorted(scores.tolist()) == scores.sort().values.tolist() and len(set(scores.tolist())) == 8


def test_obs_importance_removes_a_redundant_neuron_that_activation_importance_keeps():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():  # neuron 7 copies neuron 0 at twice the size; both are read with large weights
        model.fc1.weight[7] = 2 * model.fc1.weight[0]
        model.fc1.bias[7] = 2 * model.fc1.bias[0]
        model.fc2.weight[:, 0] *= 5
        model.fc2.weight[:, 7] = 2 * model.fc2.weight[:, 0]
    x = torch.randn(32, 6)
    reference = model(x).detach()
    by_activation = copy.deepcopy(model)
    prune(by_activation, ChannelPruningConfig(ratio=1 / 8, importance="activation", reconstruct=True, damping=0.0), x[:2],
          calibration=calibration())
    prune(model, ChannelPruningConfig(ratio=1 / 8, importance="obs", reconstruct=True, damping=0.0), x[:2],
          calibration=calibration())
    assert model.fc1.out_features == by_activation.fc1.out_features == 7
    assert (by_activation(x) - reference).abs().max() > 0.05  # activation keeps the loud pair, loses a neuron
    assert (model(x) - reference).abs().max() < 1e-4  # obs removes one of the pair: nothing is lost


class Residual(nn.Module):
    """Post-norm residual MLP blocks: ``x = norm(x + scale * fc2(relu(fc1(x))))``."""

    def __init__(self, blocks: int = 2, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.layers = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(8, 32), "fc2": nn.Linear(32, 8),
                                                   "norm": nn.LayerNorm(8)}) for _ in range(blocks))

    def forward(self, x):
        for layer in self.layers:
            x = layer["norm"](x + self.scale * layer["fc2"](torch.relu(layer["fc1"](x))))
        return x


def test_the_refit_corrects_the_residual_stream_where_a_layer_adds_into_it(monkeypatch):
    from torchslim.pruning.channel import refit as calibrate

    torch.manual_seed(0)
    model = Residual()
    x = torch.randn(256, 8)
    reference = model(x).detach()
    batches = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    assert calibrate._norm_layers(model) == ["layers.0.norm", "layers.1.norm"]
    assert calibrate._residual_norm(model, "layers.0.fc2", "layers.0.norm", batches[0]) == "layers.0.norm"
    scaled = Residual(scale=0.5)  # a scale between the layer and the sum: the stream cannot be fitted through it
    assert calibrate._residual_norm(scaled, "layers.0.fc2", "layers.0.norm", batches[0]) is None

    config = ChannelPruningConfig(ratio=0.5, importance="obs", reconstruct=True)
    plain = copy.deepcopy(model)
    with monkeypatch.context() as patch:
        patch.setattr(calibrate, "_residual_norm", lambda *args: None)
        assert prune(plain, config, x[:2], calibration=batches).refit_residual == []
    result = prune(model, config, x[:2], calibration=batches)
    assert result.refit_residual == ["layers.0.fc2", "layers.1.fc2"]
    with_stream, without = (model(x) - reference).norm(), (plain(x) - reference).norm()
    assert with_stream < 0.95 * without  # the second block also repairs what the first one's pruning left (0.93)
