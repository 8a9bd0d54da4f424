import time

import torch

from torchslim.measure import measure_latency, peak_memory_bytes, set_threads


def test_latency_reports_the_median_of_the_requested_repeats():
    calls = []

    def run(x):
        calls.append(x)
        time.sleep(0.002)

    result = measure_latency(run, 1, warmup=2, repeats=5)
    assert len(calls) == 7 and result.repeats == 5
    assert 2.0 <= result.min_ms <= result.median_ms <= result.max_ms


def test_set_threads_fixes_and_returns_the_count():
    assert set_threads(1) == 1 and torch.get_num_threads() == 1
    assert set_threads(0) >= 1


def test_peak_memory_sees_a_temporary_allocation():
    def allocate():
        block = bytearray(120 * 1024 * 1024)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
        return len(block)

    peak = peak_memory_bytes(allocate)
    assert peak is not None and 110e6 <= peak <= 400e6
