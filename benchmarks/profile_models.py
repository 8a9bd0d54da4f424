"""`torchslim profile` on reference models: `python benchmarks/profile_models.py [--json PATH] [--batch-size N]
[--threads N] [--models a,b]`.

Checks the MAC counter against published figures (ResNet-50: 25.6 M parameters, 4.1 GMACs at 224x224) and
profiles the built-in models (eager PyTorch, fp32, fixed threads).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import comma_list, goal, parser, write_results  # noqa: E402

from torchslim.profile import profile_model  # noqa: E402
from torchslim.errors import InputError  # noqa: E402

MODELS = ["torchvision:resnet50", "builtin:digits-cnn", "builtin:efficientnet-lite0", "builtin:minilm"]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--models", type=comma_list(), default=MODELS, metavar="A,B",
                   help=f"comma-separated model specs (default {','.join(MODELS)})")
    args = p.parse_args()
    rows = []
    for spec in args.models:
        try:
            rows.append(profile_model(spec, batch_size=args.batch_size, threads=args.threads, repeats=5))
        except InputError as error:  # an optional extra not installed
            print(f"skipped {spec}: {error}")
    print(f"{'model':30s} {'params':>10s} {'MACs':>10s} {'size':>10s} {'bs1 ms':>9s} {'batch ms':>10s} {'peak MB':>8s}")
    for r in rows:
        peak = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 1e6:.0f}"
        print(f"{r['spec']:30s} {r['params'] / 1e6:9.2f}M {r['macs'] / 1e9:9.3f}G {r['size_bytes_raw'] / 1e6:8.1f}MB "
              f"{r['latency_ms_bs1']:9.2f} {r['latency_ms_batch']:10.2f} {peak:>8s}  (batch {r['batch_size']}, "
              f"{r['threads']} threads)")
    goals = []
    resnet = next((r for r in rows if r["spec"] == "torchvision:resnet50"), None)
    if resnet:
        goals.append(goal("resnet50 params (M)", round(resnet["params"] / 1e6, 3), "25.6",
                          abs(resnet["params"] / 1e6 - 25.6) < 0.05))
        goals.append(goal("resnet50 MACs (G)", round(resnet["macs"] / 1e9, 3), "~4.1",
                          abs(resnet["macs"] / 1e9 - 4.1) < 0.1))
    write_results(args, rows, goals)


if __name__ == "__main__":
    main()
