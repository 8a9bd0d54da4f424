"""Shared by the benchmark scripts: one flag vocabulary, one JSON layout, goal lines.

Flags (`parser`): ``--json PATH`` writes the results; ``--threads N`` sets torch's intra-op threads (0: all cores
this process may use); ``--seed N`` where the script draws random numbers; ``--parts a,b`` where it has parts.
Lists are comma-separated everywhere (``--parts``, ``--models``, ``--rows``, ``--seeds``).

Layout (`write_results`), the same for every script::

    {"benchmark": "demo",                        # the script's name
     "date": "2026-12-07T10:00:00+00:00",        # when the results were written, UTC
     "environment": {...},                       # torchslim.report.environment (CPU, ISA flags, threads, versions)
                                                 # + CPUs and the load average at start and end
     "args": {...},                              # the parsed flags
     "rows": [{...}, ...],                       # one flat dict per measured row (a "part" key where several)
     "goals": [{"goal", "value", "target", "met"}, ...],
     "details": {...}}                           # optional: what a script records beyond its rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

LAYOUT = ("benchmark", "date", "environment", "args", "rows", "goals")


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none): how busy the machine was."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# Taken when a script imports this module, i.e. as it starts: with the load at the end, the JSON says whether the
# figures were measured on a busy machine.
LOAD_AT_START = load_average()
GOAL_KEYS = ("goal", "value", "target", "met")
SCALARS = (str, int, float, bool, type(None))


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line."""

    def error(self, message: str):
        """Bad flags: one line and exit code 2 (argparse's default also prints the usage)."""
        self.exit(2, f"{self.prog}: {message}\n")


def comma_list(known: Sequence[str] | None = None, what: str = "") -> Callable[[str], list[str]]:
    """An argparse ``type``: ``"a,b"`` -> ``["a", "b"]``, each checked against ``known`` when given."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if known is not None and item not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what or 'value'} {', '.join(unknown)} "
                                             f"(choose from {', '.join(known)})")
        return items

    return parse


def parser(description: str, *, threads: int | None = 0, seed: int | None = None,
           parts: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The flags every benchmark shares. ``threads``: the default of ``--threads`` (None: leave torch's own
    count); ``seed``: the default of ``--seed`` (None: no such flag); ``parts``: the script's parts, all run by
    default (None: no ``--parts``)."""
    p = ArgumentParser(description=description)
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=threads, metavar="N",
                   help="torch intra-op threads, 0: all cores this process may use "
                        f"(default {'torch’s own' if threads is None else threads})")
    if seed is not None:
        p.add_argument("--seed", type=int, default=seed, metavar="N", help=f"random seed (default {seed})")
    if parts is not None:
        p.add_argument("--parts", type=comma_list(parts, "part"), default=list(parts), metavar="A,B",
                       help=f"comma-separated parts to run (default all: {','.join(parts)})")
    return p


