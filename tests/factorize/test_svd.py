"""SVD factorization: exact at full rank, error equal to the lost energy, ranks as configured, MACs that drop,
layers it cannot handle listed with reasons, and artifacts that reload."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import torchslim
from torchslim._config import FieldError, from_dict
from torchslim._context import _StepContext as StepContext
from torchslim.data import resolve_data
from torchslim.factorize.svd import (
    SvdConfig, factorize_svd, factorized_layers, weight_matrix,
)
from torchslim.measure.macs import count_macs
from torchslim.registry import get_method
from torchslim.runtime import TorchDeployable
from torchslim.zoo.digits_cnn import DigitsCNN

from conftest import tiny_bundle

CONV_SETTINGS = [
    {},
    {"stride": 2, "padding": (1, 2), "dilation": (1, 2)},
    {"padding": 1, "padding_mode": "reflect"},
    {"padding": "same"},
]


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    return float((weight - approximation).square().sum() / weight.square().sum())


def lost_energy(module: nn.Module, rank: int, conv: str = "channel") -> float:
    squares = torch.linalg.svdvals(weight_matrix(module, conv)).square()
    return float(1 - squares[:rank].sum() / squares.sum())


def with_singular_values(values: list[float], size: int = 64) -> nn.Linear:
    """A Linear(size, size) whose weight has exactly these singular values (the rest zero)."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64))
    s = torch.zeros(size, dtype=torch.float64)
    s[:len(values)] = torch.tensor(values, dtype=torch.float64)
    layer = nn.Linear(size, size)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(s) @ v.T)
    return layer


@pytest.mark.parametrize("rank", [1, 5, 16, 32])
def test_linear_error_equals_the_energy_left_out(rank):
    torch.manual_seed(0)
    layer = nn.Linear(48, 32)
    first, second = factorized_layers(layer, rank)
    assert (first.in_features, first.out_features, first.bias) == (48, rank, None)
    assert (second.in_features, second.out_features) == (rank, 32)
    assert torch.equal(second.bias, layer.bias)
    error = relative_error(layer.weight.detach().double(), (second.weight @ first.weight).detach().double())
    assert error == pytest.approx(lost_energy(layer, rank), abs=1e-5)
    if rank == 32:
        assert error < 1e-10


@pytest.mark.parametrize("conv", ["channel", "spatial"])
@pytest.mark.parametrize("rank", [1, 4, 9])
def test_conv_error_equals_the_energy_left_out(conv, rank):
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 10, (3, 4), padding=1)
    first, second = factorized_layers(layer, rank, conv)
    a, b = first.weight.detach().double(), second.weight.detach().double()
    if conv == "channel":  # W_r[o, c, i, j] = sum_k second[o, k] first[k, c, i, j]
        assert (first.kernel_size, second.kernel_size) == ((3, 4), (1, 1))
        approximation = torch.einsum("ok,kcij->ocij", b[:, :, 0, 0], a)
    else:  # W_r[o, c, i, j] = sum_k first[k, c, i] second[o, k, j]
        assert (first.kernel_size, second.kernel_size) == ((3, 1), (1, 4))
        approximation = torch.einsum("kci,okj->ocij", a[..., 0], b[:, :, 0])
    error = relative_error(layer.weight.detach().double(), approximation)
    assert error == pytest.approx(lost_energy(layer, rank, conv), abs=1e-5)
    assert error > 1e-3  # rank 9 is below both full ranks (10 and 18): something is lost


@pytest.mark.parametrize("conv", ["channel", "spatial"])
@pytest.mark.parametrize("settings", CONV_SETTINGS, ids=lambda s: ",".join(s) or "plain")
def test_full_rank_convolutions_compute_the_same_outputs(conv, settings):
    torch.manual_seed(0)
    layer = nn.Conv2d(5, 7, 3 if settings.get("padding") == "same" else (3, 4), **settings).double()
    x = torch.randn(2, 5, 13, 11, dtype=torch.float64)
    pair = factorized_layers(layer, min(weight_matrix(layer, conv).shape), conv)
    assert pair(x).shape == layer(x).shape
    assert torch.allclose(pair(x), layer(x), atol=1e-10)


