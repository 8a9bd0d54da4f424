"""Structured pruning on grouped and transposed convolutions, GroupNorm, several inputs, outputs that are
tuples, dicts, dataclasses or Hugging Face ``ModelOutput``s, and Hugging Face models passed directly.

Exactness as in test_channel.py: silencing the chosen channels (zeroing every parameter slice they own)
and removing them must give the same outputs, on every output tensor.
"""

from __future__ import annotations

import pytest
import torch
from pruning_models import GroupedResNet, MultiInputNet, Transposed1d3d, UNet
from torch import nn

import torchslim
from torchslim.core.modules import output_tensors
from torchslim.graph import analyse_channels, capture
from torchslim.graph.trace import trace
from torchslim.measure.macs import count_macs
from torchslim.pruning.channel import ChannelPruningConfig, prune, remove_channels, save_pruned, select_channels

both = pytest.mark.parametrize("how", ["export", "trace"])


def run(model, x) -> list[torch.Tensor]:
    with torch.no_grad():
        return output_tensors(model(*x) if isinstance(x, tuple) else model(x))


def exact_prune(model: nn.Module, x, how: str, ratio: float = 0.5, recurrent: bool = False):
    """Prune at ``ratio``; every output of the pruned model equals the silenced original's. Returns the graph."""
    model.eval()
    args = x if isinstance(x, tuple) else (x,)
    program = capture(model, x, "export") if how == "export" else trace(model, args, "testing the tracer")
    graph = analyse_channels(program, recurrent, model)
    chosen = select_channels(model, graph, ChannelPruningConfig(ratio=ratio), ratio)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for (name, dim), ids in graph.param_ids.items():
            if name in parameters:
                mask = torch.tensor([r in chosen for r in graph.uf.roots(ids).tolist()])
                parameters[name].index_fill_(dim, torch.nonzero(mask).flatten(), 0.0)
    expected = run(model, x)
    remove_channels(model, graph, chosen)
    actual = run(model, x)
    assert [a.shape for a in actual] == [e.shape for e in expected]
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, atol=1e-5, rtol=1e-4)
    return graph


