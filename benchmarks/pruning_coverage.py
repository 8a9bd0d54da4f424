"""Structured-pruning coverage: `python benchmarks/pruning_coverage.py [--json PATH] [--models a,b] [--max-params M]
[--parts structures,torchvision,others]`.

Every classification model in torchvision (random weights), plus timm and Hugging Face models where installed,
plus the structure rows (`benchmarks/_coverage_models.py`: Hugging Face models of 12 families built from tiny
configs and passed directly, nn.TransformerEncoder, a ConvLSTM, grouped-conv residual blocks, a U-Net with
transposed convolutions, tuple/dict/dataclass outputs, several inputs): prune 30% of channels, run a forward
pass, check the shape of every output tensor, save and reload (safetensors + shapes JSON, rebuilt on a fresh
instance of the model class; Hugging Face models through `save_pretrained` -> `from_pretrained` when their
config expresses the pruned widths) and compare every output bit for bit. `--capture trace` runs every model
through the traced fallback used when torch.export fails. Prints a table; the JSON's rows are the models (their
`part`: structures, torchvision, others = timm and Hugging Face), its details the summaries per part
(`{"total", "ok", "pruned_15", "failed": {name: reason}}`); a row's `pruned_15` says whether it lost >= 15% of
its MACs. Goals: >= 95% of torchvision's classifiers pruned, run, saved and reloaded; >= 95% of the structure
rows lose >= 15% of their MACs.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import apply_threads, comma_list, deprecated_alias, goal, parser, write_results  # noqa: E402

from torchslim.errors import describe  # noqa: E402
from torchslim.core.modules import call_model, output_tensors  # noqa: E402
from torchslim import load  # noqa: E402
from torchslim.pruning.channel import ChannelPruningConfig, prune, save_pruned  # noqa: E402


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


def _outputs(model, example) -> list:
    with torch.no_grad():
        return output_tensors(call_model(model.eval(), example))


def _reload(build, model, result, folder: str, seed: int):
    """(the reloaded model, how): `from_pretrained` for a Hugging Face model whose config expresses the pruned
    widths, else `torchslim.load` on a fresh instance."""
    if hasattr(model, "save_pretrained") and not any("torchslim.load" in v for v in result.skipped.values()):
        model.save_pretrained(folder)
        return type(model).from_pretrained(folder), "from_pretrained"
    save_pruned(model, folder)
    torch.manual_seed(seed)  # a fresh instance with other weights: the reload must not depend on them
    return load(folder, build()), "torchslim.load"


def check(name: str, build, example, seed: int = 0) -> dict:
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = build().eval()
    shapes = [t.shape for t in _outputs(model, example)]
    result = prune(model, ChannelPruningConfig(ratio=0.3, capture=CAPTURE["how"]), example)
    out = _outputs(model, example)
    if [t.shape for t in out] != shapes:
        raise AssertionError(f"output shapes changed: {shapes} -> {[t.shape for t in out]}")
    with tempfile.TemporaryDirectory() as folder:
        fresh, how = _reload(build, model, result, folder, seed + 1)
        again = _outputs(fresh, example)
    if len(again) != len(out) or not all(torch.equal(a, b) for a, b in zip(again, out)):
        raise AssertionError(f"the model reloaded by {how} computes different outputs")
    ratio = result.macs_after / result.macs_before
    row = {"model": name, "ok": True, "macs_ratio": round(ratio, 4), "pruned_15": ratio <= 0.85,
           "params_ratio": round(result.params_after / result.params_before, 4), "outputs": len(out),
           "reload": how, "skipped_layers": len(result.skipped), "seconds": round(time.perf_counter() - started, 1)}
    config_notes = [v for v in result.skipped.values() if "torchslim.load" in v]
    if config_notes:
        row["config_note"] = config_notes[0][:200]
    return row


def run(names, factory, example_for, max_params: float, seed: int = 0) -> tuple[dict, list]:
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
            rows.append(check(name, build, example_for(name), seed))
        except Exception as error:  # a failure is a result here: record it and go on
            reason = describe(error, 200)
            failed[name] = reason
            rows.append({"model": name, "ok": False, "reason": reason})
            if "--verbose" in sys.argv:
                traceback.print_exc()
        row = rows[-1]
        print(f"{row['model']:44s} {'ok' if row['ok'] else ('--' if row['ok'] is None else 'FAILED')}  "
              f"{row.get('macs_ratio', '')} {row.get('reload', '')} {row.get('reason', row.get('note', ''))}",
              flush=True)
    counted = [r for r in rows if r["ok"] is not None]
    return {"total": len(counted), "ok": sum(bool(r["ok"]) for r in counted),
            "pruned_15": sum(bool(r.get("pruned_15")) for r in counted), "failed": failed}, rows


def structures(max_params: float, seed: int = 0) -> tuple[dict, list]:
    """The structure rows: Hugging Face families from configs (when transformers is installed) and the rest."""
    from _coverage_models import HF as HF_CONFIGS, STRUCTURES

    table = dict(STRUCTURES)
    try:
        import transformers  # noqa: F401

        table.update(HF_CONFIGS)
    except ImportError:
        pass
    return run(list(table), lambda n: table[n][0], lambda n: table[n][1](), max_params, seed)


PARTS = ("structures", "torchvision", "others")
SUITES = {"all": list(PARTS), "torchvision": ["torchvision", "others"], "structures": ["structures"]}


def others(max_params: float, seed: int) -> tuple[dict, list]:
    """timm's models and the Hugging Face ones of `HF`, where installed."""
    summary, rows = {"total": 0, "ok": 0, "pruned_15": 0, "failed": {}}, []
    try:
        import timm

        summary, rows = run(TIMM, lambda n: (lambda: timm.create_model(n, pretrained=False)),
                            lambda n: torch.randn(1, 3, 224, 224), max_params, seed)
    except ImportError:
        pass
    try:
        import transformers  # noqa: F401

        tokens = (torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.long))  # both vocabularies
        hf, more = run(list(HF), lambda n: HF[n], lambda n: tokens, max_params, seed)
        rows += more
        summary = {key: summary[key] + hf[key] for key in ("total", "ok", "pruned_15")} | {
            "failed": {**summary["failed"], **hf["failed"]}}
    except ImportError:
        pass
    return summary, rows


