"""Structured channel pruning: every coupling the graph analysis knows, checked for exactness.

The exactness check: silence the channels chosen for removal (zero every parameter slice they own), run the
model, then physically remove them — the outputs must match, because a silenced channel contributes nothing.
A coupling the analysis got wrong (a residual partner not cut, a concat offset off by one, a flatten into the
wrong columns) breaks this equality or the forward pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.graph import analyse_channels, capture
from torchslim.graph.trace import trace
from torchslim.pruning.channel import (
    ChannelPruningConfig, prune, remove_channels, save_pruned, select_channels,
)

CAPTURE = {"how": "export"}


@pytest.fixture
def capture_by(request):
    """How `exact_prune` captures the graph: torch.export, or the traced fallback (``both`` runs each)."""
    CAPTURE["how"] = getattr(request, "param", "export")
    yield CAPTURE["how"]
    CAPTURE["how"] = "export"


both = pytest.mark.parametrize("capture_by", ["export", "trace"], indirect=True)


def exact_prune(model: nn.Module, x, ratio: float = 0.5, **config):
    """Prune ``model`` at ``ratio`` and check the pruned outputs equal the silenced original's."""
    torch.manual_seed(0)
    model.eval()
    args = x if isinstance(x, tuple) else (x,)
    program = capture(model, x) if CAPTURE["how"] == "export" else trace(model, args, "testing the tracer")
    graph = analyse_channels(program)
    settings = ChannelPruningConfig(ratio=ratio, **config)
    chosen = select_channels(model, graph, settings, ratio)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for (name, dim), ids in graph.param_ids.items():
            if name in parameters:
                mask = torch.tensor([r in chosen for r in graph.uf.roots(ids).tolist()])
                parameters[name].index_fill_(dim, torch.nonzero(mask).flatten(), 0.0)
        expected = model(*x) if isinstance(x, tuple) else model(x)
    assert buffers.keys() == dict(model.named_buffers()).keys()
    remove_channels(model, graph, chosen)
    with torch.no_grad():
        actual = model(*x) if isinstance(x, tuple) else model(x)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-4)
    return graph, chosen


def params(model):
    return sum(p.numel() for p in model.parameters())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                               nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.stem(x)
        y = F.relu(y + self.a(y))
        return self.head(y.mean((2, 3)))


def randomise_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


@both
def test_residual_stream_is_cut_together_and_the_model_shrinks(capture_by):
    model = randomise_norms(Residual())
    before = params(model)
    graph, chosen = exact_prune(model, torch.randn(2, 3, 8, 8))
    assert model.stem[0].out_channels == model.a[3].out_channels == 8  # the stream and its partner, together
    assert model.a[0].out_channels == 16 and model.a[1].num_features == 16
    assert model.head.in_features == 8 and model.head.out_features == 5
    assert params(model) < 0.4 * before


@both
def test_depthwise_follows_its_input_and_grouped_conv_keeps_its_groups(capture_by):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(3, 16, 1)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.grouped = nn.Conv2d(16, 8, 3, padding=1, groups=2)
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.out(self.grouped(F.relu(self.dw(F.relu(self.pw(x))))))

    model = Net()
    graph, _ = exact_prune(model, torch.randn(2, 3, 8, 8))
    assert model.pw.out_channels == 8 and model.dw.groups == 8  # the depthwise conv's groups follow
    grouped = model.grouped  # 2 groups of 8 in / 4 out -> 2 groups of 4 / 2: equal widths per group
    assert (grouped.in_channels, grouped.out_channels, grouped.groups) == (8, 4, 2) and model.out.in_channels == 4

    class Separable(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(3, 16, 1)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.out = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.out(F.relu(self.dw(F.relu(self.pw(x)))))

    model = Separable()
    exact_prune(model, torch.randn(2, 3, 8, 8))
    assert model.pw.out_channels == model.dw.out_channels == model.dw.groups == model.dw.in_channels == 8


@both
def test_concat_split_chunk_and_flatten_map_indices(capture_by):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 12, 3, padding=1)
            self.c = nn.Conv2d(20, 16, 1)
            self.d = nn.Conv2d(8, 6, 1)
            self.fc = nn.Linear(6 * 4 * 4, 3)

        def forward(self, x):
            y = self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))
            left, right = y.chunk(2, dim=1)
            y = self.d(left * torch.sigmoid(right))
            return self.fc(F.adaptive_avg_pool2d(y, 4).flatten(1))

    model = Net()
    exact_prune(model, torch.randn(2, 3, 8, 8))
    assert model.c.in_channels == model.a.out_channels + model.b.out_channels == 10
    assert model.c.out_channels == 8 and model.d.in_channels == 4  # both chunks lost the same positions
    assert model.fc.in_features == model.d.out_channels * 16


