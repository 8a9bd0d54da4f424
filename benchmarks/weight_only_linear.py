"""Weight-only linear layers: `python benchmarks/weight_only_linear.py [--threads N] [--seed N] [--json PATH]`.

For each shape (in -> out) and batch (rows of the input), this process times, one after another in interleaved
rounds (every candidate once per round, the median round reported, so a change of machine load hits all alike):

  * fp32: ``F.linear`` on the float32 weight (the baseline);
  * int4 g32 / g128 and int8 per-channel `WeightOnlyLinear`, forward as shipped (packed kernel in bfloat16 up to
    ``kernel_max_rows`` rows, dequantize + ``F.linear`` above);
  * the same layers forced onto the dequantize path (``use_kernel = False``), to show what the kernels buy.

It prints microseconds per call and the ratio to fp32 (< 1: faster).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import apply_threads, parser, write_results  # noqa: E402

from torchslim.quant.weight_only import WeightOnlyLinear, fast_bfloat16_cpu  # noqa: E402

SHAPES = ((384, 1536), (1536, 384), (384, 4096))
BATCHES = (1, 16)


def _per_call_us(run, x, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        run(x)
    return (time.perf_counter() - started) / calls * 1e6


def candidates(in_features: int, out_features: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    weight = linear.weight.detach()
    runs = {"fp32": lambda x: F.linear(x, weight)}
    for name, bits, group in (("int4_g32", 4, 32), ("int4_g128", 4, 128), ("int8_pc", 8, 0)):
        layer = WeightOnlyLinear.from_float(linear, bits, group, symmetric=bits == 8)
        fallback = WeightOnlyLinear.from_float(linear, bits, group, symmetric=bits == 8)
        fallback.use_kernel = False
        runs[name] = layer
        runs[name + "_dequant"] = fallback
    return runs


def main() -> None:
    p = parser(__doc__.splitlines()[0], threads=2, seed=0)
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default 15)")
    args = p.parse_args()
    threads = apply_threads(args)
    print(f"threads={threads} fast_bf16_cpu={fast_bfloat16_cpu()} torch={torch.__version__}")
    results = []
    with torch.inference_mode():
        for in_features, out_features in SHAPES:
            runs = candidates(in_features, out_features, args.seed)
            for batch in BATCHES:
                x = torch.randn(batch, in_features)
                calls = 20 if batch == 1 else 5
                for run in runs.values():  # warm-up, and the kernels' packed layouts are built here
                    for _ in range(3):
                        run(x)
                samples = {name: [] for name in runs}
                for _ in range(args.rounds):
                    for name, run in runs.items():
                        samples[name].append(_per_call_us(run, x, calls))
                medians = {name: statistics.median(values) for name, values in samples.items()}
                row = {"in": in_features, "out": out_features, "batch": batch,
                       **{f"{name}_us": round(value, 1) for name, value in medians.items()}}
                results.append(row)
                ratios = "  ".join(f"{name} {value:7.1f}us ({value / medians['fp32']:.2f}x)"
                                   for name, value in medians.items() if name != "fp32")
                print(f"{in_features:5d}->{out_features:<5d} bs{batch:<3d} fp32 {medians['fp32']:7.1f}us  {ratios}")
    write_results(args, results, [], {"fast_bfloat16_cpu": fast_bfloat16_cpu()}, threads=threads)


if __name__ == "__main__":
    main()
