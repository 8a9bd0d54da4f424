"""Spec registries: ``prefix:rest`` strings resolved by registered resolvers, with named ``builtin:`` entries.

Models (`torchslim.zoo`) and data (`torchslim.data`) each keep one; resolvers register themselves when their
module is imported, and the registry imports those modules on first use so that importing torchslim stays light.
"""

from __future__ import annotations

from typing import Any, Callable

from torchslim.errors import InputError, shorten


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
        """Decorator: ``resolver(rest_of_spec, *args)`` handles specs ``prefix:rest``."""

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
            raise InputError(f"{self.field}: unknown {self.field} spec {shorten(spec)} (known prefixes: {known})")
        if not rest:
            raise InputError(f"{self.field}: spec {shorten(spec)} names nothing after '{prefix}:'")
        if prefix == "builtin" and rest not in self.builtins:
            raise InputError(f"{self.field}: unknown {self.builtin_noun} {shorten(rest)} "
                             f"(known: {', '.join(sorted(self.builtins))})")
        return prefix, rest

    def resolve(self, spec: str, *args: Any) -> Any:
        prefix, rest = self.check(spec)
        return self.resolvers[prefix](rest, *args)
