"""Compact parameter representations, measured: `python benchmarks/compact.py [--json PATH] [--parts ...] [--seed N]`.

1. codebook: builtin:digits-mlp (LeNet-300-100-style) pruned + codebook-shared + entropy-coded (Deep
   Compression): artifact bytes vs fp32 and accuracy. Goal: >= 40x smaller at <= 0.5 points accuracy drop.
2. materialize: builtin:minilm with weights generated at run time: resident parameter bytes, peak inference
   memory, latency at batch 1 and 32, cosine to fp32. Goal: resident <= 40% of fp32 at mean cosine >= 0.99.
3. svd: low-rank factorization of builtin:digits-cnn and of builtin:minilm's FFNs: MACs, latency and the metric
   before and after recovery by distillation.
4. dlrm: builtin:dlrm's embedding tables compressed: embedding bytes, ROC-AUC, lookup latency.
   Goal: embedding bytes >= 7x smaller at ROC-AUC drop <= 0.002.

Baseline and candidate of every row are measured in the same process, one after another, on the same batches;
latencies are medians.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import apply_threads, evaluate_model, goal, parser, step_context, write_results  # noqa: E402

from torchslim.data import resolve_data  # noqa: E402
from torchslim.measure.latency import measure_latency  # noqa: E402
from torchslim.measure.macs import count_macs  # noqa: E402
from torchslim.measure.memory import peak_memory_bytes  # noqa: E402
from torchslim.measure.size import resident_parameter_bytes  # noqa: E402
from torchslim.registry import get_method  # noqa: E402
from torchslim.runtime import TorchDeployable  # noqa: E402
from torchslim.zoo import resolve_model  # noqa: E402


def _latency(model, batch) -> float:
    return round(measure_latency(TorchDeployable(model), batch, warmup=2, repeats=9).median_ms, 3)


def _apply(kind: str, method: str, context, settings: dict):
    entry = get_method(kind, method)
    from torchslim._config import from_dict

    return entry.handler(context, from_dict(entry.config_cls, settings))


def codebook_part(workdir: Path, args) -> dict:
    from deep_compression import RECIPE, run

    result = run(RECIPE, seed=args.seed, threads=args.threads or 0)  # the recipe's threads: 0 for all cores
    rows = [{"row": "digits-mlp fp32 (model.safetensors)", "bytes": result["baseline_bytes"],
             "accuracy": result["baseline_accuracy"]},
            {"row": "pruned + 4-bit shared + entropy-coded (model.tslim)", "bytes": result["artifact_bytes"],
             "accuracy": result["accuracy"], "ratio": result["ratio"], "drop_points": result["drop_points"],
             **{f"bytes_{k}": v for k, v in result["bytes"].items()}}]
    met = result["ratio"] >= 40 and result["drop_points"] <= 0.5
    return {"rows": rows, "recipe": str(RECIPE),
            "goal": goal("digits-mlp Deep Compression: x smaller than fp32 (accuracy drop "
                         f"{result['drop_points']} points)", result["ratio"], ">= 40x at <= 0.5 points", met)}


def materialize_part(workdir: Path, args) -> dict:
    bundle, data = resolve_model("builtin:minilm"), resolve_data("builtin:sentences")
    context = step_context(bundle, data, workdir, args.seed)
    base_eval, reference = evaluate_model(context.model, context)
    batch32 = data.fill_batch("test", bundle.preprocess, 32)
    single = tuple(t[:1] for t in batch32)
    rows = []

    def row(name, model, evaluation, path):
        deployable = TorchDeployable(model)
        return {"row": name, "resident_param_bytes": resident_parameter_bytes(model),
                "peak_memory_bytes": peak_memory_bytes(lambda: deployable.load_and_run(path, batch32)),
                "latency_ms_bs1": _latency(model, single), "latency_ms_32": _latency(model, batch32),
                "cosine": round(evaluation.metrics["cosine"], 5), "cosine_min": round(evaluation.metrics["cosine_min"], 5)}

    rows.append(row("fp32", context.model, base_eval, TorchDeployable(context.model).save(workdir / "fp32")))
    dense = copy.deepcopy(context.model)
    for bits in (8, 4):
        context.model = copy.deepcopy(dense)
        deployable = _apply("materialize", "on-demand", context, {"bits": bits, "group_size": 32})
        evaluation, _ = evaluate_model(context.model, context, reference)
        rows.append(row(f"on-demand int{bits}", context.model, evaluation, deployable.save(workdir / f"int{bits}")))
    base = rows[0]
    for r in rows:
        r["resident_ratio"] = round(r["resident_param_bytes"] / base["resident_param_bytes"], 4)
        r["latency_cost_32"] = round(r["latency_ms_32"] / base["latency_ms_32"], 3)
    ok = [r for r in rows[1:] if r["cosine"] >= 0.99]
    best = min(ok, key=lambda r: r["resident_ratio"]) if ok else rows[1]
    return {"rows": rows, "goal": goal(f"minilm run-time weights ({best['row']}): resident / fp32 at cosine "
                                       f"{best['cosine']}", best["resident_ratio"], "<= 0.40 with cosine >= 0.99",
                                       best["resident_ratio"] <= 0.40 and best["cosine"] >= 0.99)}


def _svd_rows(spec: str, data_spec: str, svd: dict, finetune: dict, workdir: Path, batch_size: int,
              seed: int) -> list[dict]:
    bundle, data = resolve_model(spec), resolve_data(data_spec)
    context = step_context(bundle, data, workdir, seed)
    example = bundle.example_inputs(1)
    batch = data.fill_batch("test", bundle.preprocess, batch_size)
    base_eval, reference = evaluate_model(context.model, context)
    metric = base_eval.metric

    def row(name, evaluation, seconds=None):
        out = {"row": name, "macs": count_macs(context.model, example),
               "params": sum(p.numel() for p in context.model.parameters()),
               f"latency_ms_{batch_size}": _latency(context.model, batch), metric: round(evaluation.score, 5)}
        if seconds is not None:
            out["train_seconds"] = round(seconds, 1)
        return out

    rows = [row(f"{spec} baseline", base_eval)]
    details = _apply("factorize", "svd", context, svd).details
    rows.append(row(f"svd {svd}", evaluate_model(context.model, context, reference)[0]))
    rows[-1]["ranks"] = details.get("ranks")
    started = time.perf_counter()
    _apply("finetune", "distill", context, finetune)
    rows.append(row("after recovery (distillation)", evaluate_model(context.model, context, reference)[0],
                    time.perf_counter() - started))
    return rows


def svd_part(workdir: Path, args) -> dict:
    seed = args.seed
    digits = _svd_rows("builtin:digits-cnn", "builtin:digits", {"energy": 0.7, "conv": "spatial"},
                       {"epochs": 8, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.02},
                        "distill": {"temperature": 4.0, "alpha": 0.7}}, workdir, 256, seed)
    minilm = _svd_rows("builtin:minilm", "builtin:sentences",
                       {"energy": 0.6, "layers": ["*.intermediate.dense", "*.output.dense"],
                        "skip": ["*.attention.*"]},
                       {"epochs": 1, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01},
                        "schedule": {"name": "cosine", "warmup_fraction": 0.1}, "distill": {"embedding": "cosine"}},
                       workdir, 32, seed)
    return {"digits-cnn": digits, "minilm": minilm}


def dlrm_part(workdir: Path, args) -> dict:
    """The three main candidates of benchmarks/embeddings.py (which has more, e.g. qr and mixed-dim)."""
    import warnings

    import embeddings as bench
    from torchslim.measure import set_threads

    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    threads = set_threads(1)  # see benchmarks/embeddings.py: one thread keeps EmbeddingBag timings stable here
    bundle, data = resolve_model("builtin:dlrm"), resolve_data("builtin:clicks")
    teacher = bundle.model.eval().requires_grad_(False)
    names = ["rowwise-int8", "rowwise-int4", "hashing <=100k rows + finetune + int4"]
    models, seconds = {"baseline fp32": teacher}, {"baseline fp32": 0.0}
    for name in names:
        models[name], seconds[name], _ = bench.build(name, bundle, data, teacher, workdir, args.seed)
        set_threads(threads)
    batches = {size: data.fill_batch("test", bundle.preprocess, size) for size in (1, 2048)}
    timing = bench.timings(models, batches, 5)
    base = bench.row("baseline fp32", teacher, {}, data, bundle.preprocess, timing["baseline fp32"], 0.0)
    rows = [base] + [bench.row(n, models[n], base, data, bundle.preprocess, timing[n], seconds[n]) for n in names]
    ok = [r for r in rows[1:] if r["ratio"] >= 7 and r["auc_drop"] <= 0.002]
    pick = max(ok or rows[1:], key=lambda r: r["ratio"])
    return {"rows": rows, "threads": threads,
            "goal": goal(f"dlrm embedding bytes x smaller ({pick['name']}, AUC drop {pick['auc_drop']})",
                         pick["ratio"], ">= 7x at ROC-AUC drop <= 0.002", bool(ok))}


def _print(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "ranks"]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))


PARTS = ("codebook", "materialize", "svd", "dlrm")


def main() -> None:
    p = parser(__doc__.splitlines()[0], threads=None, seed=0, parts=PARTS)
    args = p.parse_args()
    threads = apply_threads(args)
    payload, rows, goals = {}, [], []
    with tempfile.TemporaryDirectory(prefix="torchslim-compact-") as tmp:
        tmp = Path(tmp)
        for part in args.parts:
            payload[part] = globals()[f"{part}_part"](tmp, args)
            if part == "svd":
                _print("svd: digits-cnn", payload[part]["digits-cnn"])
                _print("svd: minilm FFNs", payload[part]["minilm"])
                rows += [{"part": part, "model": model, **{k: v for k, v in r.items() if k != "ranks"}}
                         for model in ("digits-cnn", "minilm") for r in payload[part][model]]
            else:
                _print("minilm, weights generated at run time" if part == "materialize" else part,
                       payload[part]["rows"])
                rows += [{"part": part, **r} for r in payload[part]["rows"]]
            if "goal" in payload[part]:
                goals.append(payload[part]["goal"])
    print()
    for g in goals:
        print(("MET  " if g["met"] else "MISS ") + f"{g['goal']}: {g['value']} (goal {g['target']})")
    details = {"svd_ranks": {model: [r["ranks"] for r in payload["svd"][model] if r.get("ranks")]
                             for model in ("digits-cnn", "minilm")}} if "svd" in payload else {}
    if "codebook" in payload:
        details["codebook_recipe"] = payload["codebook"]["recipe"]
    if "dlrm" in payload:
        details["dlrm_threads"] = payload["dlrm"]["threads"]
    write_results(args, rows, goals, details, threads=threads)


if __name__ == "__main__":
    main()