def randomise_norms(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    return model


def reloads_exactly(build, model, x, folder) -> bool:
    save_pruned(model, folder)
    fresh = torchslim.load(folder, build()).eval()
    return all(torch.equal(a, b) for a, b in zip(run(fresh, x), run(model, x)))


@both
def test_grouped_residual_blocks_lose_equal_widths_per_group_and_keep_their_groups(how, tmp_path):
    torch.manual_seed(0)
    model, x = randomise_norms(GroupedResNet()), torch.randn(2, 3, 16, 16)
    before = count_macs(model, x[:1])
    exact_prune(model, x, how)
    block = model.blocks[0]
    grouped = block.grouped[0]
    assert grouped.groups == 8 and grouped.in_channels == grouped.out_channels == block.reduce[0].out_channels
    assert grouped.out_channels in (32, 40)  # 64 -> 8 groups of 4 or 5: equal per group, groups kept
    assert block.se.reduce.out_channels == 8  # the squeeze-excite hidden width: 16 -> 8
    assert block.se.expand.out_channels == grouped.out_channels == block.expand[0].in_channels
    assert count_macs(model, x[:1]) < 0.45 * before
    torch.manual_seed(0)
    assert reloads_exactly(lambda: GroupedResNet(), model, x, tmp_path)


def test_grouped_convolution_on_a_fixed_input_still_loses_output_positions_per_group():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = nn.Conv2d(4, 12, 3, padding=1, groups=4)  # reads the model input: 4 channels stay
            self.out = nn.Conv2d(12, 2, 1)

        def forward(self, x):
            return self.out(torch.relu(self.grouped(x)))

    model = Net()
    exact_prune(model, torch.randn(2, 4, 8, 8), "export", ratio=0.34)
    assert (model.grouped.in_channels, model.grouped.out_channels, model.grouped.groups) == (4, 8, 4)
    assert model.grouped.weight.shape == (8, 1, 3, 3) and model.out.in_channels == 8


@both
def test_unet_transposed_convolutions_lose_input_and_output_channels(how, tmp_path):
    torch.manual_seed(0)
    model, x = randomise_norms(UNet(group_norm=False)), torch.randn(2, 3, 16, 16)
    before = count_macs(model, x[:1])
    exact_prune(model, x, how)
    up1, up2 = model.up1, model.up2
    assert (up1.in_channels, up1.out_channels) == (16, 8)  # 32 -> 16 in (dec2's output), 16 -> 8 out
    assert up1.weight.shape[:2] == (16, 8) and model.dec1[0].in_channels == 16  # cat [up1, enc1]: 8 + 8
    assert up2.groups == 2 and up2.in_channels == 32 and up2.out_channels == 16 and up2.weight.shape[:2] == (32, 8)
    assert model.out.out_channels == 2
    assert count_macs(model, x[:1]) < 0.3 * before
    torch.manual_seed(0)
    assert reloads_exactly(lambda: UNet(group_norm=False), model, x, tmp_path)


def test_group_norm_keeps_its_groups_and_loses_equal_widths_per_group(tmp_path):
    # Not an exactness check: a silenced channel still counts in its group's mean and variance.
    torch.manual_seed(0)
    model, x = randomise_norms(UNet()), torch.randn(2, 3, 16, 16)
    result = prune(model, ChannelPruningConfig(ratio=0.5), x)
    norm = model.enc1[1]
    assert (norm.num_channels, norm.num_groups, tuple(norm.weight.shape)) == (8, 4, (8,))
    assert run(model, x)[0].shape == (2, 2, 16, 16) and result.macs_after < 0.3 * result.macs_before
    torch.manual_seed(0)
    assert reloads_exactly(lambda: UNet(), model, x, tmp_path)


@both
def test_transposed_1d_and_grouped_3d_with_two_inputs_and_a_tuple_output(how, tmp_path):
    torch.manual_seed(0)
    model, x = Transposed1d3d(), (torch.randn(2, 4, 16), torch.randn(2, 2, 4, 4, 4))
    exact_prune(model, x, how)
    assert (model.t1.in_channels, model.t1.out_channels) == (8, 6) and model.o1.in_channels == 6
    # 8 -> 4 in; 12 out = 4 groups of 3 -> 4 groups of 1 (3 per-group positions, 2 removed)
    assert (model.t3.in_channels, model.t3.out_channels, model.t3.groups) == (4, 4, 4)
    assert model.t3.weight.shape[:2] == (4, 1) and model.o3.in_channels == 4  # (in, out / groups)
    torch.manual_seed(0)
    assert reloads_exactly(lambda: Transposed1d3d(), model, x, tmp_path)


@both
def test_a_dataclass_of_dicts_and_tuples_is_checked_on_every_tensor(how, tmp_path):
    torch.manual_seed(0)
    model, x = MultiInputNet(), (torch.randn(2, 3, 8, 8), torch.randn(2, 7))
    shapes = [t.shape for t in run(model.eval(), x)]
    result = prune(model, ChannelPruningConfig(ratio=0.5, capture=how), x)
    assert [t.shape for t in run(model, x)] == shapes and len(shapes) == 4
    assert model.vector[0].out_features == 16 and model.vector[2].out_features == 8
    assert model.image[0].out_channels == 12 and model.image[3].out_channels == 32  # summed into an output: kept
    assert model.mix[0].in_features == 40 and model.mix[0].out_features == 64  # also summed into an output
    assert result.macs_after < 0.6 * result.macs_before
    torch.manual_seed(0)
    assert reloads_exactly(lambda: MultiInputNet(), model, x, tmp_path)


def test_a_fixed_size_split_blocks_only_its_block_and_the_report_names_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 1)
            self.b = nn.Conv2d(16, 32, 1)
            self.c = nn.Conv2d(8, 4, 1)
            self.d = nn.Conv2d(24, 4, 1)

        def forward(self, x):
            first, rest = torch.split(self.b(torch.relu(self.a(x))), [8, 24], dim=1)
            return self.c(first) + self.d(rest)

    model = Net()
    result = prune(model, ChannelPruningConfig(ratio=0.5), torch.randn(2, 3, 8, 8))
    assert model.a.out_channels == 8 and model.b.out_channels == 32  # only the split's channels stay
    assert "split into fixed sizes" in " ".join(result.skipped.values())


