"""The latency table of single layers: layer shapes follow new channel counts, new shapes are timed in
interleaved rounds in rotated order (the least kept), entries are cached on disk per machine with how they were
measured and read back without timing; entries timed under load are provisional and timed again by a later
table when the load is low. The timer and the load average are injected (no timed assertions)."""

from __future__ import annotations

import json

from torch import nn

from torchslim.measure import LatencyTable, LayerShape
from torchslim.measure.layer_latency import machine_busy


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


QUIET, BUSY = (lambda: 0.5), (lambda: 5.0)  # 1-minute load averages on the 2 cores the tests pretend to have


def table_at(path, timer, load=QUIET, rounds=5):
    return LatencyTable(path, timer, rounds=rounds, load=load, cores=2)


def test_new_shapes_are_timed_in_interleaved_rounds_in_rotated_order_and_the_least_is_kept(tmp_path):
    calls = []

    def timer(shape):
        calls.append(shape.out_channels)
        return 10.0 - len(calls)  # later calls are faster: the table keeps each shape's last, least, value

    table = table_at(tmp_path / "t.json", timer, rounds=3)
    assert table.latencies(shapes()) == [2.0, 1.0, 3.0]
    assert calls == [8, 12, 16, 12, 16, 8, 16, 8, 12] and table.measured == 3  # each shape first, middle, last
    assert table.latencies(shapes()[:1]) == [2.0] and len(calls) == 9  # known shapes are not timed again
    entry = table.entries[shapes()[0].key()]
    assert (entry.ms, entry.median_ms, entry.max_ms, entry.rounds) == (2.0, 4.0, 9.0, 3)
    assert entry.spread == 4.5 and entry.provisional and entry.reason == "spread"  # 4.5 > SPREAD_LIMIT


def test_a_second_table_reads_the_cache_and_a_damaged_file_is_measured_again(tmp_path):
    path = tmp_path / "t.json"
    table_at(path, lambda shape: float(shape.out_channels)).latencies(shapes())
    stored = json.loads(path.read_text())
    assert stored["format"] == "torchslim.latency-table/2" and len(stored["entries"]) == 3
    assert set(stored["machine"]) == {"cpu", "features", "threads", "torch"}
    entry = stored["entries"][shapes()[2].key()]
    assert (entry["ms"], entry["median_ms"], entry["max_ms"], entry["rounds"]) == (16.0, 16.0, 16.0, 5)
    assert (entry["load_before"], entry["load_after"], entry["cores"], entry["provisional"]) == (0.5, 0.5, 2, False)
    assert entry["threads"] == stored["machine"]["threads"] and entry["measured"].endswith("Z")

    def refuse(shape):
        raise AssertionError("cached shapes are not timed")

    again = table_at(path, refuse)
    assert again.latencies(shapes()) == [8.0, 12.0, 16.0] and again.measured == 0 and again.provisional == 0
    path.write_text("{not json")
    assert table_at(path, lambda shape: 1.0).latencies(shapes()) == [1.0, 1.0, 1.0]


def test_the_busy_rule_leaves_room_for_the_timed_threads():
    # the load average counts this process's own timing threads: busy when the rest leave < threads cores free
    assert [machine_busy(load, 2, 1) for load in (0.5, 1.9, 2.0, 2.1, 5.0, None)] == \
        [False, False, False, True, True, False]
    assert [machine_busy(load, 8, 4) for load in (6.0, 8.5)] == [False, True]


def test_an_entry_timed_under_load_is_used_then_retimed_by_a_later_run_only_when_quiet(tmp_path):
    path, calls = tmp_path / "t.json", []

    def timer(ms):
        def time_shape(shape):
            calls.append(shape.out_channels)
            return ms * shape.out_channels
        return time_shape

    loaded = table_at(path, timer(3.0), load=BUSY)
    assert loaded.latencies(shapes()) == [24.0, 36.0, 48.0] and loaded.provisional == 3
    assert loaded.entries[shapes()[0].key()].reason == "load" and loaded.loads == [5.0, 5.0]
    assert loaded.latencies(shapes()) == [24.0, 36.0, 48.0] and len(calls) == 15  # this run keeps using them

    still_busy = table_at(path, timer(1.0), load=lambda: 2.5)
    assert still_busy.latencies(shapes()) == [24.0, 36.0, 48.0] and len(calls) == 15
    assert (still_busy.retimed, still_busy.provisional) == (0, 3)

    quiet = table_at(path, timer(1.0))
    assert quiet.latencies(shapes()) == [8.0, 12.0, 16.0] and len(calls) == 30
    assert (quiet.retimed, quiet.replaced, quiet.provisional) == (3, 3, 0)
    assert not json.loads(path.read_text())["entries"][shapes()[0].key()]["provisional"]

    def refuse(shape):
        raise AssertionError("clean entries are not timed again")

    assert table_at(path, refuse).latencies(shapes()) == [8.0, 12.0, 16.0]


