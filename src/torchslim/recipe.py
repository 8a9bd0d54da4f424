"""Recipes: a YAML file that names a model, data, an ordered list of compression steps and how to measure.

    model: builtin:digits-cnn
    data: builtin:digits
    steps:                      # run in order; each item has exactly one key naming its kind
      - prune:    {method: magnitude, sparsity: 0.5}
      - finetune: {epochs: 3, distill: {temperature: 4.0, alpha: 0.7}}
      - quantize: {method: int8-static, runtime: auto}
    measure: {batch_size: 256}

`load_recipe` reads and validates it into a `Recipe`; every error names the file, the step index and the field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from torchslim import data as data_specs
from torchslim import zoo
from torchslim._config import FieldError, check, from_dict, to_dict
from torchslim.data.config import DataConfig, as_data_config
from torchslim.errors import InputError
from torchslim.export.config import ExportConfig, export_from_recipe
from torchslim.registry import STEP_KINDS, default_method, get_method
from torchslim.zoo.config import ModelConfig, as_model_config

SCHEMA_VERSION = 1


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

    def __post_init__(self) -> None:
        self.model, self.data = as_model_config(self.model), as_data_config(self.data)

    def to_dict(self) -> dict:
        return {
            "version": SCHEMA_VERSION,
            "model": self.model.to_recipe(),
            "data": self.data.to_recipe(),
            "seed": self.seed,
            "steps": [step.to_dict() for step in self.steps],
            "measure": to_dict(self.measure),
            "export": to_dict(self.export),
        }


_TOP_LEVEL = ("version", "model", "data", "steps", "measure", "seed", "export")


def _spec_config(raw: Any, key: str, cls: type, source: str):
    """The model/data entry: a spec string, or a mapping validated as ``cls`` (a `ModelConfig`/`DataConfig`)."""
    example = "builtin:digits-cnn" if key == "model" else "builtin:digits"
    if isinstance(raw, str) and raw:
        return cls(spec=raw)
    if isinstance(raw, dict):
        if not raw.get("spec"):
            raise InputError(f"{source}: {key}.spec: required, a spec string such as {example}")
        try:
            return from_dict(cls, raw, prefix=f"{key}.")
        except FieldError as error:
            raise InputError(f"{source}: {error}") from None
    raise InputError(f"{source}: {key}: required, a spec string such as {example} (or a mapping with spec:)")


def _parse_step(item: Any, index: int, where: str) -> Step:
    at = f"{where}: steps[{index}]"
    if not isinstance(item, dict) or len(item) != 1:
        raise InputError(f"{at}: each step must be a mapping with exactly one key naming its kind "
                         f"({', '.join(STEP_KINDS)}), got {item!r}")
    ((kind, body),) = item.items()
    if kind not in STEP_KINDS:
        raise InputError(f"{at}: unknown step kind {kind!r} (known: {', '.join(STEP_KINDS)})")
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise InputError(f"{at}.{kind}: expected a mapping of settings, got {body!r}")
    body = dict(body)
    method = body.pop("method", None) or default_method(kind)
    if method is None:
        raise InputError(f"{at}.{kind}.method: required (e.g. method: magnitude)")
    try:
        entry = get_method(kind, str(method))
    except KeyError as error:
        raise InputError(f"{at}.{kind}.method: {error.args[0]}") from None
    try:
        config = from_dict(entry.config_cls, body)
    except FieldError as error:
        raise InputError(f"{at}.{kind}.{error}") from None
    return Step(kind=kind, method=entry.name, config=config)


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a plain dict (as loaded from YAML)."""
    if not isinstance(raw, dict):
        raise InputError(f"{source}: a recipe must be a mapping with keys model, data, steps, got {type(raw).__name__}")
    for key in raw:
        if key not in _TOP_LEVEL:
            raise InputError(f"{source}: {key}: unknown key (known: {', '.join(_TOP_LEVEL)})")
    if raw.get("version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise InputError(f"{source}: version: this torchslim reads recipe version {SCHEMA_VERSION}, "
                         f"got {raw['version']!r}")
    model = _spec_config(raw.get("model"), "model", ModelConfig, source)
    data = _spec_config(raw.get("data"), "data", DataConfig, source)
    try:
        zoo.check_spec(model)
        data_specs.check_spec(data)
    except InputError as error:
        raise InputError(f"{source}: {error}") from None
    try:
        export = from_dict(ExportConfig, export_from_recipe(raw.get("export") or "auto"), prefix="export.")
    except FieldError as error:
        raise InputError(f"{source}: {error}") from None
    steps_raw = raw.get("steps") or []
    if not isinstance(steps_raw, list):
        raise InputError(f"{source}: steps: expected a list of steps, got {steps_raw!r}")
    steps = [_parse_step(item, i, source) for i, item in enumerate(steps_raw)]
    _check_order(steps, source)
    try:
        measure = from_dict(MeasureConfig, raw.get("measure") or {}, prefix="measure.")
    except FieldError as error:
        raise InputError(f"{source}: {error}") from None
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"{source}: seed: expected a non-negative int, got {seed!r}")
    return Recipe(model=model, data=data, steps=steps, measure=measure, seed=seed, source=source, export=export)


def _check_order(steps: list[Step], source: str) -> None:
    # A quantized artifact runs on an inference runtime, and run-time generated weights are frozen codes:
    # nothing can train or prune either afterwards.
    for index, step in enumerate(steps[:-1]):
        if step.kind in ("quantize", "materialize"):
            raise InputError(f"{source}: steps[{index}].{step.kind}: must be the last step "
                             f"(steps after it would need a float model)")


def apply_overrides(raw: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw recipe dict; returns a new dict.

    Paths index lists by number: ``steps.0.prune.sparsity=0.6``, ``measure.batch_size=128``.
    """
    result = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"{source} {item!r}: expected key=value, e.g. measure.batch_size=128")
        path, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        keys = path.split(".")
        node: Any = result
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise InputError(f"{source} {item!r}: {'.'.join(keys[:depth + 1])}: no such list index")
                key = int(key)
            elif not isinstance(node, dict):
                raise InputError(f"{source} {item!r}: {'.'.join(keys[:depth])} is not a mapping")
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
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise InputError(f"{path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file") from None
    if isinstance(raw, dict) and overrides:
        raw = apply_overrides(raw, overrides)
    return parse_recipe(raw, source=str(path))
