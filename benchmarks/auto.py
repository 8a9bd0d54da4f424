"""`torchslim auto`'s goals, measured: `python benchmarks/auto.py [--parts ...] [--json PATH] [--threads N] [--seed N]`.

Each part runs in its own process (this script calls itself with ``--part NAME``), baseline and results side
by side in that process, and prints one table row and its goal lines:

- ``digits``: builtin:digits-cnn on builtin:digits, ``--max-drop 0.005 --target latency`` at batch 256, within
  ``--time-budget`` (30 min); the hand-written demo recipe (examples/recipes/demo.yaml) runs first in the same
  process as the reference. Goal: best/ at least 1.3x the demo's batched speed-up at no larger drop (test split).
- ``lite0``: builtin:efficientnet-lite0 on builtin:images, top-1 agreement >= 0.97 (``--max-drop 0.03``), batch
  16. Goal: the fastest feasible point on the front >= 10x faster than fp32 eager.
- ``minilm``: builtin:minilm on builtin:sentences, cosine >= 0.99 (``--max-drop 0.01``), batch 32. Goal: >= 3x.
- ``quality``: TPE against random search over the same space, equal trials, seeds 0..runs-1 on digits-cnn:
  the front's hypervolume (mean and spread) and the first feasible trial (goal: within 20 full evaluations).
- reproducibility (in ``digits``): its best recipe.yaml re-run with `compress`; score (goal: within 0.5 points)
  and batched latency: against the two runs' own min-max spreads, and both artifacts loaded in this process and
  timed in alternating rounds (the per-round ratios, this machine's noise for two copies of one model, must
  include 1.0).

Latencies on a machine shared with other work are preliminary: quote ratios, rerun alone for final figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import alternating_rounds, apply_threads, goal, parser, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# model, data, max drop, batch size, recovery epoch options (an epoch of Lite0 or MiniLM costs minutes here)
MODELS = {
    "digits": ("builtin:digits-cnn", "builtin:digits", 0.005, 256, [4, 8, 12]),
    "lite0": ("builtin:efficientnet-lite0", "builtin:images", 0.03, 16, [0, 1, 2]),
    "minilm": ("builtin:minilm", "builtin:sentences", 0.01, 32, [0, 1, 2]),
}


def _quiet(message: str) -> None:
    print(f"  {message}", flush=True)


def _search(name: str, args, out: Path, seed: int | None = None, sampler: str = "tpe") -> tuple[dict, float]:
    import torchslim

    model, data, drop, batch, epochs = MODELS[name]
    epochs = [int(e) for e in args.epochs.split(",")] if args.epochs else epochs
    seed = args.seed if seed is None else seed
    recipe = {"model": model, "data": data, "search": {"space": {"epochs": epochs}},
              "measure": {"threads": args.threads}}
    started = time.perf_counter()
    report = torchslim.auto(recipe=recipe, out=out, max_drop=drop, target="latency", trials=args.trials,
                            time_budget=args.time_budget, workers=args.workers, seed=seed, sampler=sampler,
                            batch_size=batch, log=_quiet, fresh=True)
    return report, time.perf_counter() - started


def _final(report: dict) -> dict:
    stage = report["stages"][-1]
    return {"speedup_batch": stage["ratios"]["speedup_batch"], "speedup_bs1": stage["ratios"]["speedup_bs1"],
            "score": stage["score"], "score_delta": stage["ratios"]["score_delta"], "runtime": stage["runtime"],
            "latency_ms_batch": stage["latency_ms_batch"], "size_reduction": stage["ratios"]["size_reduction"]}


def part_digits(args, scratch: Path) -> dict:
    from torchslim.pipeline import compress
    from torchslim.recipe import load_recipe

    demo = compress(load_recipe(ROOT / "examples/recipes/demo.yaml", [f"measure.threads={args.threads}",
                                                                     f"seed={args.seed}"]),
                    scratch / "demo", progress=False, log=_quiet)
    report, seconds = _search("digits", args, scratch / "auto")
    search = report["search"]
    row = {"demo": _final(demo), "auto": _final(report) if report["stages"] else None, "seconds": round(seconds, 1),
           "search": _summary(search)}
    if row["auto"]:
        ratio = row["auto"]["speedup_batch"] / row["demo"]["speedup_batch"]
        row["goals"] = [
            goal("digits: auto / demo batched speed-up (x)", round(ratio, 3), ">= 1.3", ratio >= 1.3),
            goal("digits: auto drop <= demo drop (points, test split)", round(-row["auto"]["score_delta"] * 100, 3),
                 f"<= {round(-row['demo']['score_delta'] * 100, 3)}",
                 row["auto"]["score_delta"] >= row["demo"]["score_delta"]),
            goal("digits: search wall time (s)", row["seconds"], "<= 1800 (30 min)", seconds <= 1800)]
        row["repro"] = _repro(report, scratch / "auto", scratch)
        row["goals"] += row["repro"]["goals"]
    else:
        row["goals"] = [goal("digits: a feasible point", 0, ">= 1", False)]
    return row


def _summary(search: dict) -> dict:
    chosen = search["chosen"] or {}
    return {"trials": search["trials"], "feasible": search["feasible"], "proxy": search["proxy"],
            "hypervolume": search["hypervolume"], "front": len(search["front"]),
            "chosen": {k: chosen.get(k) for k in ("trial", "drop", "latency_ratio", "size_ratio", "runtime")}}


def part_model(name: str, goal_speedup: float):
    def run(args, scratch: Path) -> dict:
        report, seconds = _search(name, args, scratch / name)
        search = report["search"]
        feasible = [p for p in search["front"] if p["feasible"]]
        fastest = min(feasible, key=lambda p: p["latency_ratio"], default=None)
        speedup = round(1 / fastest["latency_ratio"], 3) if fastest else 0.0
        return {"seconds": round(seconds, 1), "search": _summary(search), "fastest_feasible": fastest,
                "best": _final(report) if report["stages"] else None,
                "goals": [goal(f"{name}: fastest feasible point vs fp32 eager, batched (x)", speedup,
                               f">= {goal_speedup}", speedup >= goal_speedup)]}

    return run


def part_quality(args, scratch: Path) -> dict:
    import statistics

    rows = {"tpe": [], "random": []}
    for seed in range(args.quality_runs):
        for sampler in rows:
            report, seconds = _search("digits", args, scratch / f"{sampler}-{seed}", seed=seed, sampler=sampler)
            search = report["search"]
            rows[sampler].append({"seed": seed, "hypervolume": search["hypervolume"]["value"],
                                  "first_feasible": search["trials"]["first_feasible"],
                                  "complete": search["trials"]["complete"], "seconds": round(seconds, 1)})

    def stats(sampler: str) -> dict:
        values = [r["hypervolume"] for r in rows[sampler]]
        return {"mean": round(statistics.mean(values), 6),
                "spread": round(statistics.stdev(values), 6) if len(values) > 1 else 0.0}

    tpe, random = stats("tpe"), stats("random")
    firsts = [r["first_feasible"] for r in rows["tpe"]]
    return {"runs": rows, "tpe": tpe, "random": random, "goals": [
        goal("quality: hypervolume TPE mean > random mean", tpe["mean"], f"> {random['mean']}",
             tpe["mean"] > random["mean"]),
        goal("quality: first feasible trial (TPE, worst seed; 0-based)", max((f for f in firsts if f is not None),
                                                                          default=-1),
             "< 20", all(f is not None and f < 20 for f in firsts))]}


def _repro(report: dict, out: Path, scratch: Path) -> dict:
    """Re-run the best point's recipe.yaml with `compress`; compare score and latency with best/."""
    from torchslim.pipeline import compress
    from torchslim.recipe import load_recipe

    chosen = report["search"]["chosen"]
    again = compress(load_recipe(out / chosen["recipe"]), scratch / "again", progress=False, log=_quiet)
    first, second = report["stages"][-1], again["stages"][-1]
    drift = round(abs(first["score"] - second["score"]) * 100, 3)
    spreads = [first["latency_spread_ms_batch"], second["latency_spread_ms_batch"]]
    change = round(second["latency_ms_batch"] / first["latency_ms_batch"], 4)
    overlap = spreads[0][0] <= spreads[1][1] and spreads[1][0] <= spreads[0][1]
    alternate = _alternate(out / "best", scratch / "again", first["runtime"], first.get("batch_size") or 32)
    low, high = alternate["round_ratio_range"]
    return {"best": _final(report), "again": _final(again), "latency_spread_ms_batch": spreads,
            "alternate": alternate, "goals": [
                goal("repro: score difference (points, test split)", drift, "<= 0.5", drift <= 0.5),
                goal("repro: batched latency, rerun / best, separate runs (x)", change,
                     "the two runs' min-max spreads overlap", overlap),
                goal("repro: batched latency, rerun / best, timed alternately in one process (x)",
                     alternate["ratio"], f"per-round ratios ({low}-{high}) include 1.0", low <= 1.0 <= high)]}


