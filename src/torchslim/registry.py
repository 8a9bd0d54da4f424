"""Registry of compression methods: one config dataclass + one handler per (step kind, method name).

A recipe step such as ``prune: {method: magnitude, sparsity: 0.5}`` is resolved here: the kind (``prune``)
and the method (``magnitude``) select an entry whose config class validates the remaining fields and whose
handler applies the method. Adding a method never edits the pipeline: register it and name it in a recipe.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class MyConfig:
    ...     strength: float = 1.0
    >>> @register_method("prune", "my-method", MyConfig)
    ... def my_method(context, config):
    ...     ...
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

STEP_KINDS = ("prune", "factorize", "share_weights", "compress_embeddings", "finetune", "materialize", "quantize")

# Method modules imported on first lookup, so registering stays declarative and `import torchslim` stays light.
_BUILTIN_MODULES = (
    "torchslim.pruning.magnitude",
    "torchslim.pruning.channel",
    "torchslim.pruning.oneshot",
    "torchslim.recover.finetune",
    "torchslim.quant.int8_static",
    "torchslim.quant.int8_dynamic",
    "torchslim.quant.qat",
    "torchslim.quant.bf16",
    "torchslim.quant.choose",
    "torchslim.quant.weight_only_step",
    "torchslim.compact.materialize",
    "torchslim.factorize.svd",
    "torchslim.compact.codebook",
    "torchslim.compact.embeddings",
)

# A kind whose steps may omit `method:` uses this one.
_DEFAULT_METHODS = {"finetune": "distill", "share_weights": "kmeans", "materialize": "on-demand"}


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its step kind, name, config dataclass and handler."""

    kind: str
    name: str
    config_cls: type
    handler: Callable[..., Any]


_METHODS: dict[tuple[str, str], MethodEntry] = {}
_loaded = False


def register_method(kind: str, name: str, config_cls: type) -> Callable[[Callable], Callable]:
    """Register ``handler(context, config) -> Deployable`` for recipe steps ``{kind: {method: name, ...}}``."""
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; known: {', '.join(STEP_KINDS)}")

    def decorate(handler: Callable) -> Callable:
        _METHODS[(kind, name)] = MethodEntry(kind, name, config_cls, handler)
        return handler

    return decorate


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def get_method(kind: str, name: str) -> MethodEntry:
    """Return the entry for ``kind``/``name``; raises KeyError listing the known names."""
    _load_builtins()
    try:
        return _METHODS[(kind, name)]
    except KeyError:
        from torchslim._config import did_you_mean

        names = sorted(n for k, n in _METHODS if k == kind)
        raise KeyError(f"unknown {kind} method {name!r}{did_you_mean(name, names)} "
                       f"(known: {', '.join(names) or 'none'})") from None


def method_for_config(config: Any) -> MethodEntry:
    """The entry whose config class ``config`` is an instance of.

    Raises:
        InputError: ``config`` is no registered method's config (the message lists the config classes).
    """
    _load_builtins()
    for entry in _METHODS.values():
        if type(config) is entry.config_cls:
            return entry
    from torchslim.errors import InputError

    known = ", ".join(sorted(e.config_cls.__name__ for e in _METHODS.values()))
    raise InputError(f"config: {type(config).__name__} is not the config of a registered method (known: {known})")


def default_method(kind: str) -> str | None:
    """The method a step of ``kind`` uses when the recipe names none (None: the recipe must name one)."""
    return _DEFAULT_METHODS.get(kind)


def list_methods(kind: str | None = None) -> list[MethodEntry]:
    """All registered methods, optionally of one step kind, sorted by kind then name."""
    _load_builtins()
    entries = [e for (k, _), e in _METHODS.items() if kind is None or k == kind]
    return sorted(entries, key=lambda e: (STEP_KINDS.index(e.kind), e.name))
