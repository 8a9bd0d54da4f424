"""What a recipe can name, read from the registries: methods with their fields, model and data specs.

`torchslim list methods|models|data` prints these; `torchslim.schema` builds the recipe's JSON Schema from the
same field descriptions. A field's help is its entry in the ``Args:`` section of its config class's docstring
(or of a base class's), so documenting a config once documents it everywhere.

Example:
    >>> [m["method"] for m in list_method_details() if m["kind"] == "prune"][:2]
    ['channel', 'magnitude']
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

_SECTION = re.compile(r"^\s*(Args|Arguments|Attributes|Fields):\s*$")
# "name: help", "name (type): help", or "first / second: help" (one text for several fields)
_ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*(?:\s*/\s*[A-Za-z_]\w*)*)(?:\s*\([^)]*\))?:\s*(.*)$")


def _docstring_fields(doc: str) -> dict[str, str]:
    """``name -> help`` from the ``Args:``/``Attributes:`` sections of a Google-style docstring."""
    helps: dict[str, str] = {}
    lines = inspect.cleandoc(doc).splitlines()
    inside, indent, current = False, None, None
    for line in lines:
        if _SECTION.match(line):
            inside, indent, current = True, None, None
            continue
        if not inside:
            continue
        if not line.strip():
            inside = False
            continue
        match = _ENTRY.match(line)
        depth = len(line) - len(line.lstrip())
        if match and (indent is None or depth == indent):
            indent, current = depth, [name.strip() for name in match.group(2).split("/")]
            for name in current:
                helps[name] = match.group(3).strip()
        elif current is not None and indent is not None and depth > indent:
            for name in current:
                helps[name] = f"{helps[name]} {line.strip()}"
        else:
            inside = False
    return helps


def field_help(cls: type) -> dict[str, str]:
    """Each field's help from the docstrings of ``cls`` and its bases (the nearest class's text wins)."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass.__doc__ and klass is not object:
            helps.update(_docstring_fields(klass.__doc__))
    return helps


def summary(cls_or_function: Any) -> str:
    """The first sentence-line of a docstring ("" without one)."""
    doc = inspect.getdoc(cls_or_function) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ").strip()


def default_value(field: dataclasses.Field) -> Any:
    """A field's default as plain data (a nested config as a mapping), or `dataclasses.MISSING`."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def config_fields(cls: type) -> list[dict]:
    """The recipe fields of config class ``cls``: name, type (as messages spell it), default, help.

    The ``version`` stamp every config carries is left out: recipes never need to set it.
    """
    from torchslim._config import _type_name

    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    rows = []
    for field in dataclasses.fields(cls):
        if not field.init or field.name == "version":
            continue
        default = default_value(field)
        rows.append({"name": field.name, "type": _type_name(hints[field.name]).replace("NoneType", "null"),
                     "default": None if default is dataclasses.MISSING else default,
                     "required": default is dataclasses.MISSING, "help": helps.get(field.name, "")})
    return rows


def list_method_details(kind: str | None = None) -> list[dict]:
    """Every registered method (of one step ``kind``, or all): kind, method, config class, whether it is the
    kind's default (a step may then leave ``method:`` out), a one-line summary and its fields."""
    from torchslim.registry import default_method, list_methods

    entries = list_methods(kind)
    modules = [entry.handler.__module__ for entry in list_methods()]
    return [{"kind": entry.kind, "method": entry.name, "config": entry.config_cls.__name__,
             "default": default_method(entry.kind) == entry.name,
             "help": _method_help(entry, shared=modules.count(entry.handler.__module__) > 1),
             "fields": config_fields(entry.config_cls)} for entry in entries]


def _method_help(entry: Any, shared: bool) -> str:
    text = _method_text(entry, shared)
    return text[:1].upper() + text[1:]


def _method_text(entry: Any, shared: bool) -> str:
    """One line on what a method does: its module's first docstring line, unless the module holds several
    methods; then the handler's ("Wanda: ...") or the config's text after its ``kind: {method: ...}``: header."""
    import sys

    module_doc = (sys.modules[entry.handler.__module__].__doc__ or "").strip().split("\n\n")[0]
    module_line = re.sub(r"^``[^`]*``:\s*", "", " ".join(module_doc.split()))
    if not shared:
        return module_line
    handler = summary(entry.handler)
    if re.match(r"^[A-Z][\w-]*: ", handler):
        return handler
    config = summary(entry.config_cls)
    return config.split("``: ", 1)[1] if "``: " in config else module_line


def list_spec_details(which: str) -> dict:
    """The prefixes and built-in names of model specs (``which="models"``) or data specs (``"data"``), each
    with the first line of its resolver's or factory's docstring."""
    if which == "models":
        from torchslim.zoo import _MODELS as registry
    elif which == "data":
        from torchslim.data import _DATA as registry
    else:
        raise ValueError(f"which: expected 'models' or 'data', got {which!r}")
    registry.prefixes()  # imports the modules that register them
    prefixes = [{"prefix": f"{name}:", "help": summary(resolver) if name != "builtin" else
                 f"builtin:NAME, one of the {registry.builtin_noun}s below"}
                for name, resolver in sorted(registry.resolvers.items())]
    builtins = [{"name": f"builtin:{name}", "help": summary(factory)}
                for name, factory in sorted(registry.builtins.items())]
    return {"prefixes": prefixes, "builtins": builtins}
