"""Deep Compression, measured: `python benchmarks/deep_compression.py [--recipe PATH] [--seeds 0,1,2] [--json PATH]`.

Runs the recipe (default: examples/recipes/digits-mlp-deep-compression.yaml: builtin:digits-mlp pruned,
retrained, 4-bit shared with centroid fine-tuning) through `torchslim.pipeline.Pipeline` once per seed: the
baseline and every step are measured in this process by the same code. Prints, per seed, each stage's test
accuracy and artifact bytes (the baseline's fp32 model.safetensors, the last stage's model.tslim; raw and
deflated) and the model.tslim bytes per component.
Goal (Deep Compression reached 40x on LeNet-300-100): >= 40x smaller than the fp32 safetensors file at
<= 0.5 points of accuracy lost, for every seed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import comma_list, goal, parser, write_results  # noqa: E402

from torchslim.pipeline import Pipeline  # noqa: E402
from torchslim.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "recipes" / "digits-mlp-deep-compression.yaml"


def run(recipe_path: Path, seed: int, threads: int = 0) -> dict:
    recipe = load_recipe(recipe_path, [f"seed={seed}", "measure.repeats=5", "measure.warmup=1",
                                       f"measure.threads={threads}"])
    with tempfile.TemporaryDirectory(prefix="deep-compression-") as workdir:
        stages, final, _ = Pipeline(recipe, progress=False, log=lambda *a: None).run(Path(workdir))
    base, last = stages[0], stages[-1]
    print(f"\nseed {seed}: {'stage':<24} {'accuracy':>9} {'artifact':>18} {'bytes':>8} {'deflated':>9}")
    for stage in stages:
        print(f"{'':9}{stage['name']:<24} {stage['score']:>9.4f} {stage['artifact']:>18} "
              f"{stage['size_bytes_raw']:>8} {stage['size_bytes']:>9}")
    sizes = final.details["bytes"]
    print(f"{'':9}model.tslim bytes: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    ratio = base["size_bytes_raw"] / last["size_bytes_raw"]
    drop = 100 * (base["score"] - last["score"])
    print(f"{'':9}{ratio:.1f}x smaller than fp32 safetensors, accuracy {base['score']:.4f} -> {last['score']:.4f} "
          f"({drop:+.2f} points lost)")
    return {"seed": seed, "ratio": round(ratio, 2), "drop_points": round(drop, 3), "baseline_bytes":
            base["size_bytes_raw"], "artifact_bytes": last["size_bytes_raw"], "baseline_accuracy": base["score"],
            "accuracy": last["score"], "bytes": sizes, "layers": final.details["layers"],
            "stages": [{"seed": seed, "stage": stage["name"], "accuracy": stage["score"], "artifact": stage["artifact"],
                        "bytes": stage["size_bytes_raw"], "bytes_deflated": stage["size_bytes"]} for stage in stages]}


def seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` (or ``0 1 2``)."""
    try:
        return [int(seed) for seed in comma_list()(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None


def main() -> None:
    p = parser(__doc__.splitlines()[0], threads=0)
    p.add_argument("--recipe", default=None, help=f"the recipe run once per seed (default {RECIPE.relative_to(ROOT)})")
    p.add_argument("--seeds", type=seeds, nargs="+", default=[[0]], metavar="A,B",
                   help="comma-separated seeds, one run each (default 0)")
    args = p.parse_args()
    args.seeds = [seed for group in args.seeds for seed in group]
    runs = [run(Path(args.recipe or RECIPE), seed, args.threads) for seed in args.seeds]
    worst_ratio = min(r["ratio"] for r in runs)
    worst_drop = max(r["drop_points"] for r in runs)
    print()
    goals = [goal("smallest ratio to the fp32 safetensors", worst_ratio, ">= 40x", worst_ratio >= 40),
             goal("largest accuracy drop (points)", worst_drop, "<= 0.5", worst_drop <= 0.5)]
    rows = [{"part": "stages", **stage} for r in runs for stage in r["stages"]]
    rows += [{"part": "seeds", **{k: v for k, v in r.items() if k not in ("layers", "stages")}} for r in runs]
    write_results(args, rows, goals, {"layers": {r["seed"]: r["layers"] for r in runs}})


if __name__ == "__main__":
    main()
