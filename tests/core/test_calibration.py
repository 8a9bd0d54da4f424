"""Block-by-block calibration: layer helpers, block discovery, statistics and the sequential pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.core.calibration import run_sequential
from torchslim.core.modules import find_blocks, is_linear_like, linear_layers, set_weight_matrix_, weight_matrix
from torchslim.errors import InputError

transformers = pytest.importorskip("transformers")


class Wrapped(nn.Module):
    """Called like the zoo's text models: (input_ids, attention_mask) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32)
    return Wrapped(transformers.GPT2LMHeadModel(config)).eval()


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=128)
    return Wrapped(transformers.LlamaForCausalLM(config)).eval()


def token_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # a padded sequence: the attention mask must reach every block
    return [(ids, mask), (ids[:2, :10], mask[:2, :10])]


def outputs_of(module: nn.Module, model: nn.Module, batches) -> list[torch.Tensor]:
    outputs = []
    handle = module.register_forward_hook(lambda m, a, out: outputs.append(out if torch.is_tensor(out) else out[0]))
    with torch.no_grad():
        for batch in batches:
            model(*batch)
    handle.remove()
    return outputs


def inputs_of(module: nn.Module, model: nn.Module, batches) -> torch.Tensor:
    rows = []
    handle = module.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for batch in batches:
            model(*batch)
    handle.remove()
    return torch.cat(rows)


def test_conv1d_weight_matrix_is_the_out_by_in_view_and_set_writes_back():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs; weight stored (4, 6)
    x = torch.randn(5, 4)
    w = weight_matrix(layer)
    assert tuple(w.shape) == (6, 4) and is_linear_like(layer)
    assert torch.allclose(layer(x), nn.functional.linear(x, w, layer.bias), atol=1e-6)
    new = torch.randn(6, 4)
    set_weight_matrix_(layer, new)
    assert torch.equal(layer.weight, new.t())
    with pytest.raises(ValueError, match=r"\(4, 6\)"):
        set_weight_matrix_(layer, new.t())


def test_find_blocks_names_the_repeated_layers_of_gpt2_llama_and_none_for_an_mlp():
    gpt2, llama = tiny_gpt2(), tiny_llama()
    assert find_blocks(gpt2)[0] == "model.transformer.h" and len(find_blocks(gpt2)[1]) == 2
    assert find_blocks(gpt2.model)[0] == "transformer.h"
    assert find_blocks(llama)[0] == "model.model.layers"
    assert find_blocks(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))) is None
    assert len(linear_layers(gpt2)) == 9  # 4 Conv1D per block + lm_head


def test_hessian_and_channel_statistics_match_the_captured_inputs():
    model, batches = tiny_gpt2(), token_batches()
    first = model.model.transformer.h[0].attn.c_attn
    x = inputs_of(first, model, batches)
    seen = {}

    def keep(block_name, block, stats):
        seen.update(stats)

    run = run_sequential(model, batches, keep, want=("hessian", "sq_norm", "abs_mean", "samples"),
                         skip=["*lm_head*"], max_samples=20)
    stats = seen["model.transformer.h.0.attn.c_attn"]
    assert stats.tokens == x.shape[0] == 3 * 12 + 2 * 10 == run.tokens
    assert torch.allclose(stats.hessian, 2 / x.shape[0] * x.t() @ x, rtol=1e-5, atol=1e-5)
    assert torch.allclose(stats.sq_norm, (x * x).sum(0), rtol=1e-5)
    assert torch.allclose(stats.abs_mean, x.abs().mean(0), rtol=1e-5)
    assert tuple(stats.samples.shape) == (20, 64)
    distances = (stats.samples[:, None, :] - x[None]).abs().amax(-1).min(dim=1).values
    assert float(distances.max()) < 1e-5  # every sample is a real input row


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_noop_sequential_pass_reproduces_the_final_hidden_states(build):
    model, batches = build(), token_batches()
    last = find_blocks(model)[1][-1]
    reference = outputs_of(last, model, batches)
    names = []
    got = []
    handle = last.register_forward_hook(lambda m, a, out: got.append(out if torch.is_tensor(out) else out[0]))
    run = run_sequential(model, batches, lambda name, block, stats: names.append(name), skip=["*lm_head*"])
    handle.remove()
    assert run.num_blocks == 2 and names == [f"{run.blocks}.0", f"{run.blocks}.1"]
    assert len(got) == len(batches)  # the last block ran once per batch, on inputs carried block to block
    for out, ref in zip(got, reference):
        assert float((out - ref).abs().max()) < 1e-5


