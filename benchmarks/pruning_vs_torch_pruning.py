"""torchslim vs Torch-Pruning at equal MACs: `python benchmarks/pruning_vs_torch_pruning.py [--json PATH]`.

Needs the benchmark-only dependency `pip install torch-pruning`. For each model (random weights; speed does
not depend on their values) both tools prune with L1 magnitude, per-layer (local) ranking and the classifier
kept, each to <= the MACs target (the ratio is bisected for both, MACs counted by the same counter); then the
unpruned and both pruned models are timed one after another in this process (eager fp32, batch 1 and 32, fixed
threads, medians). Then accuracy: builtin:digits-cnn pruned by both tools to the same MACs and fine-tuned with
the same distillation budget. Prints the tables and writes JSON.
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


def digits_accuracy(target: float, epochs: int) -> list[dict]:
    """builtin:digits-cnn pruned by both tools to ``target`` MACs, then the same distillation fine-tune
    (torchslim's finetune step: SGD 0.01, cosine, KD T=4 alpha=0.7, ``epochs`` epochs); test accuracy."""
    import tempfile

    from torchslim.data import resolve_data
    from torchslim.pipeline import StepContext
    from torchslim.recover.finetune import FinetuneConfig, finetune
    from torchslim.zoo import resolve_model

    bundle, data = resolve_model("builtin:digits-cnn"), resolve_data("builtin:digits")
    example = bundle.example_inputs(1)

    def accuracy(model) -> float:
        correct = 0
        with torch.inference_mode():
            for x, y in data.batches("test", bundle.preprocess, 256):
                correct += int((model(x).argmax(1) == y).sum())
        return correct / len(data.splits["test"])

    rows = [{"tool": "unpruned", "macs_ratio": 1.0, "accuracy": accuracy(bundle.model)}]
    pruned = {"torchslim": copy.deepcopy(bundle.model)}
    prune(pruned["torchslim"], ChannelPruning(target_macs=target), example)
    try:
        pruned["torch-pruning"] = torch_pruning_to_macs(copy.deepcopy(bundle.model), example, target)
    except ImportError:
        pass
    base_macs = count_macs(bundle.model, example)
    for tool, model in pruned.items():
        before = accuracy(model)
        with tempfile.TemporaryDirectory() as scratch:
            torch.manual_seed(0)
            context = StepContext(model=model, teacher=copy.deepcopy(bundle.model).requires_grad_(False),
                                  bundle=bundle, data=data, seed=0, threads=torch.get_num_threads(),
                                  workdir=Path(scratch), progress=False, where="benchmark")
            finetune(context, FinetuneConfig(epochs=epochs))
        rows.append({"tool": tool, "macs_ratio": round(count_macs(model, example) / base_macs, 4),
                     "params": count_params(model), "accuracy_pruned": round(before, 4),
                     "accuracy": round(accuracy(model), 4)})
    return rows


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
    p.add_argument("--digits-target", type=float, default=0.3, help="MACs target of the digits accuracy run")
    p.add_argument("--digits-epochs", type=int, default=8)
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
    digits = digits_accuracy(args.digits_target, args.digits_epochs)
    print(f"builtin:digits-cnn at {args.digits_target:.0%} MACs, then {args.digits_epochs} epochs of distillation:")
    for r in digits:
        print(f"  {r['tool']:14s} MACs {r['macs_ratio']:.3f}  accuracy after pruning "
              f"{r.get('accuracy_pruned', r['accuracy']):.4f}  after fine-tuning {r['accuracy']:.4f}")
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
    pair = {r["tool"]: r for r in digits}
    if "torch-pruning" in pair:
        goals.append(goal("digits accuracy, torchslim - torch-pruning (points)",
                          round((pair["torchslim"]["accuracy"] - pair["torch-pruning"]["accuracy"]) * 100, 2),
                          ">= 0", pair["torchslim"]["accuracy"] >= pair["torch-pruning"]["accuracy"]))
    write_json(args.json, {"benchmark": "pruning_vs_torch_pruning", "rows": rows, "digits": digits, "goals": goals})


if __name__ == "__main__":
    main()
