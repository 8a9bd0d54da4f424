"""Peak memory of inference: the process's resident-set high-water mark while loading and running a model.

Linux lets a process reset its own peak RSS (``/proc/self/clear_refs``, value 5); the peak reached while the
artifact is loaded and one batch runs, minus the RSS just before, is what that inference needs (weights as the
runtime holds them, activations, workspaces), whatever the runtime. Freed heap memory is returned to the OS
first (``malloc_trim``) so earlier work does not hide the cost. Where this is unavailable, returns None.
"""

from __future__ import annotations

import ctypes
import gc
import re
from pathlib import Path
from typing import Any, Callable

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if not match:
        raise OSError(f"{field} not in {_STATUS}")
    return int(match.group(1))


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_bytes(load_and_run: Callable[[], Any]) -> int | None:
    """Peak resident memory (bytes) that ``load_and_run()`` adds to the process, or None where not measurable."""
    try:
        _trim()
        _CLEAR_REFS.write_text("5")
        before = _status_kib("VmRSS")
    except OSError:
        return None
    result = load_and_run()
    peak = _status_kib("VmHWM")
    del result
    _trim()
    return max(0, peak - before) * 1024