def test_changes_made_by_process_reach_the_next_blocks_statistics():
    model, batches = tiny_gpt2(), token_batches()
    seen = {}

    def halve_mlp_output(block_name, block, stats):
        seen.update(stats)
        if block_name.endswith(".0"):
            set_weight_matrix_(block.mlp.c_proj, weight_matrix(block.mlp.c_proj) * 0.5)

    run_sequential(model, batches, halve_mlp_output, skip=["*lm_head*"])
    x = inputs_of(model.model.transformer.h[1].attn.c_attn, model, batches)  # the changed model's inputs
    expected = 2 / x.shape[0] * x.t() @ x
    assert torch.allclose(seen["model.transformer.h.1.attn.c_attn"].hessian, expected, rtol=1e-4, atol=1e-5)


def test_llama_projections_reading_one_input_share_their_statistics_and_the_head_comes_last():
    model, batches = tiny_llama(), token_batches()
    calls = []
    run_sequential(model, batches, lambda name, block, stats: calls.append((name, stats)))
    assert [name for name, _ in calls] == ["model.model.layers.0", "model.model.layers.1", ""]
    stats = calls[0][1]
    prefix = "model.model.layers.0."
    attention = [stats[prefix + f"self_attn.{p}_proj"] for p in "qkv"]
    assert attention[0] is attention[1] is attention[2]
    assert stats[prefix + "mlp.gate_proj"] is stats[prefix + "mlp.up_proj"]
    assert stats[prefix + "mlp.down_proj"].hessian.shape == (128, 128)
    assert list(calls[2][1]) == ["model.lm_head"] and calls[2][1]["model.lm_head"].tokens == 56


def test_use_cache_and_training_mode_are_restored_after_the_run():
    model, batches = tiny_gpt2(), token_batches()
    model.train()
    run_sequential(model, batches, lambda *args: None)
    assert model.training and model.model.transformer.h[0].training
    assert model.model.config.use_cache is True


def test_a_model_without_blocks_is_processed_in_one_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(5, 8), torch.randn(3, 8)]
    calls = []
    run = run_sequential(model, batches, lambda name, block, stats: calls.append((name, block, stats)),
                         want=("sq_norm",))
    assert len(calls) == 1 and calls[0][0] == "" and calls[0][1] is model
    assert sorted(calls[0][2]) == ["0", "2"] and calls[0][2]["0"].tokens == 8 and calls[0][2]["0"].hessian is None
    assert run.blocks is None and run.tokens == 8


def test_parallel_heads_in_a_module_list_are_not_treated_as_a_chain():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))

        def forward(self, x):
            return sum(head(x) for head in self.heads)

    calls = []
    run = run_sequential(Heads(), [torch.randn(4, 8)], lambda name, block, stats: calls.append(sorted(stats)))
    assert run.blocks is None and calls == [["heads.0.0", "heads.1.0", "heads.2.0"]]


def test_bad_inputs_raise_one_line_input_errors():
    with pytest.raises(InputError, match="no Linear layers"):
        run_sequential(nn.Sequential(nn.Conv2d(1, 2, 3)), [torch.randn(1, 1, 4, 4)], lambda *a: None)
    with pytest.raises(InputError, match="no batches"):
        run_sequential(nn.Linear(2, 2), [], lambda *a: None)