@both
def test_squeeze_excitation_gate_follows_the_channels_it_scales(capture_by):
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.fc1 = nn.Conv2d(16, 4, 1)
            self.fc2 = nn.Conv2d(4, 16, 1)
            self.out = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            y = F.relu(self.conv(x))
            gate = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
            return self.out(y * gate)

    model = SE()
    exact_prune(model, torch.randn(2, 3, 8, 8))
    assert model.conv.out_channels == model.fc2.out_channels == model.fc1.in_channels == model.out.in_channels == 8
    assert model.fc1.out_channels == 2


def test_embedding_and_layernorm_dimensions_are_pruned_together():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.norm = nn.LayerNorm(16)
            self.hidden = nn.Linear(16, 32)
            self.out = nn.Linear(32, 2)

        def forward(self, ids):
            return self.out(F.gelu(self.hidden(self.norm(self.emb(ids)).mean(1))))

    model = Net()
    ids = torch.randint(0, 50, (3, 7))
    result = prune(model, ChannelPruningConfig(ratio=0.5), ids)
    # The embedding width is one group with the LayerNorm's affine parameters and the next layer's inputs.
    # (Unlike a silenced conv channel, a removed LayerNorm channel also leaves its mean and variance: the
    # model is approximately, not exactly, the same; recovery training closes that gap.)
    assert model.emb.embedding_dim == model.norm.normalized_shape[0] == model.hidden.in_features == 8
    assert model.norm.weight.shape == (8,) and model.hidden.out_features == 16 and model.out.in_features == 16
    assert result.params_after < 0.6 * result.params_before
    assert model(ids).shape == (3, 2)


def test_recurrent_layers_and_packed_attention_are_left_intact_with_a_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 16)
            self.lstm = nn.LSTM(16, 12, batch_first=True)
            self.attn = nn.MultiheadAttention(12, 3, batch_first=True)

        def forward(self, x):
            y, _ = self.lstm(F.relu(self.proj(x)))
            return self.attn(y, y, y)[0]

    model = Net()
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        reference = model.eval()(x)
    result = prune(model, ChannelPruningConfig(ratio=0.5), x)
    assert model.proj.out_features == 16 and model.lstm.hidden_size == 12
    assert any("recurrent" in reason for reason in result.skipped.values())
    assert "attn" in result.skipped  # packed q/k/v projections of nn.MultiheadAttention: kept, with the reason
    assert result.macs_after == result.macs_before
    with torch.no_grad():
        assert torch.equal(model(x), reference)  # nothing it could not handle was touched


def test_save_and_load_rebuild_the_pruned_model_exactly(tmp_path):
    model = randomise_norms(Residual())
    x = torch.randn(2, 3, 8, 8)
    result = prune(model, ChannelPruningConfig(ratio=0.4, scope="global"), x)
    assert result.macs_after < result.macs_before
    save_pruned(model, tmp_path)
    fresh = torchslim.load(tmp_path, Residual())
    assert torch.equal(fresh(x), model(x))
    assert fresh.a[0].out_channels == model.a[0].out_channels


@pytest.mark.parametrize("importance", ["l1", "l2", "bn", "random"])
def test_importance_criteria_rank_channels(importance):
    model = randomise_norms(Residual())
    with torch.no_grad():
        model.a[0].weight[:4].mul_(100)  # four clearly important hidden channels
        model.a[1].weight[:4].fill_(10)
    prune(model, ChannelPruningConfig(ratio=0.5, importance=importance), torch.randn(2, 3, 8, 8))
    kept_big = int((model.a[0].weight.abs().flatten(1).sum(1) > 20).sum())
    assert model.a[0].out_channels == 16
    if importance != "random":
        assert kept_big == 4


def test_round_to_max_ratio_ignore_and_macs_target():
    x = torch.randn(2, 3, 8, 8)
    model = Residual()
    prune(model, ChannelPruningConfig(ratio=0.3, round_to=8), x)
    assert model.a[0].out_channels % 8 == 0 and model.stem[0].out_channels % 8 == 0
    model = Residual()
    result = prune(model, ChannelPruningConfig(ratio=0.5, skip=["a.0"]), x)
    assert model.a[0].out_channels == 32 and result.skipped["a.0"] == "excluded by the config (skip)"
    model = Residual()
    result = prune(model, ChannelPruningConfig(target_macs=0.4), x)
    assert 0.3 <= result.macs_after / result.macs_before <= 0.4



