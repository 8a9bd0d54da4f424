"""The latency table of single layers: layer shapes follow new channel counts, new shapes are timed in
interleaved rounds (the least kept), entries are cached on disk per machine and read back without timing. The
timer is injected (no timed assertions)."""

from __future__ import annotations

import json

from torch import nn

from torchslim.measure import LatencyTable, LayerShape


def test_layer_shapes_follow_new_channel_counts():
    depthwise = LayerShape.of(nn.Conv2d(96, 96, 3, groups=96), (2, 96, 8, 8), out_channels=80)
    assert (depthwise.in_channels, depthwise.out_channels, dict(depthwise.options)["groups"]) == (80, 80, 80)
    assert depthwise.input_shape == (2, 80, 8, 8)
    grouped = nn.Conv2d(64, 64, 3, groups=4)
    assert LayerShape.of(grouped, (1, 64, 8, 8), in_channels=48).in_channels == 48
    assert LayerShape.of(grouped, (1, 64, 8, 8), in_channels=50) is None  # 4 groups cannot split 50 channels
    linear = LayerShape.of(nn.Linear(128, 10), (4, 7, 128), in_channels=96)
    assert linear.input_shape == (4, 7, 96) and linear.key() != LayerShape.of(nn.Linear(128, 10), (4, 7, 128)).key()
    module, inputs = LayerShape.of(nn.ConvTranspose2d(16, 8, 2, stride=2), (1, 16, 4, 4), out_channels=4).build()
    assert module(inputs).shape == (1, 4, 8, 8)
    assert LayerShape.of(nn.BatchNorm2d(4), (1, 4, 2, 2)) is None


def shapes():
    return [LayerShape.of(nn.Conv2d(8, c, 3, padding=1), (1, 8, 4, 4)) for c in (8, 12, 16)]


def test_new_shapes_are_timed_in_interleaved_rounds_and_the_least_is_kept(tmp_path):
    calls = []

    def timer(shape):
        calls.append(shape.out_channels)
        return 10.0 - len(calls)  # later rounds are faster: the table keeps the last, least, value

    table = LatencyTable(tmp_path / "t.json", timer, rounds=3)
    assert table.latencies(shapes()) == [3.0, 2.0, 1.0]
    assert calls == [8, 12, 16] * 3 and table.measured == 3
    assert table.latencies(shapes()[:1]) == [3.0] and len(calls) == 9  # known shapes are not timed again


def test_a_second_table_reads_the_cache_and_a_damaged_file_is_measured_again(tmp_path):
    path = tmp_path / "t.json"
    LatencyTable(path, lambda shape: float(shape.out_channels)).latencies(shapes())
    stored = json.loads(path.read_text())
    assert stored["format"] == "torchslim.latency-table/1" and len(stored["entries"]) == 3
    assert set(stored["machine"]) == {"cpu", "features", "threads", "torch"}

    def refuse(shape):
        raise AssertionError("cached shapes are not timed")

    again = LatencyTable(path, refuse)
    assert again.latencies(shapes()) == [8.0, 12.0, 16.0] and again.measured == 0
    path.write_text("{not json")
    assert LatencyTable(path, lambda shape: 1.0).latencies(shapes()) == [1.0, 1.0, 1.0]


def test_the_default_cache_file_is_one_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path))
    one = LatencyTable(timer=lambda shape: 1.0)
    assert one.path.parent == tmp_path / "latency" and one.path.suffix == ".json"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)
    assert LatencyTable(timer=lambda shape: 1.0).path != one.path  # threads are part of the machine
