"""Recipes: a YAML file that names a model, data, an ordered list of compression steps and how to measure.

    model: builtin:digits-cnn
    data: builtin:digits
    steps:                      # run in order; each item has exactly one key naming its kind
      - prune:    {method: magnitude, sparsity: 0.5}
      - finetune: {epochs: 3, distill: {temperature: 4.0, alpha: 0.7}}
      - quantize: {method: int8-static, runtime: auto}
    measure: {batch_size: 256}

`load_recipe` reads and validates it into a `Recipe`; every error names the file, the step index and the field.
YAML is read by `RecipeLoader` (PyYAML's safe loader, stricter): no anchors or aliases, no duplicate keys, at
most `MAX_RECIPE_BYTES` of text.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from torchslim import data as data_specs
from torchslim import zoo
from torchslim._config import FieldError, check, did_you_mean, from_dict, to_dict
from torchslim.data.config import DataConfig, as_data_config
from torchslim.errors import InputError, RecipeError, key_text, shorten
from torchslim.export.config import ExportConfig, export_from_recipe
from torchslim.registry import STEP_KINDS, default_method, get_method
from torchslim.zoo.config import ModelConfig, as_model_config

SCHEMA_VERSION = 1
MAX_RECIPE_BYTES = 1 << 20


class RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses anchors and aliases and duplicate keys.

    Aliases let a few hundred bytes expand to gigabytes ("billion laughs") and a recipe never needs them; a
    duplicate key would silently let the last value win.
    """

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "recipes do not use YAML anchors or aliases (&name, *name): write each value out",
                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shorten(key)} (first at line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> Any:
    """Parse recipe YAML with `RecipeLoader`.

    Raises:
        InputError: malformed YAML, an anchor or alias, a duplicate key, or nesting too deep; names ``source``
            and the line.
    """
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise InputError(f"{source}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise InputError(f"{source}: malformed YAML: nested too deeply") from None
    except ValueError as error:  # e.g. an int of more digits than Python converts
        raise InputError(f"{source}: malformed YAML: {str(error).split(';')[0][:200]}") from None


@dataclass
class MeasureConfig:
    """How every stage is measured.

    Args:
        batch_size: the batched latency's batch size (batch 1 is always measured too).
        threads: intra-op threads for every runtime; 0 means all cores this process may use (recorded).
        warmup: untimed runs before timing.
        repeats: timed runs; the median is reported.
        max_eval_samples: evaluate on at most this many test samples (0: all).
    """

    batch_size: int = 64
    threads: int = 0
    warmup: int = 3
    repeats: int = 15
    max_eval_samples: int = 0

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        check(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        check(self.repeats >= 1, "repeats", f"must be >= 1, got {self.repeats}")
        check(self.max_eval_samples >= 0, "max_eval_samples", f"must be >= 0, got {self.max_eval_samples}")


@dataclass
class Step:
    """One resolved recipe step: its kind, method name and validated config."""

    kind: str
    method: str
    config: Any

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.method}"

    def to_dict(self) -> dict:
        return {self.kind: {"method": self.method, **to_dict(self.config)}}


@dataclass
class Recipe:
    """A validated recipe. Build it with `load_recipe` or `parse_recipe`.

    ``model`` and ``data`` are a `ModelConfig` and a `DataConfig` (spec strings given here are converted); their
    ``str()`` is the spec.
    """

    model: ModelConfig
    data: DataConfig
    steps: list[Step] = field(default_factory=list)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    seed: int = 0
    source: str = "<recipe>"
    export: ExportConfig = field(default_factory=ExportConfig)
    search: Any = None  # a `torchslim.search.config.SearchConfig` for `torchslim auto`, or None

    def __post_init__(self) -> None:
        self.model, self.data = as_model_config(self.model), as_data_config(self.data)

    def to_dict(self) -> dict:
        raw = {
            "version": SCHEMA_VERSION,
            "model": self.model.to_recipe(),
            "data": self.data.to_recipe(),
            "seed": self.seed,
            "steps": [step.to_dict() for step in self.steps],
            "measure": to_dict(self.measure),
            "export": to_dict(self.export),
        }
        if self.search is not None:
            raw["search"] = to_dict(self.search)
        return raw


_TOP_LEVEL = ("version", "model", "data", "steps", "measure", "seed", "export", "search")


class _Problems:
    """Collects a recipe's problems (``field: message`` texts), so that one run reports them all."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        self.items.append(text)

    def config(self, cls: type, raw: Any, prefix: str = "", at: str = "") -> Any:
        """``from_dict(cls, raw, prefix)``, or None after recording its problems (each under ``at``)."""
        try:
            return from_dict(cls, raw, prefix=prefix)
        except FieldError as error:
            for problem in error.problems:
                self.add(f"{at}{problem}")
        return None


def _spec_config(raw: Any, key: str, cls: type, problems: _Problems):
    """The model/data entry: a spec string, or a mapping validated as ``cls`` (a `ModelConfig`/`DataConfig`)."""
    example = "builtin:digits-cnn" if key == "model" else "builtin:digits"
    if isinstance(raw, str) and raw:
        return cls(spec=raw)
    if isinstance(raw, dict):
        if not raw.get("spec"):
            problems.add(f"{key}.spec: required, a spec string such as {example}")
            return None
        return problems.config(cls, raw, prefix=f"{key}.")
    problems.add(f"{key}: required, a spec string such as {example} (or a mapping with spec:)")
    return None


def _check_spec(config: Any, check_spec: Any, problems: _Problems) -> None:
    if config is not None:
        try:
            check_spec(config)
        except InputError as error:
            problems.add(str(error))


def _parse_step(item: Any, index: int, problems: _Problems) -> Step | None:
    at = f"steps[{index}]"
    if not isinstance(item, dict) or len(item) != 1:
        problems.add(f"{at}: each step must be a mapping with exactly one key naming its kind "
                     f"({', '.join(STEP_KINDS)}), got {shorten(item)}")
        return None
    ((kind, body),) = item.items()
    if not isinstance(kind, str) or kind not in STEP_KINDS:
        problems.add(f"{at}: unknown step kind {shorten(kind)}{did_you_mean(kind, STEP_KINDS)} "
                     f"(known: {', '.join(STEP_KINDS)})")
        return None
    body = {} if body is None else body
    if not isinstance(body, dict):
        problems.add(f"{at}.{kind}: expected a mapping of settings, got {shorten(body)}")
        return None
    body = dict(body)
    method = body.pop("method", None) or default_method(kind)
    if method is None:
        problems.add(f"{at}.{kind}.method: required (e.g. method: {_example_method(kind)})")
        return None
    if not isinstance(method, str) or len(method) > 100:
        problems.add(f"{at}.{kind}.method: expected a method name, got {shorten(method)}")
        return None
    try:
        entry = get_method(kind, method)
    except KeyError as error:
        problems.add(f"{at}.{kind}.method: {error.args[0]}")
        return None
    config = problems.config(entry.config_cls, body, at=f"{at}.{kind}.")
    return None if config is None else Step(kind=kind, method=entry.name, config=config)


def _example_method(kind: str) -> str:
    from torchslim.registry import list_methods

    names = [entry.name for entry in list_methods(kind)]
    return "magnitude" if "magnitude" in names else (names[0] if names else "NAME")


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a plain dict (as loaded from YAML).

    Raises:
        RecipeError: every problem found (an unknown key, step kind, method or spec prefix, a mistyped or
            out-of-range field), each naming the step and the field, with "did you mean" for near misses.
    """
    if not isinstance(raw, dict):
        raise InputError(f"{source}: a recipe must be a mapping with keys model, data, steps, got {type(raw).__name__}")
    problems = _Problems()
    for key in raw:
        if key not in _TOP_LEVEL:
            problems.add(f"{key_text(key)}: unknown key{did_you_mean(key, _TOP_LEVEL)} "
                         f"(known: {', '.join(_TOP_LEVEL)})")
    if raw.get("version", SCHEMA_VERSION) != SCHEMA_VERSION:
        problems.add(f"version: this torchslim reads recipe version {SCHEMA_VERSION}, got {shorten(raw['version'])}")
    model = _spec_config(raw.get("model"), "model", ModelConfig, problems)
    data = _spec_config(raw.get("data"), "data", DataConfig, problems)
    _check_spec(model, zoo.check_spec, problems)
    _check_spec(data, data_specs.check_spec, problems)
    export = problems.config(ExportConfig, export_from_recipe(raw.get("export") or "auto"), prefix="export.")
    steps_raw = raw.get("steps") or []
    steps: list[Step | None] = []
    if not isinstance(steps_raw, list):
        problems.add(f"steps: expected a list of steps, got {shorten(steps_raw)}")
    else:
        steps = [_parse_step(item, i, problems) for i, item in enumerate(steps_raw)]
        _check_order(steps, problems)
    measure = problems.config(MeasureConfig, raw.get("measure") or {}, prefix="measure.")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 63:
        problems.add(f"seed: expected a non-negative int, got {shorten(seed)}")
    search = _parse_search(raw, problems)
    if problems.items:
        raise RecipeError(source, problems.items)
    return Recipe(model=model, data=data, steps=steps, measure=measure, seed=seed, source=source, export=export,
                  search=search)


def _parse_search(raw: dict, problems: _Problems) -> Any:
    """The ``search:`` section (`torchslim auto`) as a validated `SearchConfig`, or None without one."""
    if "search" not in raw:
        return None
    from torchslim.search.config import SearchConfig

    body = raw["search"] if raw["search"] is not None else {}
    if not isinstance(body, dict):
        problems.add(f"search: expected a mapping (space, objectives, constraints, ...), got {shorten(body)}")
        return None
    return problems.config(SearchConfig, body, prefix="search.")


def _check_order(steps: list[Step | None], problems: _Problems) -> None:
    # A quantized artifact runs on an inference runtime, and run-time generated weights are frozen codes:
    # nothing can train or prune either afterwards.
    for index, step in enumerate(steps[:-1]):
        if step is not None and step.kind in ("quantize", "materialize"):
            problems.add(f"steps[{index}].{step.kind}: must be the last step (steps after it would need a float model)")


def apply_overrides(raw: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw recipe dict; returns a new dict.

    Paths index lists by number: ``steps.0.prune.sparsity=0.6``, ``measure.batch_size=128``.
    """
    result = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"{source} {shorten(item)}: expected key=value, e.g. measure.batch_size=128")
        path, text = item.split("=", 1)
        try:
            value = load_yaml(text, f"{source} {path}")
        except InputError:
            value = text  # not YAML: the text itself (a spec such as file:a.py:make)
        keys = path.split(".")
        node: Any = result
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise InputError(f"{source} {shorten(item)}: {'.'.join(keys[:depth + 1])}: no such list index")
                key = int(key)
            elif not isinstance(node, dict):
                raise InputError(f"{source} {shorten(item)}: {'.'.join(keys[:depth])} is not a mapping")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return result


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe file.

    Raises:
        InputError: the file is missing or malformed, or a field is unknown, mistyped or out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise InputError(f"{path}: {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} bytes of YAML")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file (UTF-8)") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read the recipe: {error.strerror or error}") from None
    raw = load_yaml(text, str(path))
    if isinstance(raw, dict) and overrides:
        raw = apply_overrides(raw, overrides)
    return parse_recipe(raw, source=str(path))
