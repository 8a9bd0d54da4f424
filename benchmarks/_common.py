"""Shared by the benchmark scripts: argument parsing, JSON output and goal lines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def goal(name: str, value: float, target: str, met: bool) -> dict:
    print(f"{'MET ' if met else 'MISS'}  {name}: {value} (goal {target})")
    return {"goal": name, "value": value, "target": target, "met": bool(met)}


def step_context(bundle, data, workdir: Path):
    """A pipeline StepContext over a resolved model and data (the teacher is a frozen copy of the model)."""
    import copy

    import torch

    from torchslim._context import _StepContext as StepContext

    return StepContext(model=bundle.model, teacher=copy.deepcopy(bundle.model).eval().requires_grad_(False),
                       bundle=bundle, data=data, seed=0, threads=torch.get_num_threads(), workdir=workdir,
                       progress=False, where="benchmark")


def evaluate_model(model, context, reference=None):
    """(Evaluation, outputs) of an eager model on the test split, scored as the pipeline scores a stage."""
    from torchslim.measure.stage import collect_outputs, evaluate
    from torchslim.runtime import TorchDeployable

    outputs, labels = collect_outputs(TorchDeployable(model), context.data, context.bundle.preprocess, 64, 0)
    return evaluate(outputs, labels, reference, context.bundle.task), outputs
