"""The commands that read and print without running anything: ``--version``, ``list``, ``check`` (and
``compress --dry-run``), ``schema``. None of them loads a model or data."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import textwrap
from typing import Any


def version_text() -> str:
    """``torchslim X.Y.Z (torch A.B.C+build, Python D.E.F)``; torch's own ``__version__`` names its build (+cpu,
    +cu130), which its package metadata may leave out."""
    import platform

    from torchslim._version import __version__

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return f"torchslim {__version__} (torch {torch_version}, Python {platform.python_version()})"


class VersionAction(argparse.Action):
    """``--version``: print `version_text` and exit 0 (computed only when asked for)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit(0)


def add_parsers(sub) -> list[argparse.ArgumentParser]:
    """The ``list``, ``check`` and ``schema`` subcommands; returns them (the caller adds the shared options)."""
    listing = sub.add_parser("list", help="list the methods, model specs or data specs a recipe can name")
    listing.add_argument("what", choices=("methods", "models", "data"), help="what to list")
    listing.add_argument("--kind", default=None, metavar="KIND",
                         help="methods of this step kind only (prune, quantize, ...)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")
    check = sub.add_parser("check", help="validate a recipe and print it resolved (every default filled in), "
                                         "without loading the model or the data")
    check.add_argument("recipe", help="recipe file")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, as for compress (repeatable)")
    schema = sub.add_parser("schema", help="print the JSON Schema of recipes (for editor completion)")
    schema.add_argument("--indent", type=int, default=2, help="JSON indentation (default 2)")
    return [listing, check, schema]


def resolved_yaml(recipe) -> str:
    """The recipe as `torchslim check` prints it: every field, defaults filled in, in recipe order."""
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True, width=100)


def run_check(args) -> None:
    """``torchslim check RECIPE``: raises `torchslim.errors.RecipeError` listing every problem."""
    from torchslim.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    sys.stdout.write(resolved_yaml(recipe))
    steps = ", ".join(step.name for step in recipe.steps) or "no steps"
    logging.getLogger("torchslim").info(f"{args.recipe}: valid ({recipe.model} on {recipe.data}; {steps})")


def run_schema(args) -> None:
    from torchslim.schema import recipe_schema

    print(json.dumps(recipe_schema(), indent=args.indent if args.indent > 0 else None, ensure_ascii=False))


def run_list(args) -> None:
    from torchslim.catalog import list_method_details, list_spec_details
    from torchslim.errors import InputError
    from torchslim.registry import STEP_KINDS

    if args.what != "methods":
        if args.kind is not None:
            raise InputError(f"--kind: lists methods only (torchslim list methods --kind {args.kind})")
        details = list_spec_details(args.what)
        print(json.dumps(details, indent=2) if args.json else _specs_text(args.what, details))
        return
    if args.kind is not None and args.kind not in STEP_KINDS:
        from torchslim._config import did_you_mean

        raise InputError(f"--kind: unknown step kind {args.kind!r}{did_you_mean(args.kind, STEP_KINDS)} "
                         f"(known: {', '.join(STEP_KINDS)})")
    methods = list_method_details(args.kind)
    print(json.dumps(methods, indent=2, default=str) if args.json else _methods_text(methods))


def _plain(text: str) -> str:
    """Docstring markup (``code``, `name`) as plain terminal text."""
    return text.replace("``", "").replace("`", "")


def _wrap(text: str, indent: int) -> str:
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    return textwrap.fill(_plain(text), width=width, initial_indent=" " * indent, subsequent_indent=" " * indent)


def _default_text(field: dict) -> str:
    if field["required"]:
        return "required"
    value = field["default"]
    return json.dumps(value, default=str) if not isinstance(value, str) else value


def _methods_text(methods: list[dict]) -> str:
    blocks = []
    for method in methods:
        default = " (the default: method may be left out)" if method["default"] else ""
        lines = [f"{method['kind']}: {{method: {method['method']}}}{default}", _wrap(method["help"], 2)]
        for field in method["fields"]:
            lines.append(f"    {field['name']}: {field['type']} = {_default_text(field)}")
            if field["help"]:
                lines.append(_wrap(field["help"], 8))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _specs_text(what: str, details: dict[str, Any]) -> str:
    noun = "model" if what == "models" else "data"
    lines = [f"{noun} spec prefixes:"]
    lines += [f"  {p['prefix']:<14}{_plain(p['help'])}" for p in details["prefixes"]]
    lines += ["", f"built-in {'models' if what == 'models' else 'data sets'}:"]
    lines += [f"  {b['name']:<28}{_plain(b['help'])}" for b in details["builtins"]]
    return "\n".join(lines)
