"""Observers: estimate the float range of a tensor from the values it takes on calibration data.

- ``minmax``: the extremes seen (per tensor or per channel);
- ``moving_average``: an exponential moving average of each batch's extremes (robust to one odd batch; the
  usual choice while quantization-aware training updates ranges);
- ``histogram``: a 2048-bin histogram (re-binned when the range grows), from which the range is chosen by
  ``percentile`` (trim the tails), ``mse`` (minimise the expected squared error of clipping plus rounding) or
  ``entropy`` (minimise the KL divergence between the float and the quantized distributions).

Every observer gives ``range() -> (lo, hi)`` and ``qparams() -> (scale, zero_point)`` for its `QScheme`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from torchslim.quant.qmath import QScheme, qparams


class Observer:
    """Base class: ``observe`` batches, then read ``range`` or ``qparams``."""

    def __init__(self, scheme: QScheme):
        self.scheme = scheme
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _extremes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if self.scheme.axis is None:
            return torch.aminmax(x)
        flat = x.movedim(self.scheme.axis, 0).reshape(x.shape[self.scheme.axis], -1)
        return torch.aminmax(flat, dim=1)

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise ValueError("the observer has seen no data")
        return self.lo, self.hi

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams(*self.range(), self.scheme)


class MinMaxObserver(Observer):
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self._extremes(x)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


class MovingAverageObserver(Observer):
    def __init__(self, scheme: QScheme, momentum: float = 0.01):
        super().__init__(scheme)
        self.momentum = momentum

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self._extremes(x)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.momentum * (lo - self.lo)
            self.hi = self.hi + self.momentum * (hi - self.hi)


class HistogramObserver(Observer):
    """Per-tensor histogram; the range comes from ``method`` (see the module docstring)."""

    def __init__(self, scheme: QScheme, method: Literal["percentile", "mse", "entropy"] = "mse",
                 bins: int = 2048, percentile: float = 99.99):
        if scheme.axis is not None:
            raise ValueError("histogram observers are per tensor (use minmax for per-channel ranges)")
        super().__init__(scheme)
        self.method, self.bins, self.percentile = method, bins, percentile
        self.counts: np.ndarray | None = None
        self.lo_edge = self.hi_edge = 0.0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        if hi - lo <= 0:
            hi = lo + 1e-8
        if self.counts is None:
            self.lo_edge, self.hi_edge = lo, hi
            self.counts = np.zeros(self.bins)
        elif lo < self.lo_edge or hi > self.hi_edge:
            self._rebin(min(lo, self.lo_edge), max(hi, self.hi_edge))
        self.counts += torch.histc(x, self.bins, self.lo_edge, self.hi_edge).double().numpy()
        self.lo = torch.tensor(min(lo, float(self.lo) if self.lo is not None else lo))
        self.hi = torch.tensor(max(hi, float(self.hi) if self.hi is not None else hi))

    def _rebin(self, lo: float, hi: float) -> None:
        """Spread the old counts over the wider range (each old bin's mass goes where its centre falls)."""
        old_edges = np.linspace(self.lo_edge, self.hi_edge, self.bins + 1)
        centres = (old_edges[:-1] + old_edges[1:]) / 2
        self.counts, _ = np.histogram(centres, bins=self.bins, range=(lo, hi), weights=self.counts)
        self.lo_edge, self.hi_edge = lo, hi

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.counts is None:
            raise ValueError("the observer has seen no data")
        lo, hi = {"percentile": self._percentile, "mse": self._mse, "entropy": self._entropy}[self.method]()
        return torch.tensor(float(lo)), torch.tensor(float(hi))

    # -- range choices --------------------------------------------------------------------------------------
    def _edges(self) -> np.ndarray:
        return np.linspace(self.lo_edge, self.hi_edge, self.bins + 1)

    def _percentile(self) -> tuple[float, float]:
        edges, cdf = self._edges(), np.cumsum(self.counts) / self.counts.sum()
        tail = 1 - self.percentile / 100
        lo = edges[np.searchsorted(cdf, tail)] if self.lo_edge < 0 else 0.0
        hi = edges[min(np.searchsorted(cdf, 1 - tail) + 1, self.bins)]
        return min(lo, 0.0), max(hi, 0.0)

    def _expected_error(self, lo: float, hi: float) -> float:
        """Expected squared error over the histogram for the range [lo, hi]: rounding noise (step^2 / 12)
        inside it, distance to the nearest end outside it."""
        scale, zero_point = qparams(lo, hi, self.scheme)
        scale, zero_point = float(scale), int(zero_point)
        qlo, qhi = (self.scheme.qmin - zero_point) * scale, (self.scheme.qmax - zero_point) * scale
        edges = self._edges()
        centres = (edges[:-1] + edges[1:]) / 2
        clipped = np.clip(centres, qlo, qhi)
        inside = (centres >= qlo) & (centres <= qhi)
        error = np.where(inside, scale * scale / 12, (centres - clipped) ** 2)
        return float((error * self.counts).sum())

    def _candidates(self, steps: int = 128):
        lo, hi = float(self.lo), float(self.hi)
        for fraction in np.linspace(1.0 / steps, 1.0, steps):
            if self.scheme.symmetric:
                bound = fraction * max(-lo, hi)
                yield -bound if lo < 0 else 0.0, bound
            else:
                yield lo * fraction, hi * fraction

    def _mse(self) -> tuple[float, float]:
        return min(self._candidates(), key=lambda r: self._expected_error(*r))

    def _entropy(self) -> tuple[float, float]:
        """KL-divergence calibration on the histogram of |x|: for each threshold, fold the mass beyond it into
        the last bin (P), merge P's bins into as many groups as there are codes and spread each group's mass
        evenly over its non-empty bins (Q); keep the threshold with the least KL(P || Q)."""
        edges = self._edges()
        centres = (edges[:-1] + edges[1:]) / 2
        magnitude_max = max(-self.lo_edge, self.hi_edge)
        folded, _ = np.histogram(np.abs(centres), bins=self.bins, range=(0, magnitude_max), weights=self.counts)
        signed = self.lo_edge < 0
        levels = self.scheme.levels // 2 if signed else self.scheme.levels
        best, best_kl = self.bins, np.inf
        for stop in range(levels, self.bins + 1, max(1, self.bins // 256)):
            p = folded[:stop].copy()
            p[-1] += folded[stop:].sum()
            if p.sum() == 0:
                continue
            group = np.repeat(np.arange(levels), np.diff(np.linspace(0, stop, levels + 1).astype(int)))
            nonzero = folded[:stop] > 0
            mass = np.bincount(group, weights=folded[:stop], minlength=levels)
            filled = np.bincount(group, weights=nonzero, minlength=levels)
            q = np.where(nonzero, (mass / np.maximum(filled, 1))[group], 0.0)
            p, q = p / p.sum(), q / max(q.sum(), 1e-12)
            mask = p > 0
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
            if kl < best_kl:
                best, best_kl = stop, kl
        threshold = best / self.bins * magnitude_max
        return (max(float(self.lo), -threshold), min(float(self.hi), threshold)) if signed else (0.0, threshold)


OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageObserver}


def make_observer(kind: str, scheme: QScheme) -> Observer:
    """``kind``: minmax, moving_average, percentile, mse or entropy (the last three: histogram methods)."""
    if kind in OBSERVERS:
        return OBSERVERS[kind](scheme)
    if kind in ("percentile", "mse", "entropy"):
        return HistogramObserver(scheme, method=kind)
    raise ValueError(f"unknown observer {kind!r}: choose from minmax, moving_average, percentile, mse, entropy")