def _alternate(first: Path, second: Path, runtime: str, batch: int, rounds: int = 9) -> dict:
    """Both folders' artifacts loaded (`torchslim.load`) and run as deployed (compiled again where the run chose
    TorchInductor), timed in alternating rounds in this process on one batch of the model's example inputs:
    the median of each round, the ratio of the medians and the range of the per-round ratios (this machine's
    noise for two copies of one model)."""
    import statistics

    import torch

    import torchslim
    from torchslim.recipe import load_recipe
    from torchslim.zoo import resolve_model

    inputs = resolve_model(load_recipe(first / "recipe.yaml").model).example_inputs(batch)
    runs = []
    for folder in (first, second):
        loaded = torchslim.load(folder)
        if runtime == "torchinductor" and isinstance(loaded, torch.nn.Module):
            from torchslim.quant.bf16 import CompiledTorchDeployable

            runs.append(CompiledTorchDeployable(loaded))
        else:
            runs.append(loaded)
    samples = list(alternating_rounds(dict(zip(("best", "again"), runs)), inputs, rounds, 5).values())
    ratios = [b / a for a, b in zip(*samples)]
    medians = [statistics.median(s) for s in samples]
    return {"rounds": rounds, "batch_size": batch, "runtime": runtime, "best_ms": round(medians[0], 4),
            "again_ms": round(medians[1], 4), "ratio": round(medians[1] / medians[0], 4),
            "round_ratio_range": [round(min(ratios), 4), round(max(ratios), 4)]}


