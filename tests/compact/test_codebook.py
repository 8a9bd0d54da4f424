"""share_weights (k-means codebooks), the entropy coder and the ``model.tslim`` artifact."""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import torchslim
from conftest import tiny_bundle
from torchslim._config import FieldError, from_dict
from torchslim._context import _StepContext as StepContext
from torchslim.compact import codebook  # noqa: F401  (registers share_weights: kmeans)
from torchslim.compact.artifact import (PREAMBLE, SECTIONS, ArtifactError, CompactDeployable, Storage,
                                        decode_artifact, encode_artifact, read_artifact,
                                        round_to_storage_, write_artifact)
from torchslim.compact.codebook import WeightSharingConfig
from torchslim.compact.entropy import SectionReader, SectionWriter, read_varint, write_varint
from torchslim.compact.sharing import kmeans_1d, share_weights_, shared_layers, unshare_
from torchslim.data import resolve_data
from torchslim.errors import InputError
from torchslim.measure.params import count_nonzero_params, count_params
from torchslim.pruning.magnitude import MagnitudePruningConfig, prune_magnitude
from torchslim.recover.finetune import FinetuneConfig
from torchslim.recover.optim import OptimizerConfig
from torchslim.registry import get_method
from torchslim.zoo import resolve_model


def make_context(tmp_path, bundle=None) -> StepContext:
    bundle = bundle or tiny_bundle()
    return StepContext(model=bundle.model, teacher=copy.deepcopy(bundle.model).requires_grad_(False), bundle=bundle,
                       data=resolve_data("builtin:digits"), seed=0, threads=1, workdir=tmp_path, progress=False,
                       where="test")


def test_accuracy(model, bundle, data) -> float:
    correct = total = 0
    with torch.inference_mode():
        for inputs, labels in data.batches("test", bundle.preprocess, 256):
            correct += int((model(inputs).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


test_accuracy.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def mlp():
    return resolve_model("builtin:digits-mlp")


@pytest.fixture(scope="module")
def digits():
    return resolve_data("builtin:digits")


def pruned_shared_mlp(tmp_path, mlp, sparsity=0.9, bits=4, **config) -> tuple[StepContext, CompactDeployable]:
    bundle = copy.copy(mlp)
    bundle.model = copy.deepcopy(mlp.model)
    context = make_context(tmp_path, bundle)
    prune_magnitude(context, MagnitudePruningConfig(sparsity=sparsity))
    deployable = get_method("share_weights", "kmeans").handler(context, WeightSharingConfig(bits=bits, **config))
    return context, deployable


# -- k-means and the coder --------------------------------------------------------------------------------------
def test_kmeans_finds_separated_clusters_and_keeps_centroids_sorted():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([-2.0, -0.5, 0.3, 1.7])
    values = centres.repeat_interleave(250) + 0.01 * torch.randn(1000, generator=generator)
    found, assignment = kmeans_1d(values, 4)
    assert torch.allclose(found, centres, atol=0.01)
    assert torch.equal(assignment, torch.arange(4).repeat_interleave(250))
    many, _ = kmeans_1d(torch.randn(5000, generator=generator), 16)
    assert bool((many[1:] >= many[:-1]).all())


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2 ** 40 + 5])
def test_varints_round_trip(value):
    out = bytearray()
    write_varint(value, out)
    assert read_varint(bytes(out), 0) == (value, len(out))


def test_sections_round_trip_symbols_and_gaps_including_empty_and_huge_gaps():
    rng = np.random.default_rng(0)
    symbols = rng.integers(0, 16, 3000)
    positions = np.flatnonzero(rng.random(50_000) < 0.05)
    far = np.array([0, 1, 2 ** 17 + 3, 2 ** 36 + 11])
    writer = SectionWriter()
    writer.add_symbols(symbols, 16)
    writer.add_gaps(positions)
    writer.add_symbols(np.zeros(0, dtype=int), 4)
    writer.add_gaps(far)
    writer.add_symbols(np.full(7, 2), 4)  # one symbol only: a near-certain model
    payload = writer.finish()
    reader = SectionReader(payload)
    assert np.array_equal(reader.read_symbols(3000, 16), symbols)
    assert np.array_equal(reader.read_positions(len(positions), 50_000), positions)
    assert reader.read_symbols(0, 4).size == 0
    assert np.array_equal(reader.read_positions(4, 2 ** 37), far)
    assert np.array_equal(reader.read_symbols(7, 4), np.full(7, 2))
    assert len(payload) < 3000 * 4 / 8 + 50_000 / 8  # below packed 4-bit symbols plus a bitmap


