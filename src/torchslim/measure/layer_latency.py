"""A table of single-layer latencies on this machine: one convolution or linear layer of a given shape, run alone
in eager PyTorch with the threads in force, timed and cached on disk with a record of how it was measured (load
average, threads, rounds, spread); an entry timed while the machine was busy is provisional and timed again by
a later run on a quieter machine (`LatencyTable`).

The table is what latency-aware pruning widths look up (``round_to: auto``, NetAdapt-style): which of a few
channel counts near the one a ratio asks for the CPU's kernels actually run faster. Entries are cached per
machine under ``$TORCHSLIM_CACHE/latency/`` (default ``~/.cache/torchslim/latency/``), one JSON file per
(CPU model, vector extensions, threads, torch version), each entry keyed by the layer's kind, channels, options
and input shape (batch included), so a second run on the same machine measures nothing but the provisional
entries (when it finds the machine quieter). The file's ``format`` is ``torchslim.latency-table/2``; a format-1
file (milliseconds only) is read with every entry provisional.

Example:
    >>> table = LatencyTable()
    >>> table.latencies([LayerShape.of(nn.Conv2d(64, 64, 3, padding=1), (1, 64, 56, 56))])
    [0.41]                                   # milliseconds, on the machine that ran it
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from torchslim._cache import atomic_write_bytes, cache_dir
from torchslim.core.cpu import cpu_model, isa_flags
from torchslim.core.modules import is_depthwise, is_linear_like, weight_matrix
from torchslim.measure.latency import measure_latency, usable_cores

_CONVS = {(False, 1): nn.Conv1d, (False, 2): nn.Conv2d, (False, 3): nn.Conv3d,
          (True, 1): nn.ConvTranspose1d, (True, 2): nn.ConvTranspose2d, (True, 3): nn.ConvTranspose3d}


@dataclass(frozen=True)
class LayerShape:
    """One layer as the table times it: ``kind`` ("conv" or "linear"), channels, constructor options (kernel
    size, stride, padding, groups, bias, ... as sorted (name, value) pairs) and the full input shape."""

    kind: str
    in_channels: int
    out_channels: int
    options: tuple
    input_shape: tuple[int, ...]

    @staticmethod
    def of(module: nn.Module, input_shape: tuple[int, ...], in_channels: int | None = None,
           out_channels: int | None = None) -> LayerShape | None:
        """``module``'s shape with its channel counts replaced (None: as they are) and the input's channel
        dimension following; a depthwise convolution stays depthwise. None for a layer the table cannot time
        (not a convolution or linear layer, or a grouped convolution the new counts do not divide)."""
        if isinstance(module, nn.modules.conv._ConvNd):
            dims = len(module.kernel_size)
            depthwise = is_depthwise(module)
            new_in = module.in_channels if in_channels is None else in_channels
            new_out = module.out_channels if out_channels is None else out_channels
            if depthwise:  # one count sets both
                new_in = new_out = next((c for c in (in_channels, out_channels) if c is not None), module.in_channels)
            groups = new_in if depthwise else module.groups
            if new_in % groups or new_out % groups or len(input_shape) < dims + 1:
                return None
            options = {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
                       "dilation": module.dilation, "groups": groups, "bias": module.bias is not None,
                       "padding_mode": module.padding_mode, "transposed": module.transposed}
            if module.transposed:
                options["output_padding"] = module.output_padding
            shape = list(input_shape)
            shape[len(shape) - dims - 1] = new_in
            return LayerShape("conv", new_in, new_out, tuple(sorted(options.items())), tuple(shape))
        if LayerShape.handles(module):
            # transformers' Conv1D computes x @ W + b with W (in, out): the same work as a Linear
            old_out, old_in = weight_matrix(module).shape
            new_in = old_in if in_channels is None else in_channels
            new_out = old_out if out_channels is None else out_channels
            bias = getattr(module, "bias", None) is not None
            return LayerShape("linear", new_in, new_out, (("bias", bias),), (*input_shape[:-1], new_in))
        return None

    @staticmethod
    def handles(module: nn.Module) -> bool:
        """Whether the table can time ``module``: a convolution, a linear layer or transformers' Conv1D."""
        return isinstance(module, nn.modules.conv._ConvNd) or is_linear_like(module)

    def key(self) -> str:
        options = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.kind} {self.in_channels}->{self.out_channels} {options} x={list(self.input_shape)}"

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        """A standalone layer of this shape (random weights) and a random input."""
        options = dict(self.options)
        if self.kind == "linear":
            module: nn.Module = nn.Linear(self.in_channels, self.out_channels, **options)
        else:
            transposed = options.pop("transposed")
            dims = len(options["kernel_size"])
            module = _CONVS[transposed, dims](self.in_channels, self.out_channels, **options)
        return module.eval(), torch.randn(self.input_shape)


