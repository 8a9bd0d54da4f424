"""Structured-pruning coverage: `python benchmarks/pruning_coverage.py [--json PATH] [--models a,b] [--max-params M]`.

Every classification model in torchvision (random weights), plus timm and Hugging Face models where installed:
prune 30% of channels, run a forward pass, check the output shape, save and reload (safetensors + shapes JSON,
rebuilt on a fresh instance of the model class) and compare outputs and MACs. `--capture trace` runs every model
through the traced fallback used when torch.export fails. Prints a table; the JSON holds
`{"torchvision": {"total", "ok", "failed": {name: reason}}, "others": {...}, "rows": [...]}`.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, write_json  # noqa: E402

from torchslim.errors import describe  # noqa: E402
from torchslim import load  # noqa: E402
from torchslim.pruning.channel import ChannelPruningConfig, prune, save_pruned  # noqa: E402
from torchslim.zoo import call_model  # noqa: E402


def minilm():
    from torchslim.zoo import resolve_model

    return resolve_model("builtin:minilm").model


def gpt2_from_config():
    import transformers

    from torchslim.zoo.hub import LogitsOnly

    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=64, vocab_size=1000)
    return LogitsOnly(transformers.GPT2LMHeadModel(config))


HF = {"builtin:minilm (BERT-style)": minilm, "gpt2 from config": gpt2_from_config}

INPUT_SIZE = {"inception_v3": 299}
TIMM = ["efficientnet_b0", "mobilenetv3_large_100", "convnext_tiny", "vit_small_patch16_224"]


CAPTURE = {"how": "auto"}


def check(name: str, build, example) -> dict:
    started = time.perf_counter()
    torch.manual_seed(0)
    model = build().eval()
    result = prune(model, ChannelPruningConfig(ratio=0.3, capture=CAPTURE["how"]), example)
    with torch.no_grad():
        out = call_model(model, example)
    with tempfile.TemporaryDirectory() as folder:
        save_pruned(model, folder)
        torch.manual_seed(1)
        fresh = load(folder, build())
        with torch.no_grad():
            same = torch.equal(call_model(fresh, example), out)
    if not same:
        raise AssertionError("reloaded model computes different outputs")
    return {"model": name, "ok": True, "macs_ratio": round(result.macs_after / result.macs_before, 4),
            "params_ratio": round(result.params_after / result.params_before, 4),
            "skipped_layers": len(result.skipped), "seconds": round(time.perf_counter() - started, 1)}


def run(names, factory, example_for, max_params: float) -> tuple[dict, list]:
    rows, failed = [], {}
    for name in names:
        try:
            build = factory(name)
            probe = build()
            size = sum(p.numel() for p in probe.parameters())
            del probe
            if size > max_params * 1e6:
                rows.append({"model": name, "ok": None, "note": f"skipped: {size / 1e6:.0f} M params > --max-params"})
                continue
            rows.append(check(name, build, example_for(name)))
        except Exception as error:  # a failure is a result here: record it and go on
            reason = describe(error, 200)
            failed[name] = reason
            rows.append({"model": name, "ok": False, "reason": reason})
            if "--verbose" in sys.argv:
                traceback.print_exc()
        row = rows[-1]
        print(f"{row['model']:32s} {'ok' if row['ok'] else ('--' if row['ok'] is None else 'FAILED')}  "
              f"{row.get('macs_ratio', '')} {row.get('reason', row.get('note', ''))}", flush=True)
    counted = [r for r in rows if r["ok"] is not None]
    return {"total": len(counted), "ok": sum(bool(r["ok"]) for r in counted), "failed": failed}, rows


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated torchvision names (default: all)")
    p.add_argument("--max-params", type=float, default=1e9, help="skip models above this many million params")
    p.add_argument("--capture", default="auto", choices=["auto", "export", "trace"],
                   help="graph capture: trace = the fallback for models torch.export cannot capture, on every model")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    CAPTURE["how"] = args.capture
    import torchvision

    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    summary, rows = run(
        names, lambda n: (lambda: torchvision.models.get_model(n, weights=None)),
        lambda n: torch.randn(1, 3, INPUT_SIZE.get(n, 224), INPUT_SIZE.get(n, 224)), args.max_params)
    others = {"total": 0, "ok": 0, "failed": {}}
    if not args.models:
        try:
            import timm

            others, more = run(TIMM, lambda n: (lambda: timm.create_model(n, pretrained=False)),
                               lambda n: torch.randn(1, 3, 224, 224), args.max_params)
            rows += more
        except ImportError:
            pass
        try:
            import transformers  # noqa: F401

            tokens = (torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.long))  # both vocabularies
            hf, more = run(list(HF), lambda n: HF[n], lambda n: tokens, args.max_params)
            rows += more
            others = {"total": others["total"] + hf["total"], "ok": others["ok"] + hf["ok"],
                      "failed": {**others["failed"], **hf["failed"]}}
        except ImportError:
            pass
    share = summary["ok"] / max(summary["total"], 1)
    print(f"torchvision: {summary['ok']} / {summary['total']} ({share:.1%}) pruned, run, saved and reloaded "
          f"(goal >= 95%); others: {others['ok']} / {others['total']}")
    write_json(args.json, {"benchmark": "pruning_coverage", "capture": args.capture, "torchvision": summary, "others": others, "rows": rows})


if __name__ == "__main__":
    main()
