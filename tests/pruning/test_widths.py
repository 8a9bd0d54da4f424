"""Latency-aware widths (``round_to: auto``): each group keeps the width its latency table says is fastest near the
exact one. A fake timer stands in for the clock (no timed assertions): layers whose channel counts are multiples
of 16 cost half, as a CPU's blocked kernels may make them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchslim._config import FieldError, from_dict
from torchslim.graph import analyse_channels, capture
from torchslim.measure.layer_latency import LatencyTable, LayerShape
from torchslim.pruning.channel import ChannelPruningConfig, prune, select_channels
from torchslim.pruning.channel import run as channel_run
from torchslim.pruning.channel.widths import BAND, candidate_widths


class Net(nn.Module):
    """A stem, an inverted-residual block (expand, depthwise, project, added to the stream), a plain conv and a
    classifier: widths 64, 96 (expanded), 128."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(64, 96, 1), nn.BatchNorm2d(96), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(96, 96, 3, padding=1, groups=96), nn.BatchNorm2d(96), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(96, 64, 1), nn.BatchNorm2d(64))
        self.conv = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.project(self.depthwise(self.expand(y)))
        return self.head(self.conv(y).mean((2, 3)))


def _work(shape: LayerShape) -> int:
    """The fake clocks' measure of a layer: batch x channels in x out (per group) x input positions."""
    spatial = math.prod(shape.input_shape[2:]) if shape.kind == "conv" else 1
    return shape.input_shape[0] * shape.in_channels * shape.out_channels // dict(shape.options).get("groups", 1) \
        * spatial


