"""Old public names kept for one release (0.2 removes them): each access warns and names what replaces it.

A module lists its renamed names and installs the returned function as its module-level ``__getattr__``, which
Python calls only for names the module does not define.

Example:
    >>> __getattr__ = renamed(__name__, {"ChannelPruning": "ChannelPruningConfig"})
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable

REMOVED_IN = "0.2"


def renamed(module: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``names``: old name -> the object's name in ``module`` now. A loader made
    private (a leading underscore) points users to `torchslim.load`."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        current = names[name]
        instead = "torchslim.load(path, model)" if current.startswith("_") else f"{module}.{current}"
        warnings.warn(f"{module}.{name} is deprecated and will be removed in torchslim {REMOVED_IN}; use {instead}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), current)

    return __getattr__