# -- sharing ----------------------------------------------------------------------------------------------------
def test_sharing_keeps_pruned_zeros_and_uses_at_most_two_to_the_bits_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    keep = torch.rand(64, 32) > 0.7
    with torch.no_grad():
        model[0].weight.mul_(keep)
    share_weights_(model, {"0": 3, "2": 2})
    weight = model[0].weight.detach()
    assert torch.equal(weight == 0, ~keep)
    assert weight[keep].unique().numel() <= 8
    assert model[2].weight.detach().unique().numel() <= 4
    assert set(shared_layers(model)) == {"0", "2"}
    plain = unshare_(copy.deepcopy(model))
    assert torch.equal(plain[0].weight, model[0].weight)  # the original keeps its shared weights
    assert not shared_layers(plain) and shared_layers(model)


def test_config_validates_bits():
    assert from_dict(WeightSharingConfig, {"bits": 3, "layer_bits": {"fc3": 5}}).layer_bits == {"fc3": 5}
    with pytest.raises(FieldError, match="bits: must be in \\[1, 8\\]"):
        from_dict(WeightSharingConfig, {"bits": 9})
    with pytest.raises(FieldError, match="layer_bits.fc3"):
        from_dict(WeightSharingConfig, {"layer_bits": {"fc3": 0}})