class SixteenIsCheap:
    """A deterministic clock: MACs of the layer's shape, halved-ish for channel counts that are multiples of 16;
    counts its calls."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, shape: LayerShape) -> float:
        self.calls.append(shape.key())
        blocked = (0.7 if shape.in_channels % 16 == 0 else 1.0) * (0.7 if shape.out_channels % 16 == 0 else 1.0)
        return _work(shape) * blocked * 1e-6


def model_and_input():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(1, 3, 16, 16)


@pytest.fixture(autouse=True)
def _fake_whole_model_clock(monkeypatch):
    """The report's measured latency (whole model) runs the real clock: a MACs count stands in, so tests are
    fast and deterministic."""
    monkeypatch.setattr(channel_run, "_latency",
                        lambda m, inputs: float(channel_run.count_macs(m, inputs)) * 1e-6)


def test_chosen_widths_are_the_cheap_multiples_of_16_within_the_band(tmp_path):
    model, x = model_and_input()
    timer = SixteenIsCheap()
    result = prune(model, ChannelPruningConfig(ratio=0.3, round_to="auto"), x,
                   latency_table=LatencyTable(tmp_path / "table.json", timer))
    assert set(result.widths) == {"stem.0", "expand.0", "conv.0"}  # the stream, the block's hidden width, conv
    for group, choice in result.widths.items():
        assert choice["exact"] == choice["channels"] - round(0.3 * choice["channels"])
        assert choice["chosen"] % 16 == 0, (group, choice)
        assert abs(choice["chosen"] - choice["exact"]) <= BAND * choice["exact"]
        assert choice["chosen_ms"] < choice["exact_ms"]
    # 64 -> exact 45: 48 (above the exact width) costs less per channel (and in all) than 40 or 45
    assert result.widths["stem.0"]["chosen"] == 48
    assert model.stem[0].out_channels == model.project[0].out_channels == model.conv[0].in_channels == 48
    # the depthwise convolution follows its group's width and stays depthwise
    hidden = result.widths["expand.0"]["chosen"]
    assert model.depthwise[0].in_channels == model.depthwise[0].out_channels == model.depthwise[0].groups == hidden
    assert model.head.in_features == result.widths["conv.0"]["chosen"]
    assert model(x).shape == (1, 10)
    latency = result.latency
    assert latency["predicted_ms_after"] < latency["predicted_ms_before"]
    assert latency["measured_ms_after"] < latency["measured_ms_before"]
    assert latency["batch_size"] == 1 and latency["layers_timed"] == len(set(timer.calls))


def test_a_second_run_reads_every_latency_from_the_cache(tmp_path):
    first = SixteenIsCheap()
    model, x = model_and_input()
    one = prune(model, ChannelPruningConfig(ratio=0.3, round_to="auto"), x,
                latency_table=LatencyTable(tmp_path / "table.json", first))
    assert first.calls and len(first.calls) == 5 * len(set(first.calls))  # five interleaved rounds per new shape
    again = SixteenIsCheap()
    model, x = model_and_input()
    table = LatencyTable(tmp_path / "table.json", again)
    two = prune(model, ChannelPruningConfig(ratio=0.3, round_to="auto"), x, latency_table=table)
    assert again.calls == [] and table.measured == 0
    assert two.widths == one.widths


def test_a_latency_target_defaults_to_auto_and_an_explicit_number_wins(tmp_path, monkeypatch):
    assert ChannelPruningConfig(target_latency=0.5).rounding == "auto"
    assert ChannelPruningConfig(target_latency=0.5, round_to=1).rounding == 1
    assert ChannelPruningConfig(ratio=0.3).rounding == 1
    assert ChannelPruningConfig(round_to=8, target_macs=0.5).rounding == 8
    timer = SixteenIsCheap()
    model, x = model_and_input()
    result = prune(model, ChannelPruningConfig(target_latency=0.6), x,
                   latency_table=LatencyTable(tmp_path / "table.json", timer))
    assert timer.calls and result.widths and result.latency["measured_ms_after"] <= 0.6 * \
        result.latency["measured_ms_before"]

    def refuse(shape):
        raise AssertionError("an explicit round_to times nothing")

    model, x = model_and_input()
    result = prune(model, ChannelPruningConfig(target_latency=0.6, round_to=8), x,
                   latency_table=LatencyTable(tmp_path / "other.json", refuse))
    assert result.widths == {} and result.latency == {}
    assert model.stem[0].out_channels % 8 == 0 and model.expand[0].out_channels % 8 == 0


def test_a_macs_target_with_auto_widths_still_meets_the_target(tmp_path):
    """The bisection lands under the target (the table's choices move widths in steps); the fill grows groups
    back by multiples of 8 while the target holds."""
    model, x = model_and_input()
    result = prune(model, ChannelPruningConfig(target_macs=0.5, round_to="auto"), x,
                   latency_table=LatencyTable(tmp_path / "table.json", SixteenIsCheap()))
    assert 0.47 <= result.macs_after / result.macs_before <= 0.5
    chosen = {group: choice["chosen"] for group, choice in result.widths.items()}
    assert chosen == {"stem.0": 40, "expand.0": 64, "conv.0": 104}
    # conv.0 grew past the band of the ratio's width (81): the fill, not the choice among candidates
    assert result.widths["conv.0"]["exact"] == 81 and 104 > 81 * (1 + BAND)
    # expand's 64 (a multiple of 16) costs less than its exact 61
    assert result.widths["expand.0"]["chosen_ms"] < result.widths["expand.0"]["exact_ms"]


def test_equal_costs_keep_the_widest_candidate(tmp_path):
    """A clock that sees no difference between widths (every layer costs the same, all overhead): the widest
    candidate costs least per channel, so each group keeps it (a multiple of 8 within the band, or the exact
    width)."""
    model, x = model_and_input()
    result = prune(model, ChannelPruningConfig(ratio=0.3, round_to="auto"), x,
                   latency_table=LatencyTable(tmp_path / "table.json", lambda shape: 1.0))
    for choice in result.widths.values():
        widest = min(choice["channels"], math.floor(choice["exact"] * (1 + BAND)))
        assert choice["chosen"] == max(candidate_widths(choice["exact"], 1, widest))
    assert [c["chosen"] for c in result.widths.values()] == [48, 72, 96]  # exact 45, 67, 90


def test_candidates_are_the_exact_width_and_the_nearest_multiples_of_8_to_64_within_the_band():
    assert candidate_widths(61, 54, 68) == [56, 61, 64]
    assert candidate_widths(1434, 1262, 1606) == [1408, 1424, 1432, 1434, 1440, 1472]
    assert candidate_widths(5, 4, 5) == [5]
    assert candidate_widths(64, 57, 71) == [64]


def test_bad_round_to_values_are_clear_field_errors():
    with pytest.raises(FieldError, match=r"round_to: expected int \| 'auto' \| null, got 'autoo', did you mean 'auto'"):
        from_dict(ChannelPruningConfig, {"round_to": "autoo"})
    with pytest.raises(FieldError, match="round_to: must be an integer >= 1 or 'auto', got 0"):
        from_dict(ChannelPruningConfig, {"round_to": 0})
    with pytest.raises(FieldError, match="round_to"):
        from_dict(ChannelPruningConfig, {"round_to": True})
    assert from_dict(ChannelPruningConfig, {"round_to": "auto"}).rounding == "auto"


@pytest.mark.parametrize("value, message", [
    ("autoo", "steps[0].prune.round_to: expected int | 'auto' | null, got 'autoo', did you mean 'auto'?"),
    ("0", "steps[0].prune.round_to: must be an integer >= 1 or 'auto', got 0"),
])
def test_a_recipe_with_a_bad_round_to_names_file_step_and_field(tmp_path, value, message):
    from torchslim.errors import InputError
    from torchslim.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n"
                    f"  - prune: {{method: channel, target_latency: 0.5, round_to: {value}}}\n")
    with pytest.raises(InputError) as error:
        load_recipe(path)
    assert str(path) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)


def test_select_channels_with_auto_needs_a_table():
    model, x = model_and_input()
    graph = analyse_channels(capture(model, x))
    with pytest.raises(ValueError, match="round_to: auto chooses widths from a latency table"):
        select_channels(model, graph, ChannelPruningConfig(ratio=0.3, round_to="auto"), 0.3)


def test_a_groups_candidates_are_timed_together_in_rotated_rounds_when_the_machine_is_busy(tmp_path):
    """Bisection asks a group for new widths. On a quiet machine only the new candidates are timed (clean
    entries are comparable across sessions); on a busy one every candidate is timed again in the same session,
    so load drifting between two asks favours none of them."""
    from torchslim.pruning.channel.groups import dependency_groups
    from torchslim.pruning.channel.widths import LatencyWidths, layer_inputs

    model, x = model_and_input()
    graph = analyse_channels(capture(model, x))
    stream = next(g for g in dependency_groups(graph, []) if g.modules[0] == "stem.0")
    timer, load = SixteenIsCheap(), [0.5]
    table = LatencyTable(tmp_path / "table.json", timer, rounds=2, load=lambda: load[0], cores=2)
    widths = LatencyWidths(model, graph, {}, layer_inputs(model, x), table)
    assert stream.size - widths.removal(stream, 19, 64) == 48  # keep 45: candidates 40, 45, 48
    assert len(timer.calls) == 2 * 3 * 4  # two rounds of 3 widths x 4 layers (stem, expand, project; conv reads)
    widths.removal(stream, 14, 64)  # keep 50: candidates 48 (clean, timed above), 50, 56
    assert len(timer.calls) == 24 + 2 * 2 * 4  # only 50's and 56's shapes
    load[0] = 3.0
    widths.removal(stream, 11, 64)  # keep 53: candidates 48, 53, 56, timed now under load
    session = timer.calls[40:]
    assert len(session) == 2 * 3 * 4 and len(set(session)) == 12  # 48's and 56's shapes timed again with 53's
    assert session[12:] == session[1:12] + session[:1]  # the second round starts one shape later
    widths.removal(stream, 19, 64)
    assert len(timer.calls) == 64  # an ask answered before times nothing


def test_the_report_counts_provisional_entries_and_a_quiet_run_retimes_them(tmp_path):
    model, x = model_and_input()
    config = ChannelPruningConfig(ratio=0.3, round_to="auto")
    busy = LatencyTable(tmp_path / "table.json", SixteenIsCheap(), load=lambda: 3.0, cores=2)
    one = prune(model, config, x, latency_table=busy).latency
    assert one["layers_timed"] > 0 and one["layers_provisional"] == len(busy.used) == 37
    assert (one["layers_retimed"], one["load_max"]) == (0, 3.0)
    model, x = model_and_input()
    timer = SixteenIsCheap()
    quiet = LatencyTable(tmp_path / "table.json", timer, load=lambda: 0.5, cores=2)
    two = prune(model, config, x, latency_table=quiet)
    assert (two.latency["layers_retimed"], two.latency["layers_provisional"]) == (37, 0)
    assert two.latency["layers_timed"] == len(set(timer.calls)) == 37 and two.latency["load_max"] == 0.5
    model, x = model_and_input()
    three = prune(model, config, x, latency_table=LatencyTable(tmp_path / "table.json", SixteenIsCheap(),
                                                               load=lambda: 0.5, cores=2))
    assert (three.latency["layers_timed"], three.latency["layers_provisional"], three.latency["layers_retimed"]) == \
        (0, 0, 0)
    assert three.widths == two.widths


class GroupedNet(nn.Module):
    """A stem and two residual blocks of RegNetX's shape: 1x1 expand, a 3x3 convolution of 4 groups of 16
    channels, 1x1 project added to the stream; a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 32, 1), nn.BatchNorm2d(32)) for _ in range(2))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        y = self.stem(x)
        for block in self.blocks:
            y = torch.relu(y + block(y))
        return self.head(y.mean((2, 3)))


