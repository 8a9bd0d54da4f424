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
