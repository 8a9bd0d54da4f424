"""Plugins: your package's model/data prefixes and methods, usable from the command line.

A plugin is ordinary Python that registers things when it is imported (`torchslim.register_model_prefix`,
`torchslim.register_data_prefix`, `torchslim.register_method`, ...). The CLI imports:

- the modules named with ``--import MODULE`` (a module name on ``sys.path``, or a path to a ``.py`` file), and
- every entry point of the group ``torchslim.plugins`` of the installed packages (``[project.entry-points.
  "torchslim.plugins"] mine = "my_package.torchslim_plugin"``); an entry point that names a callable is called.
  ``--no-plugins`` skips them.

Importing a plugin runs its code with your permissions: name only modules you trust.

Example:
    >>> load_plugins(["my_package.torchslim_plugin"])
    ['my_package.torchslim_plugin']
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib import metadata
from pathlib import Path

from torchslim.errors import InputError, describe

ENTRY_POINT_GROUP = "torchslim.plugins"


def _import(name: str) -> None:
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise InputError(f"--import {name}: file not found")
        spec = importlib.util.spec_from_file_location(f"torchslim_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        importlib.import_module(name)


def load_plugins(modules: list[str] | tuple[str, ...] = (), entry_points: bool = True) -> list[str]:
    """Import ``modules`` and (unless ``entry_points`` is False) the ``torchslim.plugins`` entry points; returns
    what was loaded.

    Raises:
        InputError: a module or entry point fails to import (named, with the error's first line).
    """
    loaded = []
    for name in modules:
        try:
            _import(name)
        except InputError:
            raise
        except Exception as error:
            raise InputError(f"--import {name}: {describe(error)}") from None
        loaded.append(name)
    if entry_points:
        for point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                target = point.load()
                if callable(target):
                    target()
            except Exception as error:
                raise InputError(f"plugin {point.name} ({point.value}, entry point group {ENTRY_POINT_GROUP}): "
                                 f"{describe(error)} (run with --no-plugins to skip plugins)") from None
            loaded.append(point.value)
    return loaded