PARTS = {"digits": part_digits, "lite0": part_model("lite0", 10.0), "minilm": part_model("minilm", 3.0),
         "quality": part_quality}


def rows_of(results: dict) -> list[dict]:
    """The JSON's rows: per part, the demo and the search's best (and its rerun), the fastest feasible point, or
    one row per sampler and seed."""
    rows = []
    for part, result in results.items():
        if "error" in result:
            rows.append({"part": part, "error": result["error"][-300:]})
        elif part == "quality":
            rows += [{"part": part, "sampler": sampler, **run} for sampler, runs in result["runs"].items()
                     for run in runs]
        else:
            if part == "digits":
                rows.append({"part": part, "row": "demo recipe", **result["demo"]})
            best = result.get("auto") if part == "digits" else result.get("best")
            if best:
                rows.append({"part": part, "row": "auto best", **best, "seconds": result["seconds"]})
            if result.get("repro"):
                rows.append({"part": part, "row": "auto best, rerun", **result["repro"]["again"]})
            point = result.get("fastest_feasible")
            if point:
                rows.append({"part": part, "row": "fastest feasible point",
                             **{k: v for k, v in point.items() if not isinstance(v, (dict, list))}})
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0], threads=0, seed=0, parts=tuple(PARTS))
    p.add_argument("--part", default=None, choices=sorted(PARTS), help=argparse.SUPPRESS)  # one part, in process
    p.add_argument("--trials", type=int, default=40, help="trials per search (default 40)")
    p.add_argument("--time-budget", default="30m", help="each search's time budget (default 30m)")
    p.add_argument("--workers", type=int, default=1, help="local workers per search")
    p.add_argument("--quality-runs", type=int, default=3, help="seeds per sampler in the quality part")
    p.add_argument("--epochs", default="", help="recovery epoch options for every model, e.g. 2,4 (default: per model)")
    args = p.parse_args()
    threads = apply_threads(args)
    if args.part:  # one part, in this process
        with tempfile.TemporaryDirectory(prefix=f"auto-{args.part}-") as scratch:
            result = PARTS[args.part](args, Path(scratch))
        print("RESULT " + json.dumps(result, default=str))
        return
    results = {}
    for name in args.parts:
        print(f"== {name}", flush=True)
        command = [sys.executable, __file__, "--part", name, "--trials", str(args.trials), "--time-budget",
                   args.time_budget, "--workers", str(args.workers), "--quality-runs", str(args.quality_runs),
                   "--epochs", args.epochs, "--threads", str(args.threads), "--seed", str(args.seed)]
        completed = subprocess.run(command, capture_output=True, text=True)
        print(completed.stdout[-4000:], end="")
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        results[name] = json.loads(lines[-1][7:]) if lines else {"error": completed.stderr[-2000:]}
    goals = [g for result in results.values() for g in result.get("goals", [])]
    details = {name: {k: v for k, v in result.items() if k != "goals"} for name, result in results.items()}
    details["note"] = "latencies preliminary unless the machine was otherwise idle"
    write_results(args, rows_of(results), goals, details, threads=threads)


if __name__ == "__main__":
    main()
