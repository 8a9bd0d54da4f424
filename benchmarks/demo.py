"""The demo's targets, measured: `python benchmarks/demo.py [--json PATH] [--threads N] [--seed N]`.

Runs `torchslim demo` (builtin:digits-cnn on builtin:digits: half the channels pruned -> distil -> int8, runtime auto,
batch 256) in this process, timing the whole job, and checks the issue's goals: final vs baseline accuracy drop
<= 0.5 points, artifact >= 4x smaller, batched latency >= 2x faster, wall time < 5 minutes. Baseline and final
are measured in the same process, one after another. A reference row measures the same distilled float model
on ONNX Runtime in fp32, so the speed-up from int8 kernels is told apart from the one from changing runtime.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import goal, parser, write_results  # noqa: E402

from torchslim.defaults import DEMO_RECIPE  # noqa: E402
from torchslim.export import export_onnx  # noqa: E402
from torchslim.measure.stage import collect_outputs, evaluate, measure_deployable  # noqa: E402
from torchslim.pipeline import Pipeline, atomic_output_dir  # noqa: E402
from torchslim.recipe import parse_recipe  # noqa: E402
from torchslim.report import build_report, print_table, write_outputs  # noqa: E402
from torchslim.runtime import OnnxRuntimeDeployable  # noqa: E402


def float_onnx_reference(context, recipe, base: dict, scratch: Path) -> dict:
    """The distilled float model on ONNX Runtime (fp32): same batches, threads and repeats as every stage."""
    path = scratch / "reference-fp32.onnx"
    export_onnx(context.model, context.example_inputs(2), path)
    deployable = OnnxRuntimeDeployable(path, context.model, context.threads)
    m = recipe.measure
    batch = context.data.fill_batch("test", context.bundle.preprocess, m.batch_size)
    row = measure_deployable(deployable, scratch / "reference", batch, m.batch_size, context.example_inputs(1),
                             warmup=m.warmup, repeats=m.repeats)
    outputs, labels = collect_outputs(deployable, context.data, context.bundle.preprocess, max(m.batch_size, 32), 0)
    row.update(name="reference: fp32 onnxruntime", score=evaluate(outputs, labels, None, "classification").score)
    row["speedup_batch"] = round(base["latency_ms_batch"] / row["latency_ms_batch"], 4)
    row["speedup_bs1"] = round(base["latency_ms_bs1"] / row["latency_ms_bs1"], 4)
    return row


# A row per stage (and the reference) in the JSON: the figures of the printed table; the report has the rest.
ROW_KEYS = ("name", "runtime", "params", "macs", "size_bytes", "size_bytes_raw", "latency_ms_bs1", "latency_ms_batch",
            "batch_size", "peak_memory_bytes", "metric", "score")
RATIO_KEYS = ("size_reduction", "speedup_bs1", "speedup_batch", "score_delta")


def rows_of(report: dict, reference: dict) -> list[dict]:
    rows = [{**{k: stage.get(k) for k in ROW_KEYS}, **{k: stage["ratios"][k] for k in RATIO_KEYS}}
            for stage in report["stages"]]
    base = report["stages"][0]
    rows.append({**{k: reference.get(k) for k in ROW_KEYS}, "metric": base["metric"], "size_reduction": None,
                 "speedup_bs1": reference["speedup_bs1"], "speedup_batch": reference["speedup_batch"],
                 "score_delta": round(reference["score"] - base["score"], 6)})
    return rows


def main() -> None:
    args = parser(__doc__.splitlines()[0], threads=0, seed=0).parse_args()
    raw = yaml.safe_load(DEMO_RECIPE)
    raw["seed"] = args.seed
    raw["measure"]["threads"] = args.threads
    recipe = parse_recipe(raw, "demo")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        stages, final_deployable, context = Pipeline(recipe, progress=False, log=lambda m: None).run(Path(scratch))
        report = build_report(recipe, stages, context)
        with atomic_output_dir(Path(scratch) / "demo") as out:  # the demo's outputs, as `torchslim demo` writes
            write_outputs(out, report, recipe, final_deployable)
        seconds = time.perf_counter() - started
        reference = float_onnx_reference(context, recipe, report["stages"][0], Path(scratch))
    print_table(report)
    print(f"{reference['name']}: bs1 {reference['latency_ms_bs1']:.3f} ms, "
          f"batch {reference['latency_ms_batch']:.2f} ms "
          f"@{reference['batch_size']} (speed-up vs eager fp32: bs1 {reference['speedup_bs1']:.2f}x, batch "
          f"{reference['speedup_batch']:.2f}x), accuracy {reference['score']:.4f}")
    base, final = report["stages"][0], report["stages"][-1]
    drop = round((base["score"] - final["score"]) * 100, 3)
    goals = [
        goal("accuracy drop (points)", drop, "<= 0.5", drop <= 0.5),
        goal("artifact size reduction, shipped (x)", final["ratios"]["size_reduction"], ">= 4",
             final["ratios"]["size_reduction"] >= 4),
        goal("artifact size reduction, raw file (x)", final["ratios"]["size_reduction_raw"], "reported", True),
        goal(f"batched latency speedup at {final['batch_size']} (x)", final["ratios"]["speedup_batch"], ">= 2",
             final["ratios"]["speedup_batch"] >= 2),
        goal("batch-1 latency speedup (x)", final["ratios"]["speedup_bs1"], "reported", True),
        goal("int8 vs fp32 on ONNX Runtime, batched (x)",
             round(reference["latency_ms_batch"] / final["latency_ms_batch"], 3), "reported", True),
        goal("wall time, warm environment (s)", round(seconds, 1), "< 300", seconds < 300),
    ]
    write_results(args, rows_of(report, reference), goals,
                  {"seconds": round(seconds, 1), "report": report, "reference_fp32_onnxruntime": reference},
                  threads=report["environment"]["threads"])


if __name__ == "__main__":
    main()
