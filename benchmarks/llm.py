"""Large-model methods on a real causal LM: `python benchmarks/llm.py [--json PATH] [--models a,b] [--rows a,b]`.

For builtin:tiny-lm (GPT-2-style, trained here on builtin:docs) and any `hf:PATH` causal LM given, one process
measures, one row after another on the same held-out passages: fp32; weight-only int8 (per channel) and int4 at
group 128 with RTN, HQQ, GPTQ and AWQ; one-shot Wanda and SparseGPT at 50% unstructured and 2:4; and SparseGPT
50% followed by int4 GPTQ; structured width pruning (half of every FFN's neurons removed, no recovery) by
weight magnitude, and by activation importance or the obs order with the least-squares refit. For each:
perplexity (and its change against fp32), artifact bytes, peak memory of loading the artifact and scoring one
batch, and greedy decode tokens/s at batch 1 (48 tokens; median of 7 runs timed alternately with the fp32
model, whose median is the row's reference).

Goals (issue 7): int4 g128 with the best algorithm <= +3% perplexity at >= 6x smaller artifact; Wanda/SparseGPT
at 50% <= +15% perplexity; int4 decode tokens/s >= fp32's.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (apply_threads, comma_list, deprecated_alias, evaluate_model, goal, parser,  # noqa: E402
                     step_context, write_results)

from torchslim._config import from_dict  # noqa: E402
from torchslim.data import resolve_data  # noqa: E402
from torchslim.measure.generation import measure_generation  # noqa: E402
from torchslim.measure.memory import peak_memory_bytes  # noqa: E402
from torchslim.measure.size import artifact_bytes  # noqa: E402
from torchslim.registry import get_method  # noqa: E402
from torchslim.runtime import TorchDeployable  # noqa: E402
from torchslim.zoo import resolve_model  # noqa: E402

CALIBRATION = {"calibration": {"samples": 128, "batch_size": 8}}
ROWS: dict[str, list[tuple[str, str, dict]]] = {
    "fp32": [],
    "int8-weight rtn per-channel": [("quantize", "int8-weight", {})],
    "int4-weight rtn g128": [("quantize", "int4-weight", {"algorithm": "rtn"})],
    "int4-weight hqq g128": [("quantize", "int4-weight", {"algorithm": "hqq"})],
    "int4-weight gptq g128": [("quantize", "int4-weight", {"algorithm": "gptq", **CALIBRATION})],
    "int4-weight awq g128": [("quantize", "int4-weight", {"algorithm": "awq", **CALIBRATION})],
    "magnitude 50%": [("prune", "magnitude", {"sparsity": 0.5, "scope": "local", "skip": ["*lm_head*", "*wte*"]})],
    "wanda 50%": [("prune", "wanda", {"sparsity": 0.5, **CALIBRATION})],
    "sparsegpt 50%": [("prune", "sparsegpt", {"sparsity": 0.5, **CALIBRATION})],
    "wanda 2:4": [("prune", "wanda", {"pattern": "2:4", **CALIBRATION})],
    "sparsegpt 2:4": [("prune", "sparsegpt", {"pattern": "2:4", **CALIBRATION})],
    "sparsegpt 50% + int4 gptq g128": [("prune", "sparsegpt", {"sparsity": 0.5, **CALIBRATION}),
                                       ("quantize", "int4-weight", {"algorithm": "gptq", **CALIBRATION})],
    "ffn/2 channel l1": [("prune", "channel", {"ratio": 0.5, "skip": ["*attn*"]})],
    "ffn/2 channel activation+refit": [("prune", "channel", {"ratio": 0.5, "skip": ["*attn*"],
                                                             "importance": "activation", "reconstruct": True})],
    "ffn/2 channel obs+refit": [("prune", "channel", {"ratio": 0.5, "skip": ["*attn*"], "importance": "obs",
                                                      "reconstruct": True})],
}


def decode_side_by_side(base, candidate, tokenizer, rounds: int = 7, new_tokens: int = 48) -> tuple[dict, float]:
    """Greedy decode tokens/s at batch 1 of ``candidate`` and of the fp32 ``base``, timed alternately (one run
    each per round, after one warm-up each) so that both see the same machine; medians over the rounds."""
    import statistics

    measure_generation(base, tokenizer, new_tokens=new_tokens, repeats=0)
    first = measure_generation(candidate, tokenizer, new_tokens=new_tokens, repeats=0)
    base_speeds, speeds = [], []
    for _ in range(rounds):
        base_speeds.append(measure_generation(base, tokenizer, new_tokens=new_tokens, repeats=1,
                                              warmup=False)["decode_tokens_per_s"])
        speeds.append(measure_generation(candidate, tokenizer, new_tokens=new_tokens, repeats=1,
                                         warmup=False)["decode_tokens_per_s"])
    return ({"decode_tokens_per_s": round(statistics.median(speeds), 2), "generated_text": first["generated_text"]},
            round(statistics.median(base_speeds), 2))


def measure_row(name: str, steps, bundle, data, workdir: Path, reference,
                seed: int = 0) -> tuple[dict, torch.Tensor]:
    context = step_context(bundle, data, workdir, seed)
    context.model = copy.deepcopy(bundle.model)
    deployable = TorchDeployable(context.model)
    started = time.perf_counter()
    for kind, method, settings in steps:
        entry = get_method(kind, method)
        deployable = entry.handler(context, from_dict(entry.config_cls, settings))
    seconds = time.perf_counter() - started
    evaluation, outputs = evaluate_model(context.model, context, reference)
    artifact_dir = workdir / name.replace(" ", "_").replace(":", "-").replace("%", "")
    path = deployable.save(artifact_dir)
    raw, _ = artifact_bytes(artifact_dir)
    batch = data.fill_batch("test", bundle.preprocess, 8)
    peak = peak_memory_bytes(lambda: deployable.load_and_run(path, batch))
    generation, base_speed = decode_side_by_side(bundle.model, context.model, bundle.preprocess.tokenizer)
    row = {"row": name, "perplexity": round(evaluation.score, 3), "artifact_bytes": raw, "peak_memory_bytes": peak,
           "decode_tokens_per_s": generation["decode_tokens_per_s"], "fp32_decode_tokens_per_s": base_speed,
           "decode_speed_ratio": round(generation["decode_tokens_per_s"] / base_speed, 3),
           "step_seconds": round(seconds, 1), "sample": generation["generated_text"][:120],
           "details": deployable.details}
    print(f"  {name}: perplexity {row['perplexity']}, {raw / 1e6:.2f} MB, "
          f"{row['decode_tokens_per_s']} tok/s ({seconds:.0f} s)", flush=True)
    return row, outputs


def run_model(spec: str, workdir: Path, rows: list[str], eval_limit: int, seed: int = 0,
              goal_prefix: str = "") -> dict:
    bundle = resolve_model(spec)
    data = resolve_data("builtin:docs")
    if eval_limit:
        data.splits["test"] = data.splits["test"][:eval_limit]
    base, reference = measure_row("fp32", [], bundle, data, workdir, None, seed)
    results = [base]
    for name in rows:
        if name != "fp32":
            results.append(measure_row(name, ROWS[name], bundle, data, workdir, reference, seed)[0])
    for row in results:
        row["perplexity_change"] = round(row["perplexity"] / base["perplexity"] - 1, 4)
        row["size_ratio"] = round(base["artifact_bytes"] / row["artifact_bytes"], 2)
    return {"model": spec, "notes": bundle.notes + data.notes, "rows": results, "goals": _goals(results, goal_prefix)}


def _goals(rows: list[dict], prefix: str = "") -> list[dict]:
    by_name = {r["row"]: r for r in rows}
    int4 = [r for r in rows if r["row"].startswith("int4-weight")]
    best = min(int4, key=lambda r: r["perplexity"]) if int4 else None
    goals = []
    if best:
        goals.append(goal(f"{prefix}int4 g128 best ({best['row']}): perplexity change",
                          f"{best['perplexity_change']:+.2%}", "<= +3%", best["perplexity_change"] <= 0.03))
        goals.append(goal(f"{prefix}int4 g128 best ({best['row']}): artifact smaller", best["size_ratio"], ">= 6x",
                          best["size_ratio"] >= 6))
        goals.append(goal(f"{prefix}int4 g128 decode tokens/s vs fp32", best["decode_speed_ratio"], ">= 1.0",
                          best["decode_speed_ratio"] >= 1.0))
    for name in ("wanda 50%", "sparsegpt 50%"):
        if name in by_name:
            change = by_name[name]["perplexity_change"]
            goals.append(goal(f"{prefix}{name}: perplexity change", f"{change:+.2%}", "<= +15%", change <= 0.15))
    return goals


def _print(result: dict) -> None:
    print(f"\n{result['model']}")
    header = f"{'row':34} {'perplexity':>10} {'change':>8} {'artifact':>10} {'smaller':>8} {'peak mem':>9} " \
             f"{'tok/s':>7} {'vs fp32':>7}"
    print(header + "\n" + "-" * len(header))
    for r in result["rows"]:
        peak = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 1e6:.1f}M"
        print(f"{r['row']:34} {r['perplexity']:>10.3f} {r['perplexity_change']:>+8.2%} "
              f"{r['artifact_bytes'] / 1e6:>9.2f}M {r['size_ratio']:>7.2f}x {peak:>9} "
              f"{r['decode_tokens_per_s']:>7.1f} {r['decode_speed_ratio']:>6.2f}x")


def main() -> None:
    p = parser(__doc__.splitlines()[0], threads=2, seed=0)
    p.add_argument("--models", type=comma_list(), default=["builtin:tiny-lm"], metavar="A,B",
                   help="comma-separated model specs (default builtin:tiny-lm); any hf:PATH causal LM folder works")

    def add_model(value, current):  # the first --model replaces the default, the next ones add to it
        return [value] if current == p.get_default("models") else [*current, value]

    deprecated_alias(p, "--model", "--models", add_model)
    p.add_argument("--rows", type=comma_list(list(ROWS), "row"), default=list(ROWS), metavar="A,B",
                   help="comma-separated rows to run (default: all)")
    p.add_argument("--eval-limit", type=int, default=0, help="score at most this many test passages (0: all)")
    args = p.parse_args()
    threads = apply_threads(args)
    results, rows, details = [], [], {}
    with tempfile.TemporaryDirectory(prefix="torchslim-llm-") as tmp:
        for spec in args.models:
            prefix = f"{spec}: " if len(args.models) > 1 else ""
            result = run_model(spec, Path(tmp), args.rows, args.eval_limit, args.seed, prefix)
            results.append(result)
            _print(result)
            rows += [{"model": spec, **{k: v for k, v in r.items() if k != "details"}} for r in result["rows"]]
            details[spec] = {"notes": result["notes"], "rows": {r["row"]: r["details"] for r in result["rows"]}}
    write_results(args, rows, [g for result in results for g in result["goals"]], details, threads=threads)


if __name__ == "__main__":
    main()