def _tiny_hf(family: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=32)
        return transformers.BertModel(config).eval()
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                          use_cache=False)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=8)
    return transformers.ViTModel(config).eval()


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_a_hugging_face_model_passed_directly_round_trips_through_from_pretrained(family, tmp_path):
    model = _tiny_hf(family)
    x = (torch.randint(0, 100, (2, 8)),) if family == "llama" else (torch.randn(2, 3, 16, 16),)
    outputs = len(run(model, x))
    result = prune(model, ChannelPruningConfig(ratio=0.5), x)
    assert not [v for v in result.skipped.values() if "torchslim.load" in v]
    assert model.config.intermediate_size == 32 and model.config.num_attention_heads == 2
    assert result.macs_after < 0.75 * result.macs_before
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    pruned, again = run(model, x), run(reloaded, x)
    assert len(pruned) == outputs and all(torch.equal(a, b) for a, b in zip(pruned, again))


def test_a_bert_model_output_is_pruned_and_the_config_that_cannot_express_its_heads_is_reported(tmp_path):
    model = _tiny_hf("bert")
    x = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    result = prune(model, ChannelPruningConfig(ratio=0.5), x)
    assert [t.shape for t in run(model, x)] == [(2, 8, 32), (2, 32)]  # last_hidden_state and pooler_output
    assert model.config.intermediate_size == 32 and model.encoder.layer[0].attention.self.query.out_features == 16
    note = result.skipped["model"]
    assert "hidden_size=32 / num_attention_heads" in note and "encoder.layer.0.attention.self.query.weight" in note
    torch.manual_seed(0)
    assert reloads_exactly(lambda: _tiny_hf("bert"), model, x, tmp_path)


