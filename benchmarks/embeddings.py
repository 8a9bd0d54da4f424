"""Embedding compression on builtin:dlrm: `python benchmarks/embeddings.py [--json PATH] [--quick] [--rows NAMES]`.

For the trained DLRM on builtin:clicks, this process builds, one after another, every candidate below from the
same baseline and measures it by the same code:

  * embedding bytes (the tables' stored tensors: packed rows count as packed) and the ratio to fp32;
  * ROC-AUC and log-loss on the whole test split (100,000 rows), and the AUC drop from the baseline;
  * lookup latency: the 26 tables' forward only (EmbeddingBag or its replacement, one id per sample and table),
    at batch 1 and 2048 real test rows: medians of repeats, every model timed once per round over several
    interleaved rounds in this process, the median round reported;
  * the whole model's forward at batch 2048, and the fine-tuning seconds where a candidate fine-tunes.

One intra-op thread by default (``--threads``): on a shared machine whose other core is busy, a two-thread
``nn.EmbeddingBag`` forward waits for that core at every parallel region (12 ms instead of 0.13 ms here).

Candidates that change the tables (hashing, QR, mixed-dim) are fine-tuned for one epoch by the ``finetune``
step, distilling from the baseline (alpha 1, T 1): a second epoch on the labels overfits a DLRM, the teacher's
soft targets do not push it past what it already knew. ``--quick`` skips the fine-tuned candidates.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import comma_list, deprecated_alias, goal, parser, write_results  # noqa: E402

import torchslim.data.clicks  # noqa: E402,F401  (registers builtin:clicks)
from torchslim.compact.embeddings import (HashingConfig, MixedDimensionConfig, QuotientRemainderConfig, RowwiseInt4Config,  # noqa: E402
                                          RowwiseInt8Config, embedding_bytes)
from torchslim.data import resolve_data  # noqa: E402
from torchslim.measure import measure_latency, set_threads  # noqa: E402
from torchslim.measure.stage import evaluate_ctr  # noqa: E402
from torchslim._context import _StepContext as StepContext  # noqa: E402
from torchslim.recover.finetune import DistillConfig, FinetuneConfig  # noqa: E402
from torchslim.recover.optim import OptimizerConfig, ScheduleConfig  # noqa: E402
from torchslim.registry import get_method  # noqa: E402
from torchslim.zoo import resolve_model  # noqa: E402

FINETUNE = FinetuneConfig(epochs=1, batch_size=256, device="cpu",
                          optimizer=OptimizerConfig(name="adagrad", lr=0.01, weight_decay=0.0),
                          schedule=ScheduleConfig(name="constant"), distill=DistillConfig(temperature=1.0, alpha=1.0))
CANDIDATES = {
    "rowwise-int8": [RowwiseInt8Config()],
    "rowwise-int4": [RowwiseInt4Config()],
    "rowwise-int4 optimized ranges": [RowwiseInt4Config(optimized_ranges=True)],
    "hashing <=300k rows (no finetune)": [HashingConfig(rows_ratio=1.0, max_rows=300_000)],
    "hashing <=300k rows + int4 (no finetune)": [HashingConfig(rows_ratio=1.0, max_rows=300_000), RowwiseInt4Config()],
    "hashing <=300k rows + finetune + int4": [HashingConfig(rows_ratio=1.0, max_rows=300_000), FINETUNE, RowwiseInt4Config()],
    "hashing <=100k rows + finetune + int4": [HashingConfig(rows_ratio=1.0, max_rows=100_000), FINETUNE, RowwiseInt4Config()],
    "hashing 1/4 + finetune": [HashingConfig(rows_ratio=0.25), FINETUNE],
    "qr 4 collisions + finetune": [QuotientRemainderConfig(collisions=4), FINETUNE],
    "mixed-dim alpha 0.2 + finetune": [MixedDimensionConfig(alpha=0.2), FINETUNE],
}
TUNED = {name for name, steps in CANDIDATES.items() if any(isinstance(s, FinetuneConfig) for s in steps)}
KIND = {FinetuneConfig: ("finetune", "distill")}


def lookup_all(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The tables' forward only: table t looks up column t, one id per sample."""
    return [table(ids[:, t:t + 1]) for t, table in enumerate(model.embeddings)]


def score_test_split(model, data, preprocess) -> dict:
    logits, labels = [], []
    with torch.inference_mode():
        for inputs, target in data.batches("test", preprocess, 4096):
            logits.append(model(*inputs))
            labels.append(target)
    return evaluate_ctr(torch.cat(logits), torch.cat(labels), torch.cat(logits)).metrics


