"""A JSON Schema of recipes, generated from the config dataclasses, for editors' completion and checks.

    torchslim schema > recipe.schema.json

and, in VS Code with the YAML extension, the first line of a recipe::

    # yaml-language-server: $schema=recipe.schema.json

The schema knows every key, type, choice and default, and each field's help (see `torchslim.catalog`). It cannot
know everything `torchslim check` knows (ranges checked in code, which spec prefixes plugins add, the order of
steps): a recipe the schema accepts may still be refused, with a message that names the field.

Example:
    >>> schema = recipe_schema()
    >>> sorted(schema["properties"])[:3]
    ['data', 'export', 'measure']
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# YAML 1.1 (PyYAML) reads 5e-4, with no dot, as a string; torchslim accepts such a string for a float field.
_NUMBER_TEXT = r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"


class _Builder:
    """Schemas of types; each config class once, under ``$defs``, referenced where it is used."""

    def __init__(self) -> None:
        self.defs: dict[str, dict] = {}
        self.names: dict[type, str] = {}

    def of_type(self, tp: Any, field: str) -> dict:
        origin = typing.get_origin(tp)
        if tp is Any:
            return {}
        if origin in (Union, types.UnionType):
            return {"anyOf": [self.of_type(arg, field) for arg in typing.get_args(tp)]}
        if tp is type(None):
            return {"type": "null"}
        if origin is Literal:
            return {"enum": list(typing.get_args(tp))}
        if origin is list:
            (item,) = typing.get_args(tp)
            return {"type": "array", "items": self.of_type(item, f"{field}[]")}
        if origin is dict:
            _, value = typing.get_args(tp)
            return {"type": "object", "additionalProperties": self.of_type(value, f"{field}.*")}
        if dataclasses.is_dataclass(tp):
            return {"$ref": f"#/$defs/{self.config(tp)}"}
        return self._scalar(tp, field)

    @staticmethod
    def _scalar(tp: Any, field: str) -> dict:
        from torchslim._config import limit_for

        if tp is bool:
            return {"type": "boolean"}
        if tp is int:
            limit = limit_for(field)
            return {"type": "integer", **({"maximum": limit} if limit is not None else {})}
        if tp is float:
            return {"anyOf": [{"type": "number"}, {"type": "string", "pattern": _NUMBER_TEXT}]}
        if tp is str:
            return {"type": "string"}
        raise TypeError(f"no JSON Schema for config field type {tp!r} ({field})")

    def config(self, cls: type) -> str:
        """The ``$defs`` name of config class ``cls``, adding its schema on first use."""
        if cls in self.names:
            return self.names[cls]
        name = cls.__name__ if cls.__name__ not in self.defs else f"{cls.__module__}.{cls.__name__}"
        self.names[cls] = name
        self.defs[name] = {}  # reserved first: a config may nest itself
        self.defs[name] = self.object_of(cls)
        return name

    def object_of(self, cls: type) -> dict:
        """The schema of a mapping that configures ``cls``: its fields, no other keys."""
        from torchslim.catalog import default_value, field_help, summary

        hints = typing.get_type_hints(cls)
        helps = field_help(cls)
        properties, required = {}, []
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            schema = self.of_type(hints[field.name], field.name)
            if helps.get(field.name):
                schema["description"] = helps[field.name]
            default = default_value(field)
            if default is dataclasses.MISSING:
                required.append(field.name)
            else:
                schema["default"] = default
            properties[field.name] = schema
        result = {"type": "object", "description": summary(cls), "properties": properties,
                  "additionalProperties": False}
        if required:
            result["required"] = required
        return result


def _step_schema(builder: _Builder) -> dict:
    """One step: a mapping with one key, the kind, whose settings name a method of that kind (or leave it out
    for the kind's default method)."""
    from torchslim.catalog import list_method_details
    from torchslim.registry import STEP_KINDS, default_method, list_methods

    helps = {(m["kind"], m["method"]): m["help"] for m in list_method_details()}
    properties = {}
    for kind in STEP_KINDS:
        methods = []
        for entry in list_methods(kind):
            body = dict(builder.object_of(entry.config_cls))
            body["properties"] = {"method": {"const": entry.name, "description": helps[(kind, entry.name)]},
                                  **body["properties"]}
            body["description"] = helps[(kind, entry.name)]
            if default_method(kind) != entry.name:
                body["required"] = ["method", *body.get("required", [])]
            methods.append(body)
        if default_method(kind) is not None:
            methods.append({"type": "null"})  # `- finetune:` with nothing after it
        properties[kind] = {"anyOf": methods}
    return {"type": "object", "description": "One step: its kind as the only key.", "properties": properties,
            "additionalProperties": False, "minProperties": 1, "maxProperties": 1}


def _spec_schema(builder: _Builder, which: str, cls: type) -> dict:
    from torchslim.catalog import list_spec_details

    details = list_spec_details("models" if which == "model" else "data")
    prefixes = ", ".join(p["prefix"] for p in details["prefixes"])
    builtins = [b["name"] for b in details["builtins"]]
    return {"description": f"The {which} spec (prefixes: {prefixes}), or a mapping with spec: and options.",
            "anyOf": [{"enum": builtins}, {"type": "string", "pattern": r"^[A-Za-z][\w.-]*:.+"},
                      {"$ref": f"#/$defs/{builder.config(cls)}"}]}


def recipe_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a recipe, from the registered methods and the config dataclasses.

    Methods and spec prefixes that plugins register are included when their plugins are loaded.
    """
    from torchslim.data.config import DataConfig
    from torchslim.export.config import KINDS, ExportConfig
    from torchslim.recipe import SCHEMA_VERSION, MeasureConfig
    from torchslim.search.config import SearchConfig
    from torchslim.zoo.config import ModelConfig

    builder = _Builder()
    builder.defs["Step"] = _step_schema(builder)
    export_kind = {"enum": list(KINDS)}
    properties = {
        "version": {"const": SCHEMA_VERSION, "description": "The recipe format's version."},
        "model": _spec_schema(builder, "model", ModelConfig),
        "data": _spec_schema(builder, "data", DataConfig),
        "seed": {"type": "integer", "minimum": 0, "default": 0, "description": "Seeds every random choice."},
        "steps": {"type": "array", "items": {"$ref": "#/$defs/Step"},
                  "description": "Run in order; each item has exactly one key naming its kind."},
        "measure": {"$ref": f"#/$defs/{builder.config(MeasureConfig)}"},
        "export": {"description": "Artifacts for other tools: auto, none, a list of kinds, or a mapping.",
                   "anyOf": [export_kind, {"type": "array", "items": export_kind},
                             {"$ref": f"#/$defs/{builder.config(ExportConfig)}"}]},
        "search": {"anyOf": [{"$ref": f"#/$defs/{builder.config(SearchConfig)}"}, {"type": "null"}],
                   "description": "The search of `torchslim auto` (space, objectives, constraints)."},
    }
    return {"$schema": SCHEMA_DIALECT, "title": "torchslim recipe", "type": "object", "properties": properties,
            "required": ["model", "data"],
            "additionalProperties": False, "$defs": dict(sorted(builder.defs.items()))}
