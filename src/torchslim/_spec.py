"""Spec registries: ``prefix:rest`` strings resolved by registered resolvers, with named ``builtin:`` entries.

Models (`torchslim.zoo`) and data (`torchslim.data`) each keep one; resolvers register themselves when their
module is imported, and the registry imports those modules on first use so that importing torchslim stays light.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torchslim._config import did_you_mean
from torchslim.errors import InputError, describe, shorten


def takes_config(resolver: Callable[..., Any]) -> bool:
    """Whether ``resolver`` accepts a ``config`` keyword (the recipe's mapping form of the spec)."""
    try:
        return "config" in inspect.signature(resolver).parameters
    except (TypeError, ValueError):
        return False


def load_factory(target: str, field: str) -> tuple[Callable[..., Any], Any]:
    """``path/to/module.py:factory`` -> (the callable, its module), importing the file (which runs its code).

    Raises:
        InputError: a malformed target, a missing file, an import that fails, or no callable of that name.
    """
    import importlib.util
    from pathlib import Path

    spec = f"file:{target}"
    path_text, sep, name = target.rpartition(":")
    if not sep or not path_text or not name:
        raise InputError(f"{field}: {spec}: expected file:path/to/module.py:factory")
    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"{field}: {spec}: file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"torchslim_user_{field}_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:  # the user's code failing is the user's input at fault
        raise InputError(f"{field}: {spec}: importing {path} failed: {describe(error, 200)}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise InputError(f"{field}: {spec}: {path} defines no callable {shorten(name)}")
    return factory, module


class SpecRegistry:
    """Resolvers by prefix plus factories for ``builtin:NAME``.

    Args:
        field: the recipe field the specs fill ("model", "data"), named in error messages.
        builtin_noun: what a built-in is called in messages ("built-in model").
        load: imports the modules that register resolvers (called on first use).
    """

    def __init__(self, field: str, builtin_noun: str, load: Callable[[], None]):
        self.field, self.builtin_noun, self._load = field, builtin_noun, load
        self.resolvers: dict[str, Callable[..., Any]] = {"builtin": self._resolve_builtin}
        self.builtins: dict[str, Callable[..., Any]] = {}
        self._loaded = False

    def _resolve_builtin(self, name: str, *args: Any) -> Any:
        return self.builtins[name](*args)

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._load()

    def register_prefix(self, prefix: str) -> Callable:
        """Decorator: ``resolver(rest_of_spec, *args)`` handles specs ``prefix:rest``; a resolver with a
        ``config`` parameter also receives the recipe's mapping form of the spec (column mapping, overrides)."""

        def decorate(resolver: Callable[..., Any]) -> Callable[..., Any]:
            self.resolvers[prefix] = resolver
            return resolver

        return decorate

    def register_builtin(self, name: str) -> Callable:
        """Decorator: ``factory(*args)`` handles ``builtin:name``."""

        def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
            self.builtins[name] = factory
            return factory

        return decorate

    def prefixes(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self.resolvers)

    def builtin_names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self.builtins)

    def check(self, spec: str) -> tuple[str, str]:
        """Split and check a spec without resolving it; returns ``(prefix, rest)``. Raises InputError."""
        self._ensure_loaded()
        if not isinstance(spec, str):
            raise InputError(f"{self.field}: expected a spec string, got {shorten(spec)}")
        prefix, sep, rest = spec.partition(":")
        if not sep or prefix not in self.resolvers:
            known = ", ".join(f"{p}:" for p in sorted(self.resolvers))
            # a spec without a colon is most often a built-in's bare name
            names = [f"{p}:" for p in self.resolvers] if sep else [f"builtin:{b}" for b in self.builtins]
            hint = did_you_mean(f"{prefix}:" if sep else f"builtin:{spec}", names)
            raise InputError(f"{self.field}: unknown {self.field} spec {shorten(spec)}{hint} "
                             f"(known prefixes: {known})")
        if not rest:
            raise InputError(f"{self.field}: spec {shorten(spec)} names nothing after '{prefix}:'")
        if prefix == "builtin" and rest not in self.builtins:
            raise InputError(f"{self.field}: unknown {self.builtin_noun} {shorten(rest)}"
                             f"{did_you_mean(rest, self.builtins)} (known: {', '.join(sorted(self.builtins))})")
        return prefix, rest

    def resolve(self, spec: str, *args: Any, config: Any = None) -> Any:
        """Run the resolver of ``spec``'s prefix; ``config`` (the mapping form) goes to resolvers that take it."""
        prefix, rest = self.check(spec)
        resolver = self.resolvers[prefix]
        if config is not None and takes_config(resolver):
            return resolver(rest, *args, config=config)
        return resolver(rest, *args)

    def accepts_options(self, spec: str) -> bool:
        """Whether the resolver of ``spec``'s prefix reads the mapping form's options."""
        prefix, _ = self.check(spec)
        return takes_config(self.resolvers[prefix])