def test_full_rank_linear_computes_the_same_outputs():
    torch.manual_seed(0)
    layer = nn.Linear(20, 30).double()
    x = torch.randn(4, 3, 20, dtype=torch.float64)
    assert torch.allclose(factorized_layers(layer, 20)(x), layer(x), atol=1e-10)


@pytest.mark.parametrize("energy, round_to, rank, retained", [
    (0.5, 1, 1, 0.5), (0.8, 1, 2, 0.8), (0.85, 1, 3, 0.9), (0.9, 1, 3, 0.9), (0.95, 1, 4, 0.95),
    (1.0, 1, 5, 1.0), (0.8, 4, 4, 0.95),
])
def test_energy_picks_the_smallest_rank_that_retains_it(energy, round_to, rank, retained):
    # Energies 50, 30, 10, 5, 5 of 100: cumulated 0.5, 0.8, 0.9, 0.95, 1.0.
    model = nn.Sequential(with_singular_values([50 ** 0.5, 30 ** 0.5, 10 ** 0.5, 5 ** 0.5, 5 ** 0.5]))
    result = factorize_svd(model, SvdConfig(energy=energy, round_to=round_to), torch.randn(2, 64))
    assert result.ranks == {"0": rank}
    assert result.full_ranks == {"0": 64}
    assert result.retained_energy["0"] == pytest.approx(retained, abs=1e-6)
    assert result.macs_before == 64 * 64
    assert result.macs_after == rank * (64 + 64)


def test_rank_ratio_keeps_that_fraction_of_the_full_rank_and_macs_follow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(3, 64)
    result = factorize_svd(model, SvdConfig(rank_ratio=0.25, round_to=1), x)
    assert result.ranks == {"0": 8, "2": 4}
    assert result.macs_before == 64 * 32 + 32 * 16
    assert result.macs_after == 8 * (64 + 32) + 4 * (32 + 16) == count_macs(model, x[:1])
    assert result.params_after == 8 * 64 + 8 * 32 + 32 + 4 * 32 + 4 * 16 + 16
    assert isinstance(model[0], nn.Sequential) and model(x).shape == (3, 16)


@pytest.mark.parametrize("conv", ["channel", "spatial"])
def test_target_macs_is_met_globally_on_the_digits_cnn(conv):
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(2, 1, 32, 32)
    reference = model(x)
    result = factorize_svd(model, SvdConfig(target_macs=0.5, conv=conv, round_to=1), x)
    assert result.target_reached
    assert 0.4 * result.macs_before <= result.macs_after <= 0.5 * result.macs_before
    assert result.macs_after == count_macs(model, x[:1])
    assert len(result.ranks) >= 6
    assert all(0 < e < 1 for e in result.retained_energy.values())
    assert model(x).shape == reference.shape


def test_an_unreachable_target_is_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Softmax(-1), nn.Linear(16, 16, bias=False))
    result = factorize_svd(model, SvdConfig(target_macs=0.05, round_to=1, skip=["2"]), torch.randn(1, 16))
    assert not result.target_reached
    assert result.ranks == {"0": 1}  # as low as it goes
    assert result.macs_after == 32 + 16 * 16


def test_lower_energy_means_fewer_macs_on_the_digits_cnn():
    torch.manual_seed(0)
    base = DigitsCNN().eval()
    x = torch.randn(1, 1, 32, 32)
    ratios = []
    for energy in (0.9, 0.5):
        result = factorize_svd(copy.deepcopy(base), SvdConfig(energy=energy), x)
        assert all(r % 8 == 0 or r == result.full_ranks[n] for n, r in result.ranks.items())
        ratios.append(result.macs_after / result.macs_before)
    assert ratios[1] < ratios[0] < 1.0
    assert ratios[1] < 0.6