def deprecated_alias(p: argparse.ArgumentParser, old: str, new: str,
                     convert: Callable[[Any, Any], Any] = lambda value, current: value, **kwargs) -> None:
    """Keep ``old`` working for one release, hidden from ``--help``: it sets ``new``'s value to
    ``convert(value, current value)`` and says on stderr that it is deprecated."""
    target = next(action for action in p._actions if new in action.option_strings)

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"note: {old} is deprecated, use {new}", file=sys.stderr)
            setattr(namespace, target.dest, convert(values, getattr(namespace, target.dest, None)))

    p.add_argument(old, dest=target.dest, action=Alias, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def apply_threads(args: argparse.Namespace) -> int:
    """Fix torch's intra-op threads to ``--threads`` (None: leave torch's own); returns the count in force."""
    import torch

    from torchslim.measure import set_threads

    return torch.get_num_threads() if args.threads is None else set_threads(args.threads)


def goal(name: str, value: Any, target: str, met: bool) -> dict:
    print(f"{'MET ' if met else 'MISS'}  {name}: {value} (goal {target})")
    return {"goal": name, "value": value, "target": target, "met": bool(met)}


def flat(record: dict, prefix: str = "") -> dict:
    """A row with its nested mappings spread into dotted keys: ``{"ratios": {"size": 2}}`` -> ``{"ratios.size": 2}``."""
    out: dict = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def layout_problems(payload: Any) -> list[str]:
    """What keeps ``payload`` from being the benchmark layout (empty when it is)."""
    if not isinstance(payload, dict):
        return ["not a JSON object"]
    problems = [f"missing {key!r}" for key in LAYOUT if key not in payload]
    problems += [f"unknown key {key!r}" for key in payload if key not in LAYOUT + ("details",)]
    types = {"benchmark": str, "date": str, "environment": dict, "args": dict, "rows": list, "goals": list,
             "details": dict}
    problems += [f"{key!r} is not a {kind.__name__}" for key, kind in types.items()
                 if key in payload and not isinstance(payload[key], kind)]
    if problems:
        return problems
    try:
        datetime.fromisoformat(payload["date"])
    except ValueError:
        problems.append(f"'date' is not an ISO date: {payload['date']!r}")
    for i, row in enumerate(payload["rows"]):
        if not isinstance(row, dict):
            problems.append(f"rows[{i}] is not an object")
            continue
        problems += [f"rows[{i}][{key!r}] is nested" for key, value in row.items()
                     if not (isinstance(value, SCALARS)
                             or isinstance(value, list) and all(isinstance(v, SCALARS) for v in value))]
    for i, item in enumerate(payload["goals"]):
        if not isinstance(item, dict) or sorted(item) != sorted(GOAL_KEYS) or not isinstance(item["met"], bool):
            problems.append(f"goals[{i}] is not {{{', '.join(GOAL_KEYS)}}} with a boolean 'met'")
    return problems


def results(benchmark: str, args: argparse.Namespace | dict, rows: Iterable[dict], goals: Iterable[dict],
            details: dict | None = None, threads: int | None = None) -> dict:
    """The layout of one run (see the module docstring); ``threads`` defaults to torch's count now."""
    import torch

    from torchslim.report import environment

    env = environment(torch.get_num_threads() if threads is None else threads)
    env["cpus"] = os.cpu_count()
    if LOAD_AT_START is not None:
        env["load_average"] = {"start": LOAD_AT_START, "end": load_average()}
    payload = {"benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "environment": env,
               "args": dict(args if isinstance(args, dict) else vars(args)),
               "rows": [flat(row) for row in rows], "goals": list(goals)}
    if details:
        payload["details"] = details
    problems = layout_problems(payload)
    if problems:
        raise ValueError(f"{benchmark}: results not in the benchmark layout: {'; '.join(problems)}")
    return payload


def write_results(args: argparse.Namespace, rows: Iterable[dict], goals: Iterable[dict], details: dict | None = None,
                  *, benchmark: str | None = None, threads: int | None = None) -> dict:
    """The one writer: the run's results in the benchmark layout, written to ``--json`` when given (to a temporary
    file first, renamed when complete). ``benchmark`` defaults to the running script's name."""
    payload = results(benchmark or Path(sys.argv[0]).stem, args, rows, goals, details, threads)
    if getattr(args, "json", None):
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(partial, path)
        print(f"wrote {path}")
    return payload


def step_context(bundle, data, workdir: Path, seed: int = 0):
    """A pipeline StepContext over a resolved model and data (the teacher is a frozen copy of the model)."""
    import copy

    import torch

    from torchslim._context import _StepContext as StepContext

    return StepContext(model=bundle.model, teacher=copy.deepcopy(bundle.model).eval().requires_grad_(False),
                       bundle=bundle, data=data, seed=seed, threads=torch.get_num_threads(), workdir=workdir,
                       progress=False, where="benchmark")


def evaluate_model(model, context, reference=None):
    """(Evaluation, outputs) of an eager model on the test split, scored as the pipeline scores a stage."""
    from torchslim.measure.stage import collect_outputs, evaluate
    from torchslim.runtime import TorchDeployable

    outputs, labels = collect_outputs(TorchDeployable(model), context.data, context.bundle.preprocess, 64, 0)
    return evaluate(outputs, labels, reference, context.bundle.task), outputs


def alternating_rounds(models: dict[str, Callable[[Any], Any]], inputs: Any, rounds: int,
                       repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each of ``models`` on ``inputs``, one figure per round: ``rounds`` rounds, each
    timing every model (``repeats`` calls, median) in an order rotated by one each round, so that load from
    other work weighs on all of them alike. The first call of each (set-up, a compile) is not counted."""
    import torch

    from torchslim.measure import measure_latency

    names = list(models)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            models[name](inputs)
        for index in range(rounds):
            for name in names[index % len(names):] + names[:index % len(names)]:
                samples[name].append(measure_latency(models[name], inputs, warmup=1, repeats=repeats).median_ms)
    return samples