class Attention(nn.Module):
    """nn.MultiheadAttention between two Linear layers; returns its (output, averaged weights) tuple."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        y = self.embed(x)
        out, weights = self.attn(y, y, y)
        return self.head(torch.relu(out)), weights


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_loses_positions_in_every_head_and_runs_its_own_forward(batch_first, tmp_path):
    torch.manual_seed(0)
    model, x = Attention(batch_first), torch.randn(2, 5, 6) if batch_first else torch.randn(5, 2, 6)
    exact_prune(model, x, "trace")  # the query rows are rescaled: the softmax sees the same logits
    attn = model.attn
    assert (attn.embed_dim, attn.num_heads, attn.head_dim, attn.kdim) == (16, 4, 4, 16)
    assert attn.in_proj_weight.shape == (48, 16) and attn.out_proj.weight.shape == (16, 16)
    assert model.embed.out_features == 16 and model.head.in_features == 16
    with torch.no_grad():  # the fused inference path (batch_first, no grad) reads the same attributes
        assert run(model, x)[0].shape == ((2, 5, 3) if batch_first else (5, 2, 3))
    torch.manual_seed(0)
    assert reloads_exactly(lambda: Attention(batch_first), model, x, tmp_path)


def test_transformer_encoder_prunes_its_width_and_ffn_and_counts_the_fused_path(tmp_path):
    def build():
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        return nn.Sequential(nn.Linear(8, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                             nn.Linear(32, 3)).eval()

    model, x = build(), torch.randn(2, 5, 8)
    result = prune(model, ChannelPruningConfig(ratio=0.5), x)
    layer = model[1].layers[0]
    assert (layer.self_attn.embed_dim, layer.self_attn.head_dim, layer.linear1.out_features) == (16, 4, 32)
    assert layer.norm1.normalized_shape == (16,) and run(model, x)[0].shape == (2, 5, 3)
    assert 0.2 < result.macs_after / result.macs_before < 0.3
    assert reloads_exactly(build, model, x, tmp_path)


def test_tied_weights_stay_tied_when_a_pruned_model_is_reloaded(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 16)
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
            self.head = nn.Linear(16, 20, bias=False)
            self.head.weight = self.embed.weight  # an LM head sharing the embedding

        def forward(self, ids):
            x = self.embed(ids)
            return self.head(x + self.down(torch.relu(self.up(x))))

    def build():
        torch.manual_seed(0)
        return Tied().eval()

    model, ids = build(), torch.randint(0, 20, (2, 6))
    prune(model, ChannelPruningConfig(ratio=0.5), ids)
    assert model.embed.weight.shape == (20, 8) and model.head.weight is model.embed.weight
    save_pruned(model, tmp_path)
    fresh = torchslim.load(tmp_path, build())
    assert fresh.head.weight is fresh.embed.weight and torch.equal(fresh(ids), model(ids))


class Recurrent(nn.Module):
    """A 2-layer bidirectional LSTM (batch first) into a GRU, between Linear layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.lstm = nn.LSTM(16, 12, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(24, 10, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        y, _ = self.lstm(torch.relu(self.embed(x)))
        z, _ = self.gru(y)
        return self.head(z[:, -1])


@both
def test_lstm_and_gru_hidden_sizes_are_pruned_across_gates_layers_and_directions_when_allowed(how, tmp_path):
    torch.manual_seed(0)
    model, x = Recurrent(), torch.randn(2, 5, 6)
    before = count_macs(model, x[:1])
    exact_prune(model, x, how, recurrent=True)
    assert (model.lstm.input_size, model.lstm.hidden_size, model.gru.input_size, model.gru.hidden_size) == (8, 6, 12, 5)
    assert model.lstm.weight_ih_l1.shape == (24, 12) and model.lstm.weight_hh_l0_reverse.shape == (24, 6)
    assert model.gru.weight_hh_l0.shape == (15, 5) and model.head.in_features == 5
    assert count_macs(model, x[:1]) < 0.35 * before
    torch.manual_seed(0)
    assert reloads_exactly(Recurrent, model, x, tmp_path)


def test_recurrent_layers_stay_unless_allowed_and_the_report_says_how():
    model, x = Recurrent(), torch.randn(2, 5, 6)
    result = prune(model, ChannelPruningConfig(ratio=0.5), x)
    assert model.lstm.hidden_size == 12 and model.gru.hidden_size == 10 and model.embed.out_features == 16
    assert "ChannelPruningConfig.recurrent allows it" in result.skipped["lstm"]


class ConvLSTM(nn.Module):
    """A convolutional LSTM whose state is ``x.new_zeros(b, self.hidden, h, w)`` in the root's forward."""

    def __init__(self, hidden: int = 12):
        super().__init__()
        self.hidden = hidden
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gates = nn.Conv2d(8 + hidden, 4 * hidden, 3, padding=1)
        self.head = nn.Linear(hidden, 5)

    def forward(self, clip):
        b, t, _, h, w = clip.shape
        state = cell = clip.new_zeros(b, self.hidden, h, w)
        for step in range(t):
            i, f, g, o = self.gates(torch.cat([torch.relu(self.stem(clip[:, step])), state], 1)).chunk(4, 1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            state = torch.sigmoid(o) * torch.tanh(cell)
        return self.head(state.mean((2, 3)))


class Cell(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(channels + hidden, 4 * hidden, 3, padding=1)

    def forward(self, x, state=None):
        if state is None:
            zeros = torch.zeros(x.shape[0], self.hidden, x.shape[2], x.shape[3], dtype=x.dtype)
            state = (zeros, zeros)
        i, f, g, o = self.gates(torch.cat([x, state[0]], 1)).chunk(4, 1)
        cell = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(cell), cell


class CellLSTM(nn.Module):
    """The same with the state built by ``torch.zeros(b, self.hidden, ...)`` inside a cell module."""

    def __init__(self, hidden: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.cell = Cell(8, hidden)
        self.head = nn.Linear(hidden, 5)

    def forward(self, clip):
        state = None
        for step in range(clip.shape[1]):
            state = self.cell(torch.relu(self.stem(clip[:, step])), state)
        return self.head(state[0].mean((2, 3)))


@both
@pytest.mark.parametrize("build", [ConvLSTM, CellLSTM])
def test_a_state_sized_by_a_module_attribute_is_pruned_and_the_attribute_follows(build, how, tmp_path):
    torch.manual_seed(0)
    model, x = build(), torch.randn(2, 3, 3, 8, 8)
    before = count_macs(model, x[:1])
    exact_prune(model, x, how)
    owner = model if build is ConvLSTM else model.cell
    gates = owner.gates
    assert owner.hidden == 6 and gates.out_channels == 24 and gates.in_channels == 4 + 6
    assert model.stem.out_channels == 4 and model.head.in_features == 6
    # gates: 3x3 over (8 + 12) -> 48 channels at 8x8 for 3 steps dominate: about a quarter of them remain
    assert count_macs(model, x[:1]) / before == pytest.approx(0.256, abs=0.005)
    torch.manual_seed(1)
    assert reloads_exactly(build, model, x, tmp_path)


def test_a_state_of_a_written_size_keeps_the_channels_it_meets():
    class Written(ConvLSTM):  # the size is a literal; self.hidden holds the same number
        def forward(self, clip):
            b, t, _, h, w = clip.shape
            state = cell = torch.zeros(b, 12, h, w)
            for step in range(t):
                i, f, g, o = self.gates(torch.cat([torch.relu(self.stem(clip[:, step])), state], 1)).chunk(4, 1)
                cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
                state = torch.sigmoid(o) * torch.tanh(cell)
            return self.head(state.mean((2, 3)))

    class Unnamed(Written):  # no attribute holds 12
        def __init__(self):
            super().__init__()
            del self.hidden

    class Ambiguous(ConvLSTM):  # two attributes hold 12: which one sizes the state cannot be told
        def __init__(self):
            super().__init__()
            self.classes = 12

    reasons = {Written: ("zeros", "a size written in the model's code (a reshape, split or new tensor)"),
               Unnamed: ("mul", "combined with zeros, whose channels cannot change"),
               Ambiguous: ("mul", "combined with new_zeros, whose channels cannot change")}
    for build, (layer, reason) in reasons.items():
        model, x = build(), torch.randn(2, 3, 3, 8, 8)
        result = prune(model, ChannelPruningConfig(ratio=0.5), x)
        assert getattr(model, "hidden", 12) == 12 and model.gates.out_channels == 48
        assert model.stem.out_channels == 4 and model.gates.in_channels == 16
        assert result.skipped[layer] == reason
        assert "_torchslim_size_attributes" not in vars(model)


def test_a_saved_attribute_the_fresh_model_lacks_is_one_clear_error(tmp_path):
    from torchslim.errors import ArtifactError
    from torchslim.pruning.channel.surgery import set_size_attributes

    model = ConvLSTM()
    set_size_attributes(model, {"hidden": 6}, "m.json")
    assert model.hidden == 6 and model._torchslim_size_attributes == {"hidden": 6}
    with pytest.raises(ArtifactError, match=r"^m.json: attributes: the model has no integer attribute 'stem.hidden'"):
        set_size_attributes(ConvLSTM(), {"stem.hidden": 6}, "m.json")
    with pytest.raises(ArtifactError, match=r"'hidden' must be an integer >= 1, got 0"):
        set_size_attributes(ConvLSTM(), {"hidden": 0}, "m.json")


def test_regnet_grouped_convolutions_are_pruned_to_a_macs_target_keeping_their_groups():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = torchvision.models.regnet_x_400mf().eval(), torch.randn(1, 3, 64, 64)
    groups = {name: m.groups for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    result = prune(model, ChannelPruningConfig(target_macs=0.5), x)
    assert 0.48 <= result.macs_after / result.macs_before <= 0.5
    convs = dict(model.named_modules())
    assert len(groups) == 22 and {name: convs[name].groups for name in groups} == groups
    for name in groups:  # 16 channels per group before; equal widths per group after
        conv = convs[name]
        assert conv.in_channels == conv.out_channels and conv.weight.shape[0] == conv.out_channels
        assert conv.out_channels % conv.groups == 0 and conv.out_channels // conv.groups < 16
    assert model(x).shape == (1, 1000)
