"""Number formatting shared by report.html's tables, headline and plots (one place, so the page and its tests
agree on what a reader sees)."""

from __future__ import annotations

import math

from torchslim.measure.stage import LOWER_IS_BETTER
# Metrics in [0, 1] shown as percentages, their changes in percentage points.
FRACTIONS = ("accuracy", "agreement")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _scaled(value, units: tuple[tuple[float, str], ...], plain: str) -> str:
    """``value`` in the largest of ``units`` it reaches (three significant digits below 100), else ``plain``."""
    n = _number(value)
    if n is None:
        return "n/a"
    for scale, unit in units:
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if abs(n) / scale < 100 else f"{n / scale:.0f} {unit}"
    return plain.format(n)


def count(value) -> str:
    """1234567 -> '1.23 M' (parameters, MACs)."""
    return _scaled(value, ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")), "{:.0f}")


def size(value) -> str:
    """Bytes in decimal units: 1234567 -> '1.23 MB'."""
    return _scaled(value, ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")), "{:.0f} B")


def ms(value) -> str:
    """Milliseconds with three significant digits: 0.01234 -> '0.0123 ms', 123.4 -> '123 ms'."""
    n = _number(value)
    if n is None:
        return "n/a"
    return f"{n:.3g} ms" if abs(n) < 1000 else f"{n:,.0f} ms"


def ratio(value) -> str:
    """A factor: 4.123 -> '4.12×'."""
    n = _number(value)
    return "n/a" if n is None else (f"{n:.3g}×" if n < 100 else f"{n:,.0f}×")


def score(metric: str, value) -> str:
    """A metric's value: accuracy 0.98331 -> '98.33%', perplexity 12.345 -> '12.35', loss 0.0123 -> '0.0123'."""
    n = _number(value)
    if n is None:
        return "n/a"
    if metric in FRACTIONS:
        return f"{n * 100:.2f}%"
    return f"{n:.4g}" if abs(n) < 1 else f"{n:.2f}"


def score_change(metric: str, base, stage) -> tuple[str, float | None]:
    """(the change from ``base`` to ``stage`` as shown, its signed size where positive is better)."""
    b, s = _number(base), _number(stage)
    if b is None or s is None:
        return "n/a", None
    if metric in LOWER_IS_BETTER:
        if not b:
            return "n/a", None
        change = (s / b - 1) * 100
        return f"{change:+.2f}%", -change
    if metric in FRACTIONS:
        points = (s - b) * 100
        return f"{points:+.2f} pts", points
    return f"{s - b:+.4g}", s - b


# Words a heading spells in capitals (or as written here) wherever a details key has them.
WORDS = {"macs": "MACs", "sqnr": "SQNR", "db": "dB", "kd": "KD", "ms": "ms", "onnx": "ONNX", "val": "validation",
         "kl": "KL", "bs1": "bs1", "fp32": "fp32", "int8": "int8", "cpu": "CPU", "ptq": "PTQ", "qdq": "QDQ",
         "lm": "LM", "ffn": "FFN"}


def label(key: str) -> str:
    """A details key as a heading: 'removed_channels' -> 'Removed channels', 'macs_before' -> 'MACs before'."""
    words = [WORDS.get(word.lower(), word) for word in str(key).replace("_", " ").split()]
    text = " ".join(words)
    return text if words and words[0] in ("dB", "ms", "bs1", "fp32", "int8") else text[:1].upper() + text[1:]


def value(item) -> str:
    """Any scalar of a report's details, short."""
    if isinstance(item, bool) or item is None:
        return {True: "yes", False: "no", None: "—"}[item]
    if isinstance(item, int):
        return f"{item:,}"
    if isinstance(item, float):
        return f"{item:.4g}"
    return str(item)