def eight_per_group_is_cheap(shape: LayerShape) -> float:
    """MACs of the shape, a fifth of them for a grouped convolution of 8 channels per group (a kernel that
    suits the CPU's vectors), as measured for RegNetX's 3x3 convolutions at batch 32."""
    groups = dict(shape.options).get("groups", 1)
    return _work(shape) * (0.2 if groups > 1 and (shape.in_channels // groups) % 8 == 0 else 1.0) * 1e-6


def test_a_grouped_width_moves_to_the_cheap_multiple_of_8_and_the_fill_brings_the_macs_back_to_the_target(
        tmp_path, monkeypatch):
    """16 channels per group asked to keep 11 (outside the 12% band of 8): the nearest multiples of 8 are
    candidates too, and 8 is far cheaper per channel. Both blocks move to 8 at one ratio, far under a MACs
    target of 0.5; the fill grows groups back (least table latency per MAC first) to just under it."""
    from torchslim.pruning.channel import select

    def pruned(fill: bool):
        torch.manual_seed(0)
        model, x = GroupedNet().eval(), torch.randn(1, 3, 16, 16)
        if not fill:
            monkeypatch.setattr(channel_run, "fill_to_target", lambda *args, **kwargs: 0)
        result = prune(model, ChannelPruningConfig(target_macs=0.5, round_to="auto"), x,
                       latency_table=LatencyTable(tmp_path / "table.json", eight_per_group_is_cheap))
        monkeypatch.setattr(channel_run, "fill_to_target", select.fill_to_target)
        assert model(x).shape == (1, 10)
        return model, result

    unfilled, bare = pruned(fill=False)
    filled, result = pruned(fill=True)
    # at the bisection's ratio every grouped width is at 8 per group (asked 8 to 16), 0.26 of the MACs
    assert [tuple(b[3].weight.shape[:2]) for b in unfilled.blocks] == [(32, 8), (32, 8)]
    assert bare.macs_after / bare.macs_before == pytest.approx(0.2635, abs=1e-3)
    assert bare.macs_after < result.macs_after <= 0.5 * result.macs_before
    assert result.macs_after / result.macs_before == pytest.approx(0.4707, abs=1e-3)
    # the fill grew the grouped convolutions' inputs back to 16 per group (still a multiple of 8 for this clock,
    # 5x cheaper per MAC than the stream's 17 -> 24) and kept their outputs at 8 per group
    assert [tuple(b[3].weight.shape[:2]) for b in filled.blocks] == [(32, 16), (32, 16)]
    assert filled.stem[0].out_channels == unfilled.stem[0].out_channels == 17
    assert [result.widths[f"blocks.{i}.0"]["chosen"] for i in (0, 1)] == [16, 16]


def test_the_bisection_looks_below_a_neighbourhood_that_already_meets_the_target():
    from torchslim.pruning.channel import importance
    from torchslim.pruning.channel.select import AROUND, bisect_ratio
    from torchslim.measure.macs import count_macs

    model, x = model_and_input()
    config = ChannelPruningConfig(target_macs=0.9)
    graph = analyse_channels(capture(model, x))
    scores = importance.score(model, graph, config)
    goal = 0.9 * count_macs(model, x)
    reached = lambda trial: count_macs(trial, x) <= goal  # noqa: E731
    free = bisect_ratio(model, graph, config, scores, reached)
    assert free < 0.1
    assert bisect_ratio(model, graph, config, scores, reached, around=0.5) == pytest.approx(free, abs=0.02)
    assert 0.5 - AROUND > 0.3  # the neighbourhood of 0.5 lies far above the answer


def test_shape_macs_agrees_with_the_model_count():
    from torchslim.measure.macs import count_macs
    from torchslim.pruning.channel.widths import shape_macs

    layers = [(nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4), (2, 16, 15, 15)),
              (nn.Conv1d(8, 8, 5, dilation=2), (1, 8, 40)),
              (nn.Linear(24, 12), (3, 7, 24)),
              (nn.ConvTranspose2d(8, 4, 2, stride=2), (1, 8, 6, 6))]
    for module, shape in layers:
        assert shape_macs(LayerShape.of(module, shape)) == count_macs(module, torch.randn(shape)), module


class TwoScales(nn.Module):
    """Two convolutions at 32x32 with few channels, then two at 8x8 with many (a CNN's stages in small)."""

    def __init__(self):
        super().__init__()
        self.high = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.low = nn.Sequential(nn.Conv2d(32, 64, 3, stride=4, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                 nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.low(self.high(x)).mean((2, 3)))


def memory_bound(shape: LayerShape) -> float:
    """A clock where moving the activations costs more than computing on them: the input's and output's
    elements (at the input's positions) plus a tenth of the MACs, as 1x1 convolutions on large feature maps
    behave on a CPU."""
    positions = shape.input_shape[0] * math.prod(shape.input_shape[2:])
    return ((shape.in_channels + shape.out_channels) * positions + 0.1 * _work(shape)) * 1e-6


def test_reallocate_moves_macs_from_the_large_feature_maps_and_predicts_less_time_at_the_same_macs(tmp_path):
    def pruned(reallocate: float):
        torch.manual_seed(0)
        model, x = TwoScales().eval(), torch.randn(1, 3, 32, 32)
        config = ChannelPruningConfig(target_macs=0.5, round_to="auto", reallocate=reallocate)
        result = prune(model, config, x, latency_table=LatencyTable(tmp_path / "table.json", memory_bound))
        assert model(x).shape == (1, 10)
        return model, result

    uniform, even = pruned(0.0)
    moved, result = pruned(0.3)
    for r in (even, result):
        assert r.macs_after <= 0.5 * r.macs_before
    def widths(m):
        return [m.high[0].out_channels, m.high[3].out_channels, m.low[0].out_channels, m.low[3].out_channels]

    # uniform: every group keeps about 0.69 of its channels (22 of 32, 43 of 64)
    assert widths(uniform) == [22, 22, 43, 43]
    assert even.macs_after / even.macs_before == pytest.approx(0.4959, abs=1e-3)
    # reallocated: the 32x32 layers keep 16 (0.5, within 0.3 of the uniform ratio), the 8x8 ones grew back (the
    # last to all 64), at fewer MACs still (the next step up, 16 -> 24 at 32x32, would pass the target)
    assert widths(moved) == [16, 16, 40, 64]
    assert result.macs_after / result.macs_before == pytest.approx(0.4656, abs=1e-3)
    # and the table predicts 0.74 of the uniform model's time
    assert even.latency["predicted_ms_after"] == pytest.approx(0.308, abs=1e-3)
    assert result.latency["predicted_ms_after"] == pytest.approx(0.229, abs=1e-3)


def test_reallocate_needs_a_macs_target_and_auto_widths():
    with pytest.raises(FieldError, match="reallocate: moves MACs by a latency table under a MACs target"):
        ChannelPruningConfig(ratio=0.3, round_to="auto", reallocate=0.2)
    with pytest.raises(FieldError, match="reallocate"):
        ChannelPruningConfig(target_macs=0.5, round_to=8, reallocate=0.2)
    with pytest.raises(FieldError, match=r"reallocate: must be in \[0, 1\)"):
        ChannelPruningConfig(target_macs=0.5, round_to="auto", reallocate=1.5)
    assert ChannelPruningConfig(target_macs=0.5, round_to="auto", reallocate=0.2).reallocate == 0.2
