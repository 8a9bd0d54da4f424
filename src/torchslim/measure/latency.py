"""Latency: warm-up runs, then the median of repeated timed runs, with the thread count fixed and recorded."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: int) -> int:
    """Fix torch's intra-op threads (0: all cores this process may use); returns the count in force."""
    if threads <= 0:
        threads = usable_cores()
    torch.set_num_threads(threads)
    return threads


@dataclass
class LatencyResult:
    """Milliseconds per call: median, and the spread (min, max) over the timed repeats."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int


def measure_latency(run: Callable[[Any], Any], inputs: Any, *, warmup: int = 3, repeats: int = 15,
                    min_seconds: float = 0.0) -> LatencyResult:
    """Time ``run(inputs)``: ``warmup`` untimed calls, then at least ``repeats`` timed calls (more, up to 10x, if
    ``min_seconds`` has not elapsed); returns the median and spread in milliseconds."""
    for _ in range(warmup):
        run(inputs)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - started < min_seconds and len(times) < 10 * repeats):
        begin = time.perf_counter()
        run(inputs)
        times.append((time.perf_counter() - begin) * 1000)
    return LatencyResult(statistics.median(times), min(times), max(times), len(times))