class Mixed(nn.Module):
    """One layer of every kind the method must leave alone, and one it factorizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.point = nn.Conv2d(32, 1, 1)  # rank 1 costs 32 + 1 MACs a position, more than its 32
        self.conv1d = nn.Conv1d(1, 8, 3)
        self.head = nn.Linear(8, 4)
        self.unused = nn.Linear(64, 64)

    def forward(self, x):
        y = self.point(self.depthwise(self.conv(x))).mean(-1)
        return self.head(self.conv1d(y).mean(-1))


def test_layers_it_cannot_help_are_left_as_they_were_and_named_with_reasons():
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    result = factorize_svd(model, SvdConfig(energy=0.5, round_to=1, skip=["head"]), x)
    assert result.skipped == {
        "depthwise": "grouped or depthwise convolution (groups=32)",
        "point": "factorization would not reduce MACs at rank 1 (full rank 1)",
        "conv1d": "Conv1d is not factorized (only nn.Linear and nn.Conv2d)",
        "head": "excluded by the config (skip)",
        "unused": "not run on the example inputs",
    }
    assert list(result.ranks) == ["conv"]
    assert isinstance(model.conv, nn.Sequential)
    for name in result.skipped:
        assert not isinstance(getattr(model, name), nn.Sequential)
    assert model(x).shape == reference.shape


class TiedAndPeeking(nn.Module):
    """A tied output layer, and a parent whose code reads its child's weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 32)
        self.body = nn.Linear(32, 32)
        self.out = nn.Linear(32, 40, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        hidden = self.embed(ids).to(self.body.weight.dtype)
        return self.out(self.body(hidden))


def test_tied_layers_and_layers_the_code_reads_are_put_back_and_listed():
    torch.manual_seed(0)
    model = TiedAndPeeking().eval()
    ids = torch.randint(0, 40, (2, 5))
    reference = model(ids)
    result = factorize_svd(model, SvdConfig(rank_ratio=0.1, round_to=1), ids)
    assert result.ranks == {}
    assert result.skipped["embed"] == "Embedding is not factorized (only nn.Linear and nn.Conv2d)"
    assert result.skipped["out"] == "its weight is shared with another layer (tied)"
    assert result.skipped["body"].startswith("the model's code uses this layer as more than a call (AttributeError")
    assert isinstance(model.body, nn.Linear)
    assert torch.equal(model(ids), reference)
    assert result.macs_after == result.macs_before


@pytest.mark.parametrize("values, field", [
    ({"energy": 0.0}, "energy"), ({"energy": 1.5}, "energy"), ({"rank_ratio": -0.1}, "rank_ratio"),
    ({"target_macs": 1.0}, "target_macs"), ({"rank_ratio": 0.5, "target_macs": 0.5}, "target_macs"),
    ({"round_to": 0}, "round_to"), ({"layers": []}, "layers"), ({"conv": "diagonal"}, "conv"),
    ({"ranks": 4}, "ranks"),
])
def test_bad_config_values_name_their_field(values, field):
    with pytest.raises(FieldError) as error:
        from_dict(SvdConfig, values)
    assert error.value.field == field


def test_direct_construction_is_checked_too():
    with pytest.raises(FieldError, match="energy: must be in"):
        SvdConfig(energy=0.0)
    with pytest.raises(FieldError, match="conv: expected"):
        SvdConfig(conv="diagonal")


def test_recipe_form_round_trips():
    config = from_dict(SvdConfig, {"energy": 0.8, "layers": ["*.dense"], "conv": "spatial", "round_to": 4})
    assert (config.energy, config.layers, config.conv, config.round_to, config.skip) == (0.8, ["*.dense"],
                                                                                        "spatial", 4, [])


def make_context(tmp_path) -> StepContext:
    bundle = tiny_bundle()
    return StepContext(model=bundle.model, teacher=copy.deepcopy(bundle.model).requires_grad_(False), bundle=bundle,
                       data=resolve_data("builtin:digits"), seed=0, threads=1, workdir=tmp_path, progress=False,
                       where="test")


def test_the_registered_step_factorizes_reports_and_saves_a_reloadable_artifact(tmp_path):
    entry = get_method("factorize", "svd")
    assert entry.config_cls is SvdConfig
    context = make_context(tmp_path)
    context.masks = {"fc.weight": context.model.fc.weight != 0, "conv1.weight": context.model.conv1.weight != 0}
    inputs = context.example_inputs(4)
    before = context.teacher(inputs)
    deployable = entry.handler(context, SvdConfig(energy=0.6, round_to=1, skip=["conv1"]))
    details = deployable.details
    assert set(details["ranks"]) == {"conv2", "fc"}
    assert details["full_ranks"] == {"conv2": 8, "fc": 10}
    assert all(details["retained_energy"][n] >= 0.6 for n in details["ranks"])
    assert details["macs_after"] < details["macs_before"] == count_macs(context.teacher, inputs[:1])
    assert details["macs_after"] == count_macs(context.model, inputs[:1])
    assert details["params_after"] < details["params_before"]
    assert context.skipped == {"conv1": "excluded by the config (skip)"}
    assert details["masks_dropped"] == ["fc"] and set(context.masks) == {"conv1.weight"}
    context.apply_masks()
    after = deployable(inputs)
    assert after.shape == before.shape
    path = deployable.save(tmp_path / "artifact")
    assert torch.allclose(torch.as_tensor(deployable.load_and_run(path, inputs)), after, atol=1e-6)
    fresh = torchslim.load(tmp_path / "artifact", tiny_bundle().model)
    with torch.inference_mode():
        assert torch.allclose(fresh(inputs), after, atol=1e-6)


@pytest.mark.parametrize("conv", ["channel", "spatial"])
def test_a_saved_digits_cnn_reloads_on_a_fresh_instance(tmp_path, conv):
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(2, 1, 32, 32)
    result = factorize_svd(model, SvdConfig(energy=0.6, conv=conv), x)
    assert result.ranks
    TorchDeployable(model).save(tmp_path)
    torch.manual_seed(1)
    fresh = torchslim.load(tmp_path, DigitsCNN().eval())
    with torch.inference_mode():
        assert torch.equal(fresh(x), model(x))


def test_minilm_ffn_factorizes_at_half_energy_keeping_its_output_shape(tmp_path):
    pytest.importorskip("transformers")
    from torchslim.zoo import resolve_model

    bundle = resolve_model("builtin:minilm")
    ids, mask = bundle.preprocess(["A sentence about low-rank layers.", "Another, rather different, one."])
    with torch.inference_mode():
        reference = bundle.model(ids, mask)
    config = SvdConfig(energy=0.5, layers=["*.intermediate.dense", "*.output.dense"], skip=["*.attention.*"])
    result = factorize_svd(bundle.model, config, (ids, mask))
    assert len(result.ranks) == 12  # two FFN layers in each of six blocks
    assert all(re.fullmatch(r"encoder\.encoder\.layer\.\d\.(intermediate|output)\.dense", name)
               for name in result.ranks)
    assert all(r % 8 == 0 and r < 192 for r in result.ranks.values())
    assert sum(reason == "excluded by the config (skip)" for reason in result.skipped.values()) == 6
    assert result.macs_after < 0.7 * result.macs_before
    deployable = TorchDeployable(bundle.model)
    outputs = deployable((ids, mask))
    assert outputs.shape == reference.shape == (2, 384)
    assert torch.allclose(outputs.norm(dim=-1), torch.ones(2), atol=1e-5)
    path = deployable.save(tmp_path)
    assert torch.allclose(torch.as_tensor(deployable.load_and_run(path, (ids, mask))), outputs, atol=1e-6)