def test_per_group_ratios_cut_each_matched_group_by_its_own_ratio():
    x = torch.randn(2, 3, 8, 8)
    model = Residual()
    prune(model, ChannelPruningConfig(ratio=0.25, ratios={"a.0": 0.75}), x)
    assert model.a[0].out_channels == 8  # the block's hidden width: 32 -> 8
    assert model.stem[0].out_channels == model.a[3].out_channels == 12  # the stream: the default 0.25 of 16
    with pytest.raises(ValueError, match="ratios.a.0"):
        ChannelPruningConfig(ratios={"a.0": 1.0})
    with pytest.raises(ValueError, match="scope: local"):
        ChannelPruningConfig(ratios={"a.0": 0.5}, scope="global")

class DataDependent(nn.Module):
    """Branches on a tensor's value: torch.export cannot capture it, the traced fallback can."""

    def __init__(self, spare: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.other = nn.Conv2d(16, 16, 1) if spare else None
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = self.body(x)
        if float(y.mean()) > 1e6 and self.other is not None:  # never true on these inputs
            y = self.other(y)
        return self.head(y.mean((2, 3)))


def test_a_model_torch_export_cannot_capture_is_traced_and_pruned_where_the_path_is_known():
    from torchslim.errors import InputError

    x = torch.randn(2, 3, 8, 8)
    model = randomise_norms(DataDependent())
    result = prune(model, ChannelPruningConfig(ratio=0.5), x)
    assert model.body[0].out_channels == 8 and model.body[3].in_channels == 8
    # The branch condition averages over body[3]'s channels, so they stay (pruning would change the decision).
    assert model.body[3].out_channels == 16 and model.head.in_features == 16
    assert any(reason == "mean across channels" for reason in result.skipped.values())
    assert result.macs_after / result.macs_before < 0.6
    assert "torch.export failed" in result.skipped["(graph)"]
    with pytest.raises(InputError, match="cannot be captured by torch.export"):
        prune(DataDependent(), ChannelPruningConfig(capture="export"), x)
    # A layer the trace never ran could read any channel: then nothing is pruned, and the report says why.
    model = DataDependent(spare=True)
    result = prune(model, ChannelPruningConfig(ratio=0.5), x)
    assert result.macs_after == result.macs_before and model.body[0].out_channels == 16
    assert "did not run on the example inputs" in result.skipped["body.0"]
    assert "not run on the example inputs" in result.skipped["other"]


def test_a_model_that_cannot_be_captured_either_way_is_a_clear_error():
    from torchslim.errors import InputError

    class Broken(nn.Module):
        def forward(self, x):
            if float(x.sum()) > -1e9:
                raise ValueError("this model only runs on Tuesdays")
            return x

    with pytest.raises(InputError, match=r"cannot be captured: torch.export failed .*trace its graph failed too .*only runs on Tuesdays"):
        capture(Broken(), torch.randn(2, 3))


class Attention(nn.Module):
    """Multi-head (or grouped-query, when kv_heads < heads) self-attention with a residual and an FFN."""

    def __init__(self, dim=32, heads=4, kv_heads=4, hidden=64):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 3)

    def split(self, x, heads):
        b, t, _ = x.shape
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.split(self.q(x), self.heads), self.split(self.k(x), self.kv_heads), self.split(self.v(x), 0)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            k = k[:, :, None].expand(b, k.shape[1], repeat, t, self.head_dim).reshape(b, -1, t, self.head_dim)
            v = v[:, :, None].expand(b, v.shape[1], repeat, t, self.head_dim).reshape(b, -1, t, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.o(y)
        x = x + self.down(F.gelu(self.up(x)))
        return self.head(x.mean(1))


@both
def test_attention_loses_whole_heads_and_ffn_neurons_exactly(capture_by):
    model = Attention()
    graph, chosen = exact_prune(model, torch.randn(2, 5, 32))
    assert model.q.out_features == model.k.out_features == model.v.out_features == model.o.in_features == 16
    assert model.up.out_features == model.down.in_features == 32
    assert model.o.out_features == 32  # the residual stream is combined with the input: kept


@both
def test_grouped_query_attention_prunes_whole_query_groups(capture_by):
    model = Attention(heads=4, kv_heads=2)
    exact_prune(model, torch.randn(2, 5, 32))
    assert model.k.out_features == model.v.out_features == 8  # one of two kv heads (of 8 features)
    assert model.q.out_features == model.o.in_features == 16  # ... and both query heads that read it


def test_iterative_steps_call_recovery_between_steps_and_reach_the_ratio():
    model = Residual()
    calls = []
    result = prune(model, ChannelPruningConfig(ratio=0.5, steps=3), torch.randn(2, 3, 8, 8),
                   recover=lambda m, step: calls.append((step, m.a[0].out_channels)))
    assert [step for step, _ in calls] == [1, 2]
    assert calls[0][1] > calls[1][1] > model.a[0].out_channels == 16  # 32 -> ... -> 16, a little each step
    assert result.removed_channels["a.0"] == 16


def test_taylor_importance_uses_gradients_and_a_latency_target_bisects_on_measured_latency(monkeypatch):
    from torchslim.pruning.channel import run as channel

    from torchslim.errors import InputError

    x = torch.randn(4, 3, 8, 8)
    model = Residual()
    with pytest.raises(InputError, match="taylor needs gradients"):
        prune(model, ChannelPruningConfig(importance="taylor"), x)
    model(x).pow(2).sum().backward()
    with torch.no_grad():
        model.a[0].weight.grad[:4] *= 1e6  # four channels with a huge first-order effect on the loss
    prune(model, ChannelPruningConfig(ratio=0.5, importance="taylor"), x)
    assert model.a[0].out_channels == 16
    assert int((model.a[0].weight.abs().flatten(1).sum(1) > 0).sum()) == 16
    # Latency is measured (never asserted in unit tests): stand in a clock proportional to MACs to check that
    # the bisection stops at the first ratio meeting the target.
    monkeypatch.setattr(channel, "_latency", lambda m, inputs: float(channel.count_macs(m, inputs[:1])))
    model = Residual()
    # round_to=1: exact widths (the default under a latency target, auto, is tested in test_widths.py)
    result = prune(model, ChannelPruningConfig(target_latency=0.6, round_to=1), torch.randn(16, 3, 8, 8))
    assert 0.5 <= result.macs_after / result.macs_before <= 0.6


def test_hugging_face_config_follows_the_pruned_ffn_and_save_pretrained_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torchslim.zoo import resolve_model

    bundle = resolve_model("builtin:minilm")
    encoder = bundle.model.encoder
    ids, mask = bundle.preprocess(["A sentence to capture the graph with.", "And another one."])
    result = prune(bundle.model, ChannelPruningConfig(ratio=0.5, skip=["*attention*"]), (ids, mask))
    assert encoder.config.intermediate_size == 768  # 1536 -> 768 in every layer
    assert encoder.encoder.layer[0].attention.self.query.out_features == 384
    assert result.macs_after < 0.75 * result.macs_before
    encoder.save_pretrained(tmp_path)
    reloaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(reloaded(input_ids=ids, attention_mask=mask).last_hidden_state, expected, atol=1e-5)


def test_hugging_face_head_pruning_is_reported_when_the_config_cannot_express_it():
    pytest.importorskip("transformers")
    from torchslim.zoo import resolve_model

    bundle = resolve_model("builtin:minilm")
    ids, mask = bundle.preprocess(["A sentence to capture the graph with."])
    result = prune(bundle.model, ChannelPruningConfig(ratio=0.5), (ids, mask))
    assert bundle.model.encoder.encoder.layer[0].attention.self.query.out_features == 192  # 12 -> 6 heads
    assert "torchslim.load" in result.skipped["encoder"]


def test_gpt2_loses_whole_heads_of_its_fused_qkv_and_ffn_neurons(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torchslim.zoo.hub import LogitsOnly

    def build():
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100)
        return LogitsOnly(transformers.GPT2LMHeadModel(config)).eval()

    model = build()
    x = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    result = prune(model, ChannelPruningConfig(ratio=0.5, skip=["*wte", "*wpe"]), x)
    attention = model.model.transformer.h[0].attn
    # Fused q/k/v: each of the three thirds loses the same whole heads; the split size and head count follow.
    assert attention.c_attn.nf == 3 * attention.split_size == 3 * 32 and attention.num_heads == 2
    assert model.model.transformer.h[0].mlp.c_fc.nf == 128 and model.model.config.n_inner == 128  # 256 -> 128
    assert result.macs_after < 0.7 * result.macs_before
    assert "torchslim.load" in result.skipped["model"]  # GPT-2's config derives the head size from n_embd / n_head
    save_pruned(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(torchslim.load(tmp_path, build())(*x), model(*x))


@both
def test_a_token_concatenated_from_a_parameter_keeps_the_width_it_shares(capture_by):
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.cls = nn.Parameter(torch.randn(1, 1, 16))
            self.up = nn.Linear(16, 32)
            self.down = nn.Linear(32, 16)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            y = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
            y = y + self.down(F.gelu(self.up(y)))
            return self.head(y[:, 0])

    model = Tokens()
    exact_prune(model, torch.randn(2, 5, 6))
    assert model.embed.out_features == 16 and model.up.out_features == 16