def main() -> None:
    p = parser(__doc__.splitlines()[0], threads=None, seed=0, parts=PARTS)
    deprecated_alias(p, "--suite", "--parts", lambda value, current: SUITES[value], choices=sorted(SUITES))
    p.add_argument("--models", type=comma_list(), default=[], metavar="A,B",
                   help="torchvision names (default: all); given, the others part is left out")
    p.add_argument("--max-params", type=float, default=1e9, help="skip models above this many million params")
    p.add_argument("--capture", default="auto", choices=["auto", "export", "trace"],
                   help="graph capture: trace = the fallback for models torch.export cannot capture, on every model")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    apply_threads(args)
    CAPTURE["how"] = args.capture
    summaries, rows, goals = {}, [], []
    if "structures" in args.parts:
        summaries["structures"], shape_rows = structures(args.max_params, args.seed)
        rows += [{"part": "structures", **row} for row in shape_rows]
        done = summaries["structures"]
        share = done["pruned_15"] / max(done["total"], 1)
        print(f"structures: {done['ok']} / {done['total']} pruned, run and reloaded bit-exact; "
              f"{done['pruned_15']} ({share:.1%}) lost >= 15% of their MACs (goal >= 95%)")
        goals.append(goal("structures: share losing >= 15% of their MACs", round(share, 4), ">= 0.95", share >= 0.95))
    if "torchvision" in args.parts:
        import torchvision

        names = args.models or torchvision.models.list_models(module=torchvision.models)
        summaries["torchvision"], more = run(
            names, lambda n: (lambda: torchvision.models.get_model(n, weights=None)),
            lambda n: torch.randn(1, 3, INPUT_SIZE.get(n, 224), INPUT_SIZE.get(n, 224)), args.max_params, args.seed)
        rows += [{"part": "torchvision", **row} for row in more]
    if "others" in args.parts and not args.models:
        summaries["others"], more = others(args.max_params, args.seed)
        rows += [{"part": "others", **row} for row in more]
    if "torchvision" in summaries:
        done, other = summaries["torchvision"], summaries.get("others", {"ok": 0, "total": 0})
        share = done["ok"] / max(done["total"], 1)
        print(f"torchvision: {done['ok']} / {done['total']} ({share:.1%}) pruned, run, saved and reloaded "
              f"(goal >= 95%); others: {other['ok']} / {other['total']}")
        goals.append(goal("torchvision: share pruned, run, saved and reloaded", round(share, 4), ">= 0.95",
                          share >= 0.95))
    write_results(args, rows, goals, summaries)


if __name__ == "__main__":
    main()
