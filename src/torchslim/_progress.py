"""Progress bars (tqdm) with an ETA for the passes that take more than a few seconds: evaluation, calibration,
block-by-block LLM passes, candidate timing; a ticking elapsed-time line for single long calls (ONNX export).

Bars go to stderr and only to a terminal (tqdm hides them otherwise); ``--quiet`` and ``progress=False`` hide
them everywhere. They vanish when done (``leave=False``): the log lines that follow say what was done.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable, Iterator

_enabled = True


def set_enabled(enabled: bool) -> bool:
    """Show bars (in a terminal) or never; returns the previous setting. The CLI's ``--quiet`` turns them off."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def enabled(flag: bool) -> Iterator[None]:
    """Within the block, bars follow ``flag`` (a run's ``progress=``); the setting before is restored."""
    previous = set_enabled(_enabled and flag)
    try:
        yield
    finally:
        set_enabled(previous)


def _disable(show: bool | None) -> bool | None:
    # None lets tqdm decide: it draws on a terminal and stays silent in a pipe or a log file
    return True if not _enabled or show is False else None


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "batch",
        show: bool | None = None) -> Any:
    """A tqdm bar over ``iterable`` (or updated by hand up to ``total``), titled ``torchslim: desc``.

    Args:
        show: False hides this bar (a step run with ``progress=False``); None follows the global setting.

    Example:
        >>> for batch in bar(range(3), desc="evaluating", show=False):
        ...     pass
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=f"torchslim: {desc}", unit=unit, leave=False, dynamic_ncols=True,
                disable=_disable(show))


@contextlib.contextmanager
def ticking(desc: str, show: bool | None = None, interval: float = 0.5) -> Iterator[None]:
    """An elapsed-time line for one long call that reports no progress of its own (e.g. ``torch.onnx.export``)."""
    from tqdm.auto import tqdm

    line = tqdm(total=None, desc=f"torchslim: {desc}", bar_format="{desc} ({elapsed})", leave=False,
                disable=_disable(show))
    if line.disable:
        yield
        return
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval):
            line.refresh()

    thread = threading.Thread(target=tick, name="torchslim-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        line.close()