def test_a_retiming_that_is_not_cleaner_keeps_the_old_entry(tmp_path):
    path = tmp_path / "t.json"
    table_at(path, lambda shape: 2.0, load=BUSY).latencies(shapes()[:1])
    # the load reads quiet before the session and busy after it: the new timing is provisional too, and slower
    loads = iter([0.5, 5.0])
    later = table_at(path, lambda shape: 3.0, load=lambda: next(loads))
    assert later.latencies(shapes()[:1]) == [2.0] and (later.retimed, later.replaced, later.provisional) == (1, 0, 1)


def test_an_old_format_file_is_read_as_unknown_load_and_retimed_when_quiet(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": "torchslim.latency-table/1", "machine": {},
                                "entries": {shape.key(): 7.5 for shape in shapes()}}))

    def refuse(shape):
        raise AssertionError("not timed while busy")

    old = table_at(path, refuse, load=BUSY)
    assert old.latencies(shapes()) == [7.5, 7.5, 7.5] and old.provisional == 3 and old.measured == 0
    entry = old.entries[shapes()[1].key()]
    assert (entry.ms, entry.reason, entry.load_before, entry.spread) == (7.5, "unknown load", None, None)
    quiet = table_at(path, lambda shape: 9.0)  # clean, though slower: it replaces the unknown
    assert quiet.latencies(shapes()) == [9.0, 9.0, 9.0] and (quiet.retimed, quiet.replaced) == (3, 3)
    stored = json.loads(path.read_text())
    assert stored["format"] == "torchslim.latency-table/2"
    assert [e["provisional"] for e in stored["entries"].values()] == [False, False, False]


def test_shapes_compared_together_retime_provisional_entries_and_all_when_busy(tmp_path):
    path, calls = tmp_path / "t.json", []
    table_at(path, lambda shape: 5.0).latencies(shapes()[:1])  # 8: clean, timed on a quiet run
    table_at(path, lambda shape: 4.0, load=BUSY).latencies(shapes()[1:2])  # 12: provisional

    def timer(ms):
        def time_shape(shape):
            calls.append(shape.out_channels)
            return ms
        return time_shape

    # quiet now: 16 is new; 12 (provisional) is timed again after it; 8 (clean) is comparable as it is
    quiet = table_at(path, timer(6.0), rounds=2)
    assert quiet.latencies(shapes(), together=True) == [5.0, 6.0, 6.0]
    assert calls == [16, 12, 12, 16] and (quiet.retimed, quiet.replaced) == (1, 1)  # rounds rotated
    # busy now: every shape compared is timed in the session (all its values alike provisional)
    bigger = [LayerShape.of(nn.Conv2d(8, c, 3, padding=1), (1, 8, 4, 4)) for c in (8, 12, 24)]
    busy = table_at(path, timer(7.0), load=BUSY, rounds=2)
    assert busy.latencies(bigger, together=True) == [7.0, 7.0, 7.0] and calls[4:] == [8, 12, 24, 12, 24, 8]
    assert busy.latencies(bigger[:1]) == [5.0]  # the table keeps the cleaner entry: the clean 5.0
    assert busy.provisional == 1 and (busy.retimed, busy.replaced) == (0, 0)  # 24 is new and provisional


def test_the_default_cache_file_is_one_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path))
    one = LatencyTable(timer=lambda shape: 1.0)
    assert one.path.parent == tmp_path / "latency" and one.path.suffix == ".json"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)
    assert LatencyTable(timer=lambda shape: 1.0).path != one.path  # threads are part of the machine
