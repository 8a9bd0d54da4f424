"""Mixed precision for ``int8-static`` on ONNX Runtime: which layers stay float, chosen by measurement.

Two choices, each optional, made after the model is built with every layer quantized:

- **speed** (``fallback_slow_layers: true``): each quantized Conv/Gemm is timed alone on ONNX Runtime, its
  fused int8 kernel against its float kernel, at its real input shape, at batch 1 and the recipe's batch
  (`torchslim.quant.onnx_layer_latency`, cached per machine). A layer whose int8 score (as ``prefer`` scores
  runtimes) is more than `SLOWER_BY` above its float score stays float.
- **accuracy** (``max_drop: d``): the int8 model is scored on the validation split against the float model
  it came from, with the metric the pipeline reports (accuracy where there are labels, else top-1 agreement;
  mean cosine for embeddings; drop = float score - int8 score, relative for perplexity). Over ``d``, layers stay float
  in the order of their measured sensitivity (`quantize_one_sensitivity`: the model's output SQNR on two
  calibration batches with only that layer int8): the count doubles until the drop is met, then bisection
  finds the fewest; each candidate is the int8 model with those layers made float again
  (`torchslim.quant.onnx_float_regions.dequantize_layers`), scored on ONNX Runtime's fused kernels. At most
  `MAX_BUILDS` candidates; if even the last tried misses the drop, the best one found is kept and the details
  say so.

The higher precision is float32: ONNX Runtime's CPU provider has no bfloat16 Conv kernel (1.32: ``Conv``
opset 22 on bfloat16 is NOT_IMPLEMENTED), so a layer kept out of int8 runs in fp32 there.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch

SLOWER_BY = 0.10  # int8 must be this much slower than float (relative) before a layer stays float for speed
MAX_BUILDS = 12  # QDQ models the max_drop search may rebuild and score (doubling then bisection)


def wanted(config) -> bool:
    return config.max_drop is not None or config.fallback_slow_layers


class ValidationScore:
    """The float model's outputs on the validation split (``val``, else ``calib``: never the test split the
    report scores; at most ``samples``, 0 = all), and the drop of a candidate against them. Used by
    ``max_drop`` here and by ``quantize: {method: auto}`` (`torchslim.quant.choose`)."""

    def __init__(self, context, samples: int = 0):
        from torchslim.measure.stage import collect_outputs, evaluate
        from torchslim.runtime import TorchDeployable

        self.context, self.samples = context, samples
        data = context.data
        self.split = "val" if len(data.splits.get("val", [])) else "calib"
        self.batch = max(context.batch_size, 32)
        self.reference, self.labels = collect_outputs(TorchDeployable(context.model), data,
                                                      context.bundle.preprocess, self.batch, samples,
                                                      split=self.split, progress=False)
        self.float = evaluate(self.reference, self.labels, None, context.bundle.task)

    def score(self, deployable) -> tuple[float, float]:
        """(drop, score) of ``deployable`` (any runtime) on the validation split."""
        from torchslim.measure.stage import collect_outputs, evaluate, score_drop

        outputs, _ = collect_outputs(deployable, self.context.data, self.context.bundle.preprocess, self.batch,
                                     self.samples, split=self.split, progress=False)
        result = evaluate(outputs, self.labels, self.reference, self.context.bundle.task)
        return score_drop(result.metric, self.float.score, result.score), result.score

    def drop(self, path: Path) -> tuple[float, float]:
        """(drop, score) of the ONNX model at ``path`` on the validation split."""
        from torchslim.runtime import OnnxRuntimeDeployable

        return self.score(OnnxRuntimeDeployable(path, self.context.model, self.context.threads))


def chooser(context, config, validation: ValidationScore | None):
    """The ``choose`` hook of `torchslim.quant.onnx_backend.quantize_onnx_static` for this config."""

    def choose(graph) -> tuple[list[str], dict | None, dict]:
        started = time.perf_counter()
        kept: dict[str, dict] = {}
        corrections = None
        if config.fallback_slow_layers:
            kept.update(slow_layers(graph, context, config))
            if kept:
                corrections = graph.write(graph.excluded + list(kept))
        details: dict = {}
        if config.max_drop is not None:
            found, moved, details = _search(graph, config.max_drop, validation, list(kept))
            kept.update(found)
            corrections = moved if moved is not None else corrections
        if kept:
            _time_kept(graph, context, config, kept)
        details = {"float_layer_choice": {**details, "layers": kept,
                                          "seconds": round(time.perf_counter() - started, 2)}}
        return list(kept), corrections, details

    return choose


def _scores(layer, table, batch: int, prefer: str) -> dict:
    """int8 and float latencies (ms) of one layer at batch 1 and ``batch``, and the two scores."""
    figures = {}
    for precision in ("int8", "float"):
        bs1, batched = table.latencies([layer.at(precision, 1), layer.at(precision, batch)])
        figures[precision] = {"ms_bs1": round(bs1, 4), "ms_batch": round(batched, 4),
                              "score": {"balanced": math.sqrt(bs1 * batched), "batch": batched, "bs1": bs1}[prefer]}
    return figures


def slow_layers(graph, context, config) -> dict[str, dict]:
    """The quantized layers whose int8 kernel is measured slower than their float one: ``{node: why}``."""
    from torchslim.quant.onnx_backend import float_layers
    from torchslim.quant.onnx_layer_latency import conv_and_gemm_layers, onnx_latency_table

    import onnx

    names = [n.name for n in onnx.load(str(graph.prepared), load_external_data=False).graph.node]
    left_float = set(graph.excluded) | set(float_layers(graph.int8_path))
    layers = conv_and_gemm_layers(graph.prepared, [n for n in names if n not in left_float])
    table = onnx_latency_table(context.threads)
    # Time every shape in one call: the table interleaves them round by round, so a burst of other work on the
    # machine weighs on all alike.
    table.latencies([layer.at(p, b) for layer in layers.values() for p in ("int8", "float")
                     for b in (1, context.batch_size)])
    slow = {}
    for name, layer in layers.items():
        figures = _scores(layer, table, context.batch_size, config.prefer)
        if figures["int8"]["score"] > figures["float"]["score"] * (1 + SLOWER_BY):
            slow[name] = {"why": f"int8 slower than float on ONNX Runtime here (by more than "
                                 f"{SLOWER_BY:.0%}, {config.prefer} score)", **_rounded(figures)}
    return slow


def _rounded(figures: dict) -> dict:
    return {p: {k: round(v, 4) for k, v in f.items()} for p, f in figures.items()}


def _time_kept(graph, context, config, kept: dict[str, dict]) -> None:
    """Add to each kept layer what keeping it float costs in latency (float ms - int8 ms; negative: saves)."""
    from torchslim.quant.onnx_layer_latency import conv_and_gemm_layers, onnx_latency_table

    layers = conv_and_gemm_layers(graph.prepared, list(kept))
    table = onnx_latency_table(context.threads)
    for name, why in kept.items():
        if name not in layers:
            why["latency"] = "not timed (not a Conv/Gemm with a known input shape)"
            continue
        figures = why if "int8" in why else _rounded(_scores(layers[name], table, context.batch_size, config.prefer))
        why.update(int8=figures["int8"], float=figures["float"])
        why["float_cost_ms_bs1"] = round(figures["float"]["ms_bs1"] - figures["int8"]["ms_bs1"], 4)
        why["float_cost_ms_batch"] = round(figures["float"]["ms_batch"] - figures["int8"]["ms_batch"], 4)


def _search(graph, max_drop: float, validation: ValidationScore, base: list[str]):
    """The fewest most-sensitive layers kept float (beyond ``base``) for a drop within ``max_drop``.

    Returns ({node: why}, bias corrections of the kept build or None, details); leaves ``graph.int8_path``
    holding the chosen model."""
    import onnx

    first, score = validation.drop(graph.int8_path)
    details = {"max_drop": max_drop, "metric": validation.float.metric, "split": validation.split,
               "samples": int(validation.reference.shape[0]), "float_score": round(validation.float.score, 6),
               "int8_score": round(score, 6), "int8_drop": round(first, 6)}
    if first <= max_drop:
        return {}, None, {**details, "met": True, "drop": round(first, 6), "candidates": []}
    full = onnx.load(str(graph.int8_path))
    prepared = onnx.load(str(graph.prepared))
    errors = quantize_one_sensitivity(full, prepared, graph.feeds[:2], set(graph.excluded + base))
    order = sorted(errors, key=errors.get)  # the lowest output SQNR first
    tried: dict[int, tuple[float, float, dict | None]] = {}
    workdir = graph.int8_path.parent

    def candidate(count: int) -> float:
        path = workdir / f"int8.float{count}.onnx"
        onnx.save(_with_float_layers(full, prepared, order[:count]), str(path))
        tried[count] = (*validation.drop(path), None)
        return tried[count][0]

    count, passing, failing = 1, None, 0
    while len(tried) < MAX_BUILDS and order:
        count = min(count, len(order))
        if candidate(count) <= max_drop:
            passing = count
            break
        failing = count
        if count == len(order):
            break
        count *= 2
    while passing is not None and passing - failing > 1 and len(tried) < MAX_BUILDS:
        middle = (passing + failing) // 2
        if candidate(middle) <= max_drop:
            passing = middle
        else:
            failing = middle
    best = passing if passing is not None else min(tried, key=lambda c: tried[c][0], default=None)
    rows = [{"float_layers": c, "drop": round(d, 6), "score": round(s, 6)} for c, (d, s, _) in sorted(tried.items())]
    if best is None:  # nothing to keep float (no layer the sensitivity pass scores)
        return {}, None, {**details, "met": False, "drop": round(first, 6), "candidates": rows,
                          "reason": "no quantized layer has a measured sensitivity to keep float"}
    shutil.copyfile(workdir / f"int8.float{best}.onnx", graph.int8_path)
    for path in workdir.glob("int8.float*.onnx"):
        path.unlink()
    drop = tried[best][0]
    details.update(met=drop <= max_drop, drop=round(drop, 6), score=round(tried[best][1], 6), candidates=rows)
    if drop > max_drop:
        details["reason"] = (f"no candidate met max_drop {max_drop}: the best, {best} of {len(order)} sensitive "
                             f"layers float, drops {drop:.4f} ({len(tried)} builds)")
    kept = {name: {"why": f"sensitivity rank {rank + 1} of {len(order)} (the model's output SQNR with only "
                          f"this layer int8: {errors[name]:.1f} dB); kept float for max_drop {max_drop}",
                   "rank": rank + 1, "output_sqnr_db_alone": round(errors[name], 2)}
            for rank, name in enumerate(order[:best])}
    return kept, tried[best][2], details


def _with_float_layers(full, prepared, nodes: list[str]):
    """A copy of the QDQ model ``full`` with ``nodes`` float (and the tensors between them)."""
    import copy

    from torchslim.quant.onnx_backend import keep_float_in
    from torchslim.quant.onnx_float_regions import dequantize_layers

    model = copy.deepcopy(full)
    dequantize_layers(model, prepared, set(nodes))
    keep_float_in(model, list(nodes))
    return model


def quantize_one_sensitivity(full, prepared, feeds: list[dict], left_float: set[str]) -> dict[str, float]:
    """``{node: dB}``: for each int8 Conv/Gemm of the QDQ model ``full``, the SQNR of the model's output
    against the float model's on ``feeds`` when that layer alone is int8 (every other layer float): how much
    quantizing it costs the whole model, its own noise carried through everything after it (lower: more
    sensitive). Runs on ONNX Runtime's fused kernels."""
    from torchslim.quant.onnx_ranges import session
    from torchslim.quant.qmath import sqnr_db

    int8 = [n.name for n in full.graph.node if n.op_type in ("Conv", "Gemm") and n.name not in left_float
            and not _reads_float_weight(full, n)]
    float_run = session(prepared.SerializeToString(), True)
    reference = [torch.from_numpy(float_run.run(None, feed)[0]) for feed in feeds]
    scores = {}
    for name in int8:
        alone = session(_with_float_layers(full, prepared, [n for n in int8 if n != name]).SerializeToString(), True)
        outputs = [torch.from_numpy(alone.run(None, feed)[0]) for feed in feeds]
        scores[name] = float(sqnr_db(torch.cat(reference), torch.cat(outputs)))
    return scores


def _reads_float_weight(model, node) -> bool:
    weights = {t.name: t.data_type for t in model.graph.initializer}
    return weights.get(node.input[1]) == 1  # onnx.TensorProto.FLOAT


def reference_for(context, config) -> ValidationScore | None:
    """The validation reference ``max_drop`` needs, taken from the model as the step receives it."""
    if config.max_drop is None:
        return None
    with torch.inference_mode():
        return ValidationScore(context)
