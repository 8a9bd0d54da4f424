"""The demo's targets, measured: `python benchmarks/demo.py [--json PATH]`.

Runs `torchslim demo` (builtin:digits-cnn on builtin:digits: prune 50% -> distil -> int8 static on ONNX
Runtime, batch 256) in this process, timing the whole job, and checks the issue's goals: final vs baseline
accuracy drop <= 0.5 points, artifact >= 4x smaller, batched latency >= 2x faster, wall time < 5 minutes.
Baseline and final are measured in the same process, one after another.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import goal, parser, write_json  # noqa: E402

from torchslim.defaults import DEMO_RECIPE  # noqa: E402
from torchslim.pipeline import compress  # noqa: E402
from torchslim.recipe import parse_recipe  # noqa: E402
from torchslim.report import print_table  # noqa: E402


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    recipe = parse_recipe(yaml.safe_load(DEMO_RECIPE), "demo")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        report = compress(recipe, Path(out) / "demo", progress=False, log=lambda m: None)
    seconds = time.perf_counter() - started
    print_table(report)
    base, final = report["stages"][0], report["stages"][-1]
    drop = round((base["score"] - final["score"]) * 100, 3)
    goals = [
        goal("accuracy drop (points)", drop, "<= 0.5", drop <= 0.5),
        goal("artifact size reduction, shipped (x)", final["ratios"]["size_reduction"], ">= 4",
             final["ratios"]["size_reduction"] >= 4),
        goal("artifact size reduction, raw file (x)", final["ratios"]["size_reduction_raw"], "reported", True),
        goal(f"batched latency speedup at {final['batch_size']} (x)", final["ratios"]["speedup_batch"], ">= 2",
             final["ratios"]["speedup_batch"] >= 2),
        goal("batch-1 latency speedup (x)", final["ratios"]["speedup_bs1"], "reported", True),
        goal("wall time, warm environment (s)", round(seconds, 1), "< 300", seconds < 300),
    ]
    write_json(args.json, {"benchmark": "demo", "seconds": round(seconds, 1), "goals": goals, "report": report})


if __name__ == "__main__":
    main()