def timings(models: dict, batches: dict[int, tuple], rounds: int) -> dict[str, dict]:
    """Lookup and forward medians per model, timed in interleaved rounds (every model once per round, the
    median over rounds reported) so that a change of machine load hits every model alike."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, model in models.items():
                for size, (dense, ids) in batches.items():
                    lookup = measure_latency(lambda x: lookup_all(model, x), ids, warmup=3, repeats=20,
                                             min_seconds=0.2)
                    samples[name].setdefault(f"lookup_ms_bs{size}", []).append(lookup.median_ms)
                forward = measure_latency(lambda x: model(*x), batches[max(batches)], warmup=2, repeats=5)
                samples[name].setdefault(f"forward_ms_bs{max(batches)}", []).append(forward.median_ms)
    return {name: {key: round(statistics.median(values), 4) for key, values in timing.items()}
            for name, timing in samples.items()}


def build(name: str, bundle, data, teacher, workdir: Path, seed: int = 0) -> tuple[torch.nn.Module, float, dict]:
    """Apply a candidate's steps to a copy of the baseline; returns (model, fine-tune seconds, last details)."""
    model = copy.deepcopy(teacher).requires_grad_(True)  # the teacher is frozen; the student trains all of it
    context = StepContext(model=model, teacher=teacher, bundle=bundle, data=data, seed=seed,
                          threads=torch.get_num_threads(), workdir=workdir, progress=False, where=name)
    tune_seconds, details = 0.0, {}
    for step in CANDIDATES[name]:
        kind, method = KIND.get(type(step), ("compress_embeddings", None))
        if method is None:
            method = {RowwiseInt8Config: "rowwise-int8", RowwiseInt4Config: "rowwise-int4", HashingConfig: "hashing",
                      QuotientRemainderConfig: "qr", MixedDimensionConfig: "mixed-dim"}[type(step)]
        started = time.perf_counter()
        deployable = get_method(kind, method).handler(context, step)
        if kind == "finetune":
            tune_seconds += time.perf_counter() - started
        else:
            details = deployable.details
    return model.eval(), tune_seconds, {**details, "skipped": dict(context.skipped)}


def row(name: str, model, base: dict, data, preprocess, timing: dict, tune_seconds: float) -> dict:
    record = {"name": name, "embedding_bytes": embedding_bytes(model), **score_test_split(model, data, preprocess),
              **timing, "finetune_seconds": round(tune_seconds, 1)}
    if base:
        record["ratio"] = round(base["embedding_bytes"] / record["embedding_bytes"], 3)
        record["auc_drop"] = round(base["roc_auc"] - record["roc_auc"], 5)
        record["lookup_speed_bs1"] = round(base["lookup_ms_bs1"] / record["lookup_ms_bs1"], 3)
        record["lookup_speed_bs2048"] = round(base["lookup_ms_bs2048"] / record["lookup_ms_bs2048"], 3)
    return record


def print_table(rows: list[dict]) -> None:
    print(f"\n{'candidate':40s} {'emb MB':>8s} {'ratio':>6s} {'AUC':>7s} {'drop':>8s} {'logloss':>8s} "
          f"{'look bs1':>9s} {'look 2048':>9s} {'fwd 2048':>9s} {'tune s':>7s}")
    for r in rows:
        print(f"{r['name']:40s} {r['embedding_bytes'] / 1e6:8.2f} {r.get('ratio', 1.0):6.2f} {r['roc_auc']:7.4f} "
              f"{r.get('auc_drop', 0.0):+8.4f} {r['logloss']:8.4f} {r['lookup_ms_bs1']:9.3f} "
              f"{r['lookup_ms_bs2048']:9.3f} {r['forward_ms_bs2048']:9.2f} {r['finetune_seconds']:7.1f}")


def main() -> None:
    p = parser(__doc__.splitlines()[0], threads=1, seed=0)
    p.add_argument("--quick", action="store_true", help="skip the candidates that fine-tune")
    p.add_argument("--rows", type=comma_list(list(CANDIDATES), "row"), default=None, metavar="A,B",
                   help="comma-separated candidate names (default: all)")
    deprecated_alias(p, "--only", "--rows", type=comma_list(list(CANDIDATES), "row"))
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    threads = set_threads(args.threads)
    bundle, data = resolve_model("builtin:dlrm"), resolve_data("builtin:clicks")
    teacher = bundle.model.eval().requires_grad_(False)
    names = [n for n in CANDIDATES if (not args.quick or n not in TUNED)]
    names = [n for n in names if n in args.rows] if args.rows else names
    models, seconds, details = {"baseline fp32": teacher}, {"baseline fp32": 0.0}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            print(f"building {name} ...", flush=True)
            models[name], seconds[name], details[name] = build(name, bundle, data, teacher, Path(scratch), args.seed)
            set_threads(threads)  # fine-tuning may change them
    print("timing ...", flush=True)
    batches = {size: data.fill_batch("test", bundle.preprocess, size) for size in (1, 2048)}
    timing = timings(models, batches, args.rounds)
    base = row("baseline fp32", teacher, {}, data, bundle.preprocess, timing["baseline fp32"], 0.0)
    rows = [base] + [row(n, models[n], base, data, bundle.preprocess, timing[n], seconds[n]) for n in names]
    print_table(rows)
    print(f"threads {threads}; lookup = the 26 tables' forward (medians of {args.rounds} interleaved rounds); "
          f"AUC on {len(data.splits['test'])} test rows")
    best = [r for r in rows[1:] if r["ratio"] >= 7 and r["auc_drop"] <= 0.002]
    pick = max(best, key=lambda r: r["ratio"]) if best else max(rows[1:], key=lambda r: r["ratio"], default=base)
    goals = [goal(f"embedding bytes >= 7x smaller at ROC-AUC drop <= 0.002 ({pick['name']})",
                  f"{pick.get('ratio', 1.0)}x, drop {pick.get('auc_drop', 0.0)}", ">= 7x, <= 0.002", bool(best))]
    write_results(args, rows, goals, details, threads=threads)


if __name__ == "__main__":
    main()
