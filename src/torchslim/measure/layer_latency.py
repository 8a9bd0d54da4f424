"""A table of single-layer latencies on this machine: one convolution or linear layer of a given shape, run alone
in eager PyTorch with the threads in force, timed once and cached on disk.

The table is what latency-aware pruning widths look up (``round_to: auto``, NetAdapt-style): which of a few
channel counts near the one a ratio asks for the CPU's kernels actually run faster. Entries are cached per
machine under ``$TORCHSLIM_CACHE/latency/`` (default ``~/.cache/torchslim/latency/``), one JSON file per
(CPU model, vector extensions, threads, torch version), each entry keyed by the layer's kind, channels, options
and input shape (batch included), so a second run on the same machine measures nothing.

Example:
    >>> table = LatencyTable()
    >>> table.latencies([LayerShape.of(nn.Conv2d(64, 64, 3, padding=1), (1, 64, 56, 56))])
    [0.41]                                   # milliseconds, on the machine that ran it
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from torchslim._cache import atomic_write_bytes, cache_dir
from torchslim.core.cpu import cpu_model, isa_flags
from torchslim.core.modules import is_depthwise, is_linear_like, weight_matrix
from torchslim.measure.latency import measure_latency

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


class LatencyTable:
    """Single-layer latencies in milliseconds, measured on demand and cached in a JSON file.

    Args:
        path: the cache file; default one per `machine` under ``$TORCHSLIM_CACHE/latency/``.
        timer: ``timer(shape) -> milliseconds`` (default `LayerTimer`); tests inject a deterministic one.
        rounds: how many times each new shape is timed, shapes interleaved round by round so that a burst of
            other work on the machine (on a shared core, a busy sibling thread) weighs on all of them alike;
            the table keeps the least.

    Attributes:
        measured: how many shapes this table has timed (0 when everything came from the cache).
    """

    def __init__(self, path: Path | None = None, timer: Callable[[LayerShape], float] | None = None,
                 rounds: int = 5):
        self.machine = machine()
        if path is None:
            digest = hashlib.sha256(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()[:16]
            path = cache_dir("latency") / f"{digest}.json"
        self.path = Path(path)
        self.timer = timer or LayerTimer()
        self.rounds = max(1, rounds)
        self.measured = 0
        self.entries: dict[str, float] = self._read()

    def _read(self) -> dict[str, float]:
        try:
            stored = json.loads(self.path.read_text())
            return {str(k): float(v) for k, v in stored["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}  # no table yet, or one this version cannot read: measure again

    def latencies(self, shapes: Iterable[LayerShape]) -> list[float]:
        """The latency of each shape, timing (and caching) those not in the table yet."""
        shapes = list(shapes)
        missing = {shape.key(): shape for shape in shapes if shape.key() not in self.entries}
        if missing:
            best: dict[str, float] = {}
            for _ in range(self.rounds):
                for key, shape in missing.items():
                    best[key] = min(best.get(key, float("inf")), float(self.timer(shape)))
            self.measured += len(missing)
            if hasattr(self.timer, "clear"):
                self.timer.clear()
            self.entries.update(best)
            self._write()
        return [self.entries[shape.key()] for shape in shapes]

    def _write(self) -> None:
        """Merge with what another process may have written meanwhile, then replace the file atomically."""
        merged = {**self._read(), **self.entries}
        payload = {"format": "torchslim.latency-table/1", "machine": self.machine, "entries": merged}
        atomic_write_bytes(self.path, json.dumps(payload, indent=0, sort_keys=True).encode())
