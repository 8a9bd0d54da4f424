"""Weight-only int4/int8 written as compressed-tensors checkpoints, loaded back by transformers + compressed-tensors
with outputs equal to torchslim's packed layers."""

from __future__ import annotations

import json

import pytest
import torch

from torchslim.export.huggingface import ExportSkipped

from tiny_hf import llama


def _quantize_(model, symmetric: bool, skip_head: bool = False):
    from torchslim.quant.weight_only import WeightOnlyLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not (skip_head and name == "lm_head"):
            bits, group = (8, 0) if name == "lm_head" else (4, 32)
            model.set_submodule(name, WeightOnlyLinear.from_float(module, bits, group, symmetric=symmetric))
    return model


@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_llama_round_trips_through_transformers(tmp_path, symmetric):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from torchslim.export.compressed_tensors import save_compressed_tensors

    model = _quantize_(AutoModelForCausalLM.from_pretrained(llama(tmp_path / "float")).eval(), symmetric)
    facts = save_compressed_tensors(model, tmp_path / "ct")
    assert facts["quantized_layers"] == 14 and list(facts["dense_layers"]) == ["lm_head"]
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32
    assert group["weights"]["symmetric"] is symmetric and "lm_head" in config["ignore"]
    kwargs = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    assert bool(facts["load_kwargs"]) is not symmetric
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", **kwargs).eval()
    ids = torch.randint(1000, 20000, (2, 70), generator=torch.Generator().manual_seed(0))  # > 48 rows: dequantized
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    packed = stored["model.layers.0.mlp.up_proj.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (128, 64 // 8)  # eight 4-bit codes an int32
    assert ("model.layers.0.mlp.up_proj.weight_zero_point" in stored) is not symmetric


def test_gpt2_conv1d_layers_have_no_compressed_tensors_form(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import GPT2Config, GPT2LMHeadModel

    from torchslim.export.compressed_tensors import save_compressed_tensors
    from torchslim.quant.weight_only import WeightOnlyLinear

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=16)).eval()
    model.set_submodule("transformer.h.0.mlp.c_fc", WeightOnlyLinear.from_float(model.transformer.h[0].mlp.c_fc,
                                                                                  4, 32))
    with pytest.raises(ExportSkipped, match="Conv1D is not an nn.Linear"):
        save_compressed_tensors(model, tmp_path / "ct")
