"""Weight-only execution modules: packed forward against the dequantized reference, embeddings that share the
head's table, and a GPT-2 saved with safetensors and rebuilt from its layer record."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.measure.params import count_params
from torchslim.quant.awq import awq_quantize
from torchslim.quant.groupwise import quantize_rtn
from torchslim.quant.weight_only import (WeightOnlyEmbedding, WeightOnlyLinear, fast_bfloat16_cpu, is_linear_like,
                                         linear_bias, linear_weight, restore_weight_only_, weight_only_layers)

CONFIGS = [(4, 32, False), (4, 64, False), (4, 128, False), (4, 0, False), (4, 0, True), (8, 0, True), (8, 0, False),
           (8, 64, False)]


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.float() - reference).norm() / reference.norm())


def layer(bits: int, group_size: int, symmetric: bool, in_features: int = 256, out_features: int = 48):
    torch.manual_seed(0)
    return WeightOnlyLinear.from_float(nn.Linear(in_features, out_features), bits, group_size, symmetric)


@pytest.mark.parametrize("bits, group_size, symmetric", CONFIGS)
def test_forward_matches_dequantized_reference(bits, group_size, symmetric):
    module = layer(bits, group_size, symmetric)
    weight, bias = module.dequantized_weight(), module.bias
    assert module.kernel_applies() == (bits == 4 or group_size == 0)
    x2, x3 = torch.randn(3, 256), torch.randn(2, 5, 256)
    with torch.no_grad():
        module.use_kernel = False  # dequantize + F.linear: exact
        assert torch.equal(module(x2), F.linear(x2, weight, bias))
        module.use_kernel = True
        module.kernel_dtype = torch.float32  # the packed kernels computing in float32: layout and params exact
        for x in (x2, x3):
            y = module(x)
            assert y.shape == (*x.shape[:-1], 48) and y.dtype == torch.float32
            assert relative_error(y, F.linear(x, weight, bias)) < 2e-6
        if fast_bfloat16_cpu():  # the shipped setting: kernel inputs/scales rounded to bfloat16
            module.kernel_dtype = torch.bfloat16
            assert relative_error(module(x3), F.linear(x3, weight, bias)) < 1e-2


def test_kernel_cache_is_built_lazily_and_not_saved():
    module = layer(4, 32, False)
    keys = set(module.state_dict())
    assert keys == {"qweight", "scales", "zeros", "bias"}
    assert module.qweight.dtype == torch.uint8 and module.qweight.shape == (48, 128)
    assert module.state_dict()["scales"].shape == (48, 8)
    module.kernel_dtype = torch.float32
    with torch.no_grad():
        module(torch.randn(1, 256))
    assert len(module._kernel_cache) == 1 and set(module.state_dict()) == keys
    module.load_state_dict(module.state_dict())
    assert module._kernel_cache == {}  # new weights invalidate the packed copy


def test_copies_and_pickles_drop_the_kernel_cache():
    import copy
    import pickle

    module = layer(4, 32, False)
    module.kernel_dtype = torch.float32
    x = torch.randn(2, 256)
    with torch.no_grad():
        y = module(x)
        for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            assert clone._kernel_cache == {}
            assert torch.equal(clone(x), y)


def test_importing_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, torchslim.quant.weight_only, torchslim.quant.gptq, torchslim.quant.awq; " \
           "print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_int8_stored_signed_with_shifted_zero_point():
    qw = quantize_rtn(torch.randn(16, 64), 8, 0, symmetric=True)
    module = WeightOnlyLinear.from_quantized(qw)
    assert module.qweight.dtype == torch.int8 and torch.all(module.zeros == 0)
    assert torch.equal(module.dequantized_weight(), qw.dequantize())


def test_long_inputs_and_gradients_take_the_dequantize_path():
    module = layer(4, 32, False)
    weight = module.dequantized_weight()
    x = torch.randn(module.kernel_max_rows + 1, 256)
    assert torch.equal(module(x), F.linear(x, weight, module.bias))
    x = torch.randn(2, 256, requires_grad=True)
    module(x).sum().backward()  # the kernels have no backward; the fallback does
    assert torch.allclose(x.grad, weight.sum(0).expand(2, -1), atol=1e-5)


def test_input_scale_multiplies_the_input():
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    x[:, :4] *= 20
    w = torch.randn(32, 128)
    qw, input_scale = awq_quantize(w, x, 4, 32)
    module = WeightOnlyLinear.from_quantized(qw, torch.zeros(32), input_scale)
    module.kernel_dtype = torch.float32
    assert "input_scale=True" in repr(module)
    with torch.no_grad():
        assert relative_error(module(x[:8]), (x[:8] * input_scale) @ qw.dequantize().T) < 2e-6


def test_conv1d_helpers():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs: weight (64, 48)
    assert is_linear_like(conv) and is_linear_like(nn.Linear(2, 3)) and not is_linear_like(nn.Conv1d(2, 3, 1))
    assert linear_weight(conv).shape == (48, 64) and linear_bias(conv).shape == (48,)
    module = WeightOnlyLinear.from_float(conv, 8, 0, symmetric=True)
    x = torch.randn(3, 64)
    with torch.no_grad():
        module.use_kernel = False
        assert relative_error(module(x), conv(x)) < 1e-2
    with pytest.raises(TypeError, match="Conv1d is not a Linear"):
        linear_weight(nn.Conv1d(2, 3, 1))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="group_size 64 does not divide in_features 96"):
        WeightOnlyLinear(96, 16, 4, 64)
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        WeightOnlyLinear(64, 16, 3, 32)


def test_embedding_rows_and_tied_table():
    torch.manual_seed(0)
    table = torch.randn(40, 64)
    head = WeightOnlyLinear.from_quantized(quantize_rtn(table, 8, 0, symmetric=True))
    embedding = WeightOnlyEmbedding.tied_to(head)
    assert embedding.qweight is head.qweight and embedding.scales is head.scales
    ids = torch.tensor([[0, 5, 39], [7, 7, 1]])
    rows = embedding(ids)
    assert rows.shape == (2, 3, 64)
    assert torch.equal(rows, head.dequantized_weight()[ids])
    assert count_params(nn.ModuleDict({"head": head, "embedding": embedding})) == 40 * 64  # the table counts once
    int4 = WeightOnlyEmbedding.from_float(nn.Embedding(40, 64), bits=4, group_size=32)
    assert int4.qweight.shape == (40, 32) and int4(ids).shape == (2, 3, 64)
    assert int4.logical_numel() == 40 * 64 and weight_only_layers(int4)[""]["shares"] is None
    with pytest.raises(ValueError, match=r"shared layer is \(40, 64\), the embedding \(40, 32\)"):
        WeightOnlyEmbedding(40, 32, shared=head)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def quantize_gpt2_(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Conv1D":
            model.set_submodule(name, WeightOnlyLinear.from_float(module, 4, 32))
    head = WeightOnlyLinear.from_float(model.lm_head, 8, 0, symmetric=True)
    model.lm_head = head
    model.transformer.wte = WeightOnlyEmbedding.tied_to(head)
    return model


def test_gpt2_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_model

    torch.manual_seed(0)
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        float_logits = model(ids).logits
    save_model(model, str(tmp_path / "float.safetensors"))
    quantize_gpt2_(model)
    with torch.no_grad():
        logits = model(ids).logits
    cosine = F.cosine_similarity(logits.flatten(), float_logits.flatten(), dim=0)
    assert cosine > 0.99
    save_model(model, str(tmp_path / "int4.safetensors"))
    layers = json.loads(json.dumps(weight_only_layers(model)))
    assert len(layers) == 10 and layers["transformer.h.0.attn.c_attn"]["bits"] == 4
    assert layers["transformer.wte"] == {"kind": "embedding", "bits": 8, "group_size": 0, "in_features": 64,
                                         "out_features": 128, "has_bias": False, "has_input_scale": False,
                                         "shares": "lm_head"}

    torch.manual_seed(1)  # different float weights: everything must come from the file
    fresh = restore_weight_only_(tiny_gpt2(), layers)
    assert fresh.transformer.wte.qweight is fresh.lm_head.qweight
    missing, unexpected = fresh.load_state_dict(load_file(str(tmp_path / "int4.safetensors")), strict=False)
    assert unexpected == [] and len(missing) == 3  # one name of the shared table is stored
    assert {key.rsplit(".", 1)[0] for key in missing} <= {"lm_head", "transformer.wte"}
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits)
    ratio = (tmp_path / "float.safetensors").stat().st_size / (tmp_path / "int4.safetensors").stat().st_size
    assert ratio >= 3.5


def test_restore_rejects_unknown_modules():
    with pytest.raises(ValueError, match="no module 'transformer.h.9.mlp'"):
        restore_weight_only_(nn.Module(), {"transformer.h.9.mlp": {"kind": "linear"}})
    with pytest.raises(ValueError, match="unknown kind 'conv'"):
        restore_weight_only_(nn.Sequential(nn.Linear(2, 2)), {"0": {"kind": "conv"}})