# -- the artifact -----------------------------------------------------------------------------------------------
class TiedHead(nn.Module):
    """A conv net with BatchNorm (an int64 buffer) and two heads tied to one weight (stored once)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 10)
        self.head_a = nn.Linear(10, 10)
        self.head_b = nn.Linear(10, 10)
        self.head_b.weight = self.head_a.weight

    def forward(self, x):
        y = self.fc(self.bn(self.conv(x)).mean((2, 3)))
        return self.head_a(y) + self.head_b(y)


@pytest.mark.parametrize("storage", [Storage("fp16", "fp16"), Storage("fp32", "fp32"), Storage("fp16", "int8")],
                         ids=lambda s: f"{s.codebook}-{s.other}")
def test_artifact_decodes_bit_exactly(tmp_path, storage):
    torch.manual_seed(0)
    model = TiedHead().eval()
    model.bn.running_mean.uniform_(-1, 1)
    with torch.no_grad():
        model.conv.weight.mul_(torch.rand_like(model.conv.weight) > 0.5)
    share_weights_(model, {"conv": 3, "fc": 4})
    round_to_storage_(model, storage)
    payload, sizes = encode_artifact(model, storage)
    assert len(payload) == sizes["total"] == sum(v for k, v in sizes.items() if k != "total")
    decoded = decode_artifact(payload)
    expected = unshare_(copy.deepcopy(model)).state_dict()
    assert set(decoded) == set(expected)
    for name, tensor in expected.items():
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor), name
    round_to_storage_(model, storage)  # idempotent: a stored model stores to the same bytes
    assert encode_artifact(model, storage)[0] == payload
    write_artifact(model, tmp_path / "m.tslim", storage)
    inputs = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(torchslim.load(tmp_path / "m.tslim", model)(inputs), model(inputs))


def test_tied_tensors_are_stored_once():
    model = TiedHead()
    _, sizes = encode_artifact(model, Storage(other="fp32"))
    untied = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point()) + 8
    assert sizes["tensors"] == untied - 100 * 4


def test_entropy_coded_indices_and_positions_beat_packed_bits_on_real_weights(tmp_path, mlp):
    context, deployable = pruned_shared_mlp(tmp_path, mlp, sparsity=0.9, bits=4, finetune=None)
    nonzero = sum(layer["nonzero"] for layer in deployable.details["layers"].values())
    weights = sum(layer["weights"] for layer in deployable.details["layers"].values())
    sizes = deployable.details["bytes"]
    assert sizes["indices"] < 0.95 * 4 * nonzero / 8  # below raw packed 4-bit indices
    assert sizes["positions"] < 0.6 * weights / 8  # below a keep bitmap
    assert sizes["header"] < 300
    assert deployable.details["ratio"] > 30


def test_four_bit_sharing_keeps_digits_mlp_accuracy_before_fine_tuning(tmp_path, mlp, digits):
    before = test_accuracy(mlp.model, mlp, digits)
    model = copy.deepcopy(mlp.model)
    share_weights_(model, {"fc1": 4, "fc2": 4, "fc3": 4})
    assert test_accuracy(model, mlp, digits) >= before - 0.011


def test_centroid_fine_tuning_moves_only_centroids_and_keeps_pruned_zeros(tmp_path, mlp, digits):
    finetune = FinetuneConfig(epochs=2, batch_size=128, optimizer=OptimizerConfig(name="adam", lr=1e-3,
                                                                                  weight_decay=0.0))
    frozen_context, frozen = pruned_shared_mlp(tmp_path / "a", mlp, finetune=None)
    tuned_context, tuned = pruned_shared_mlp(tmp_path / "b", mlp, finetune=finetune)
    assert "centroid_finetune" in tuned.details and not tuned_context.masks
    frozen_layers, tuned_layers = shared_layers(frozen.module), shared_layers(tuned.module)
    for name, layer in tuned_layers.items():
        assert torch.equal(layer.indices, frozen_layers[name].indices), name
        assert torch.equal(layer.keep, frozen_layers[name].keep), name
        assert not torch.equal(layer.codebook, frozen_layers[name].codebook), name
        weight = tuned.module.get_submodule(name).weight
        assert int((weight[~layer.keep] != 0).sum()) == 0
        assert weight[layer.keep].unique().numel() <= 16
        assert tuned.module.get_submodule(name).parametrizations.weight.original.numel() == 0
    assert test_accuracy(tuned, mlp, digits) >= test_accuracy(frozen, mlp, digits) - 0.01


def corrupted(tmp_path, payload: bytes, at: int, name: str = "model.tslim"):
    data = bytearray(payload)
    data[at] ^= 0x40
    (tmp_path / name).write_bytes(bytes(data))
    return tmp_path / name


def test_corrupted_or_truncated_artifacts_raise_an_error_naming_file_and_section(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    share_weights_(model, {"0": 4, "2": 4})
    payload, sizes = encode_artifact(model)
    assert issubclass(ArtifactError, InputError)
    start = sizes["header"]
    with pytest.raises(ArtifactError, match="section 'header' is corrupted"):
        read_artifact(corrupted(tmp_path, payload, PREAMBLE.size + 3))
    for section in SECTIONS:
        path = corrupted(tmp_path, payload, start + sizes[section] // 2, f"{section}.tslim")
        with pytest.raises(ArtifactError, match=f"{path}: section '{section}' is corrupted"):
            read_artifact(path)
        start += sizes[section]
    (tmp_path / "short.tslim").write_bytes(payload[:-1])
    with pytest.raises(ArtifactError, match="short.tslim: truncated in section 'tensors'"):
        read_artifact(tmp_path / "short.tslim")
    (tmp_path / "long.tslim").write_bytes(payload + b"\0")
    with pytest.raises(ArtifactError, match="1 unexpected bytes"):
        read_artifact(tmp_path / "long.tslim")
    with pytest.raises(ArtifactError, match="not a torchslim compact artifact"):
        decode_artifact(b"PK\x03\x04" + payload[4:], "other.zip")
    with pytest.raises(ArtifactError, match="format version 9"):
        decode_artifact(payload[:4] + b"\x09" + payload[5:], "future.tslim")


def test_handler_returns_a_compact_deployable_whose_artifact_reloads_exactly(tmp_path):
    context = make_context(tmp_path)
    prune_magnitude(context, MagnitudePruningConfig(sparsity=0.5))
    config = WeightSharingConfig(bits=4, skip=["fc"], finetune=FinetuneConfig(epochs=1, batch_size=256))
    deployable = get_method("share_weights", "kmeans").handler(context, config)
    assert isinstance(deployable, CompactDeployable)
    details = deployable.details
    assert set(details["layers"]) == {"conv1", "conv2"} and details["bits"] == [4]
    assert set(details["bytes"]) == {"header", *SECTIONS, "total"}
    assert details["raw_fp32_bytes"] == sum(t.numel() * 4 for t in tiny_bundle().model.state_dict().values()
                                            if t.is_floating_point()) + 8  # num_batches_tracked (int64)
    assert details["ratio"] == round(details["raw_fp32_bytes"] / details["bytes"]["total"], 2)
    assert set(context.masks) == {"fc.weight"}  # the shared layers' masks moved into their parametrizations
    dense = tiny_bundle().model
    assert count_params(deployable.module) == count_params(dense)
    assert count_nonzero_params(deployable.module) == count_nonzero_params(unshare_(copy.deepcopy(deployable.module)))
    inputs = context.example_inputs(4)
    outputs = deployable(inputs)
    assert outputs.shape == (4, 10)
    path = deployable.save(tmp_path / "artifact")
    assert path.name == "model.tslim" and path.stat().st_size == details["bytes"]["total"]
    assert torch.equal(deployable.load_and_run(path, inputs), outputs)
    assert zlib.crc32(path.read_bytes()) == zlib.crc32(deployable.save(tmp_path / "again").read_bytes())