class LayerTimer:
    """The default timer: the fastest of a few runs of ``shape``'s standalone layer, in milliseconds (the least
    disturbed by other work on the machine). Layers are built (and warmed up) once and kept until `clear`, so
    the rounds of `LatencyTable.latencies` time them again without rebuilding; a layer slower than
    ``slow_ms`` is run once per call (its rounds give the repeats)."""

    def __init__(self, warmup: int = 1, repeats: int = 3, slow_ms: float = 10.0):
        self.warmup, self.repeats, self.slow_ms = warmup, repeats, slow_ms
        self.built: dict[str, tuple[nn.Module, torch.Tensor, float]] = {}

    def __call__(self, shape: LayerShape) -> float:
        key = shape.key()
        first = key not in self.built
        if first:
            module, x = shape.build()
            self.built[key] = module, x, 0.0
        module, x, last = self.built[key]
        repeats = 1 if last > self.slow_ms else self.repeats
        with torch.inference_mode():
            ms = measure_latency(module, x, warmup=self.warmup if first else 0, repeats=repeats).min_ms
        self.built[key] = module, x, ms
        return ms

    def clear(self) -> None:
        self.built.clear()


def machine() -> dict:
    """What a table's entries depend on besides the layer: CPU model, vector extensions, threads, torch."""
    return {"cpu": cpu_model(), "features": isa_flags(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def machine_busy(load: float | None, cores: int, threads: int) -> bool:
    """Whether other work leaves fewer than ``threads`` of the ``cores`` free: the load average, less the
    ``threads`` this process is timing with (the 1-minute average counts them: the prune step keeps them
    running), above ``cores - threads``. An unknown load (no load average on this platform) is not busy."""
    return load is not None and load - threads > cores - threads  # i.e. load > cores, written as reasoned


@dataclass
class TableEntry:
    """One shape's latency and how it was measured: the least, median and greatest of its rounds (ms; each
    round is the timer's value, `LayerTimer`: the fastest of ``repeats`` runs), the threads, the usable cores
    and the 1-minute load average before and after its timing session, when (UTC), and whether it is
    provisional (``reason``: "load", "spread", or "unknown load" for an entry read from a format-1 file)."""

    ms: float
    median_ms: float | None = None
    max_ms: float | None = None
    rounds: int | None = None
    repeats: int | None = None
    threads: int | None = None
    cores: int | None = None
    load_before: float | None = None
    load_after: float | None = None
    measured: str | None = None
    provisional: bool = False
    reason: str | None = None

    @property
    def spread(self) -> float | None:
        """Greatest over least round (None where unknown)."""
        return self.max_ms / self.ms if self.max_ms is not None and self.ms > 0 else None

    def cleaner_than(self, other: TableEntry) -> bool:
        """A clean entry beats a provisional one; between two alike, the faster (the less disturbed: load only
        ever adds time)."""
        return (self.provisional, self.ms) < (other.provisional, other.ms)

    def as_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


# A shape's rounds whose greatest is more than this times its least were disturbed during the session, whatever
# the load average said (it lags by a minute and misses short bursts). On the shared 2-core Xeon with one other
# process busy (load 1.5), greatest/least over five rounds was <= 1.25 for 90% of ResNet-50's layer shapes and
# 1.25 at the median for MobileNetV2's (smaller, 0.05-0.5 ms) ones; 1.5 flags the clearly disturbed (10-15% of the
# small shapes there), which only costs them a second timing on a quieter run.
SPREAD_LIMIT = 1.5
FORMAT = "torchslim.latency-table/2"


class LatencyTable:
    """Single-layer latencies in milliseconds, measured on demand and cached in a JSON file, each entry with how
    it was measured (`TableEntry`).

    An entry timed while the machine was busy (`machine_busy` before or after its session) or whose rounds
    spread more than `SPREAD_LIMIT` is **provisional**: this run uses it, and a later table (a later run) that
    looks it up while the machine is not busy times it again and keeps the cleaner of the two
    (`TableEntry.cleaner_than`). Entries of a format-1 file (no record of the load) are read as provisional.

    Args:
        path: the cache file; default one per `machine` under ``$TORCHSLIM_CACHE/latency/``.
        timer: ``timer(shape) -> milliseconds`` (default `LayerTimer`); tests inject a deterministic one.
        rounds: how many times each shape of a session is timed, shapes interleaved round by round, the order
            rotated by one each round, so that a burst of other work on the machine (on a shared core, a busy
            sibling thread) weighs on all of them alike, whatever their place; the table keeps the least.
        load: ``load() -> 1-minute load average or None`` (default `load_average`); tests inject a fake one.
        cores: the usable cores (default `usable_cores`).

    Attributes:
        measured: how many distinct shapes this table has timed (0 when everything came from the cache).
        retimed: how many provisional entries from earlier runs it timed again; ``replaced``: how many of those
            the new timing replaced.
        loads: the load averages read around its timing sessions.
        used: the keys of every shape looked up.
    """

    def __init__(self, path: Path | None = None, timer: Callable[[LayerShape], float] | None = None,
                 rounds: int = 5, load: Callable[[], float | None] | None = None, cores: int | None = None):
        self.machine = machine()
        if path is None:
            digest = hashlib.sha256(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()[:16]
            path = cache_dir("latency") / f"{digest}.json"
        self.path = Path(path)
        self.timer = timer or LayerTimer()
        self.rounds = max(1, rounds)
        self.load = load or load_average
        self.cores = cores or usable_cores()
        self.measured = self.retimed = self.replaced = 0
        self.loads: list[float] = []
        self.used: set[str] = set()
        self._timed: set[str] = set()  # timed by this table: not timed again for being provisional
        self.entries: dict[str, TableEntry] = self._read()

    @property
    def provisional(self) -> int:
        """How many of the entries this table looked up are provisional now."""
        return sum(self.entries[key].provisional for key in self.used if key in self.entries)

    def _read(self) -> dict[str, TableEntry]:
        try:
            stored = json.loads(self.path.read_text())
            if stored["format"] == "torchslim.latency-table/1":  # milliseconds only: load unknown
                return {str(k): TableEntry(float(v), provisional=True, reason="unknown load")
                        for k, v in stored["entries"].items()}
            if stored["format"] != FORMAT:
                return {}
            return {str(k): TableEntry(**v) for k, v in stored["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # no table yet, or one this version cannot read: measure again

    def latencies(self, shapes: Iterable[LayerShape], together: bool = False) -> list[float]:
        """The latency of each shape, timing those not in the table yet and provisional ones from earlier runs
        when the machine is not busy now.

        Args:
            together: the shapes are compared with one another (a group's candidate widths). When any of them
                must be timed, the session also times again those whose entries are provisional (all of them
                when the machine is busy now, the session's own timings then being provisional), and returns
                the session's values for the shapes it timed: no comparison then rests on a clean timing
                against one disturbed by load, or on two disturbed sessions minutes apart. Clean entries are
                comparable across sessions (that is what a clean entry means) and are not timed again. The
                table keeps, per shape, the cleaner of its entry and the new timing.
        """
        shapes = list(shapes)
        unique = {shape.key(): shape for shape in shapes}
        self.used.update(unique)
        due = {key: shape for key, shape in unique.items() if key not in self.entries}
        provisional = {key: shape for key, shape in unique.items()
                       if key in self.entries and self.entries[key].provisional}
        stale = {key: shape for key, shape in provisional.items() if key not in self._timed}
        if not due and not stale:
            return [self.entries[shape.key()].ms for shape in shapes]
        load = self._read_load()
        busy = machine_busy(load, self.cores, self.machine["threads"])
        if busy:
            stale = {}  # kept for a quieter run
        due.update(stale)
        if not due:
            return [self.entries[shape.key()].ms for shape in shapes]
        if together:
            due = dict(unique) if busy else {**due, **provisional}
        earlier = {key for key in due if key in provisional and key not in self._timed}  # from earlier runs
        session = self._time(due, load)
        self.retimed += len(earlier)
        for key, entry in session.items():
            old = self.entries.get(key)
            if old is None or entry.cleaner_than(old):
                self.entries[key] = entry
                self.replaced += key in earlier
        self._write()
        if together:
            return [session[key].ms if key in session else self.entries[key].ms
                    for key in (shape.key() for shape in shapes)]
        return [self.entries[shape.key()].ms for shape in shapes]

    def _read_load(self) -> float | None:
        load = self.load()
        if load is not None:
            self.loads.append(round(float(load), 2))
        return load

    def _time(self, shapes: dict[str, LayerShape], load_before: float | None) -> dict[str, TableEntry]:
        """One session: every shape timed ``rounds`` times, interleaved, the order rotated each round."""
        keys = list(shapes)
        values: dict[str, list[float]] = {key: [] for key in keys}
        for index in range(self.rounds):
            shift = index % len(keys)
            for key in keys[shift:] + keys[:shift]:
                values[key].append(float(self.timer(shapes[key])))
        load_after = self._read_load()
        if hasattr(self.timer, "clear"):
            self.timer.clear()
        self._timed.update(keys)
        self.measured = len(self._timed)
        threads = self.machine["threads"]
        busy = any(machine_busy(load, self.cores, threads) for load in (load_before, load_after))
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        session = {}
        for key, times in values.items():
            entry = TableEntry(min(times), statistics.median(times), max(times), len(times),
                               getattr(self.timer, "repeats", None), threads, self.cores, load_before, load_after,
                               when)
            spread = entry.spread
            entry.reason = "load" if busy else "spread" if spread is not None and spread > SPREAD_LIMIT else None
            entry.provisional = entry.reason is not None
            session[key] = entry
        return session

    def _write(self) -> None:
        """Merge with what another process may have written meanwhile (the cleaner entry of each shape), then
        replace the file atomically."""
        merged = self._read()
        for key, entry in self.entries.items():
            if key not in merged or not merged[key].cleaner_than(entry):
                merged[key] = entry
        payload = {"format": FORMAT, "machine": self.machine,
                   "entries": {key: entry.as_dict() for key, entry in merged.items()}}
        atomic_write_bytes(self.path, json.dumps(payload, indent=0, sort_keys=True).encode())
