"""torchslim vs Torch-Pruning at equal MACs: `python benchmarks/pruning_vs_torch_pruning.py [--json PATH]`.

Needs the benchmark-only dependency `pip install torch-pruning`. For each model (random weights; speed does
not depend on their values) both tools prune with L1 magnitude, per-layer (local) ranking and the classifier
kept, each to <= the MACs target (the ratio is bisected for both, MACs counted by the same counter); then the
unpruned and both pruned models are timed one after another in this process (eager fp32, batch 1 and 32, fixed
threads, medians). Prints the table and writes JSON.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import goal, parser, write_json  # noqa: E402

from torchslim.measure import count_macs, count_params, measure_latency, set_threads  # noqa: E402
from torchslim.pruning.channel import ChannelPruning, prune  # noqa: E402


def torch_pruning_to_macs(model, example, target: float):
    """Torch-Pruning's MagnitudePruner (L1, local), its ratio bisected until MACs <= target * baseline."""
    import torch_pruning as tp

    base = count_macs(model, example)
    low, high, best = 0.0, 0.95, None
    for _ in range(10):
        ratio = (low + high) / 2
        trial = copy.deepcopy(model)
        classifier = [m for m in trial.modules() if isinstance(m, torch.nn.Linear)][-1:]
        pruner = tp.pruner.MagnitudePruner(trial, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=classifier)
        pruner.step()
        if count_macs(trial, example) <= target * base:
            best, high = trial, ratio
        else:
            low = ratio
    return best


def time_model(model, batch: int, size: int) -> tuple[float, float]:
    x1, xb = torch.randn(1, 3, size, size), torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        bs1 = measure_latency(model, x1, warmup=3, repeats=15).median_ms
        batched = measure_latency(model, xb, warmup=2, repeats=7).median_ms
    return bs1, batched


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,mobilenet_v2")
    p.add_argument("--target", type=float, default=0.5, help="MACs target as a fraction of the baseline")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    import torchvision

    threads = set_threads(0)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        base = torchvision.models.get_model(name, weights=None).eval()
        example = torch.randn(1, 3, 224, 224)
        ours = copy.deepcopy(base)
        prune(ours, ChannelPruning(target_macs=args.target), example)
        candidates = {"unpruned": base, "torchslim": ours}
        try:
            theirs = torch_pruning_to_macs(copy.deepcopy(base), example, args.target)
            if theirs is not None:
                candidates["torch-pruning"] = theirs.eval()
        except ImportError:
            print("torch-pruning is not installed: pip install torch-pruning (benchmark-only)")
        base_macs = count_macs(base, example)
        for tool, model in candidates.items():
            bs1, batched = time_model(model, args.batch_size, 224)
            rows.append({"model": name, "tool": tool, "macs_ratio": round(count_macs(model, example) / base_macs, 4),
                         "params": count_params(model), "latency_ms_bs1": round(bs1, 2),
                         "latency_ms_batch": round(batched, 2), "batch_size": args.batch_size, "threads": threads})
        unpruned = rows[-len(candidates)]
        for row in rows[-len(candidates):]:
            row["speedup_bs1"] = round(unpruned["latency_ms_bs1"] / row["latency_ms_bs1"], 3)
            row["speedup_batch"] = round(unpruned["latency_ms_batch"] / row["latency_ms_batch"], 3)
    print(f"{'model':14s} {'tool':14s} {'MACs':>6s} {'params':>9s} {'bs1 ms':>8s} {'x':>6s} "
          f"{'batch ms':>9s} {'x':>6s}")
    for r in rows:
        print(f"{r['model']:14s} {r['tool']:14s} {r['macs_ratio']:6.3f} {r['params'] / 1e6:8.2f}M "
              f"{r['latency_ms_bs1']:8.2f} {r['speedup_bs1']:6.2f} {r['latency_ms_batch']:9.2f} "
              f"{r['speedup_batch']:6.2f}")
    goals = []
    ours = next((r for r in rows if r["model"] == "resnet50" and r["tool"] == "torchslim"), None)
    if ours:
        goals.append(goal(f"resnet50 at {args.target:.0%} MACs, batch {args.batch_size} speed-up (x)",
                          ours["speedup_batch"], ">= 1.7", ours["speedup_batch"] >= 1.7))
    for name in args.models.split(","):
        pair = {r["tool"]: r for r in rows if r["model"] == name}
        if "torch-pruning" in pair:
            goals.append(goal(f"{name}: torchslim / torch-pruning batch latency", round(
                pair["torchslim"]["latency_ms_batch"] / pair["torch-pruning"]["latency_ms_batch"], 3), "<= 1.0",
                pair["torchslim"]["latency_ms_batch"] <= pair["torch-pruning"]["latency_ms_batch"]))
    write_json(args.json, {"benchmark": "pruning_vs_torch_pruning", "rows": rows, "goals": goals})


if __name__ == "__main__":
    main()
