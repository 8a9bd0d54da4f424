"""Run-time generated weights: exact against the dense model holding the decoded weights, and compact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchslim._config import FieldError
from torchslim.compact.materialize import (MaterializeConfig, OnDemandEmbedding, OnDemandLinear, PackedWeight,
                                           materialize_, resident_parameter_bytes)
from torchslim.runtime import TorchDeployable


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 50)
        self.bag = nn.EmbeddingBag(10, 4)

    def forward(self, ids):
        x = self.embed(ids).transpose(1, 2)
        return self.fc(torch.relu(self.conv(x)).mean(-1)) + self.bag(ids[:, :2] % 10).sum()


@pytest.mark.parametrize("bits, bound", [(8, 0.5 / 127), (4, 0.5 / 7)])
def test_packed_codes_decode_within_half_a_step_and_rows_decode_alone(bits, bound):
    torch.manual_seed(0)
    weight = torch.randn(40, 130)
    packed = PackedWeight(weight, bits=bits, group_size=64)
    decoded = packed()
    assert decoded.shape == weight.shape
    groups = 1 if bits == 8 else 3  # 130 columns: one scale a row (int8), three groups of 64 (int4)
    assert packed.scale.shape == (40, groups)
    # every weight within half a quantization step of its group's scale (max|w| / qmax)
    assert float((decoded - weight).abs().max()) <= bound * float(weight.abs().max()) * 1.01
    index = torch.tensor([[3, 7], [39, 0]])
    assert torch.equal(packed.rows(index), decoded[index])
    code_bytes = packed.codes.numel() * packed.codes.element_size()
    assert code_bytes == (40 * 130 if bits == 8 else 40 * 192 // 2)


def test_materialized_model_equals_the_dense_model_holding_the_decoded_weights():
    torch.manual_seed(0)
    model = Mixed().eval()
    ids = torch.randint(0, 50, (4, 9))
    dense = copy.deepcopy(model)
    skipped = materialize_(model, MaterializeConfig(bits=8))
    assert list(skipped) == ["bag"] and "compress_embeddings" in skipped["bag"]
    assert isinstance(model.fc, OnDemandLinear) and isinstance(model.embed, OnDemandEmbedding)
    with torch.no_grad():
        for name in ("embed", "conv", "fc"):
            getattr(dense, name).weight.copy_(getattr(model, name).packed())
        assert torch.allclose(model(ids), dense(ids), atol=1e-6)
    before = resident_parameter_bytes(dense)
    after = resident_parameter_bytes(model)
    assert after < 0.3 * before


def test_tied_weights_keep_one_compact_form():
    model = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 100, bias=False))
    model[1].weight = model[0].weight
    materialize_(model, MaterializeConfig())
    assert model[0].packed is model[1].packed
    assert resident_parameter_bytes(model) == 100 * 32 + 100 * 2  # int8 codes + fp16 row scales, once


def test_artifact_holds_only_the_compact_form_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    fp32 = TorchDeployable(copy.deepcopy(model)).save(tmp_path / "fp32").stat().st_size
    materialize_(model, MaterializeConfig(bits=4, group_size=32))
    deployable = TorchDeployable(model)
    path = deployable.save(tmp_path / "int4")
    assert path.stat().st_size < 0.2 * fp32
    x = torch.randn(3, 256)
    assert torch.equal(deployable.load_and_run(path, x), deployable(x))


def test_minilm_keeps_a_quarter_of_its_bytes_resident_at_cosine_099():
    from torchslim.zoo import resolve_model

    bundle = resolve_model("builtin:minilm")
    inputs = bundle.preprocess(["Weights are generated just before each layer runs.", "Only codes stay in memory."])
    with torch.no_grad():
        reference = bundle.model(*inputs)
    before = resident_parameter_bytes(bundle.model)
    materialize_(bundle.model, MaterializeConfig(bits=8))
    assert resident_parameter_bytes(bundle.model) <= 0.3 * before
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(bundle.model(*inputs), reference)
    assert float(cosine.min()) >= 0.99


def test_bad_bits_is_a_field_error():
    with pytest.raises(FieldError, match="bits: must be 8 or 4"):
        MaterializeConfig(bits=3)


def test_parameter_counts_include_the_weights_a_compact_form_stands_for():
    from torchslim.measure.params import count_nonzero_params, count_params

    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[0].zero_()
    expected, nonzero = count_params(model), count_nonzero_params(model)
    materialize_(model, MaterializeConfig())
    assert (count_params(model), count_nonzero_params(model)) == (expected, nonzero) == (46, 38)
