"""Measuring one pipeline stage: size, compute, latency, memory and the task metric, all on its own runtime."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchslim.measure.latency import measure_latency
from torchslim.measure.macs import count_macs
from torchslim.measure.memory import peak_memory_bytes
from torchslim.measure.metrics import (CONFIDENT_MARGIN, accuracy, confident_agreement, cosine_similarity_stats,
                                      kl_divergence, roc_auc, top1_agreement, topk_agreement)
from torchslim.measure.params import count_nonzero_params, count_params
from torchslim.measure.size import artifact_bytes, resident_parameter_bytes


# Metrics where lower is better: their change is relative (perplexity +3.1%), every other metric's a difference.
LOWER_IS_BETTER = ("perplexity",)


def score_drop(metric: str, baseline: float, score: float) -> float:
    """How much worse ``score`` is than ``baseline``: a difference, or relative for perplexity."""
    if metric in LOWER_IS_BETTER:
        return score / baseline - 1.0
    return baseline - score


@dataclass
class Evaluation:
    """The task metric of one stage: ``metric`` names ``score``; ``metrics`` holds every measured value."""

    metric: str
    score: float
    metrics: dict[str, float]
    outputs: torch.Tensor


def collect_outputs(deployable, data, preprocess, batch_size: int, limit: int, split: str = "test", *,
                    progress: bool | None = None, desc: str = "evaluating") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``deployable`` over ``split`` (the test split unless told); returns (outputs, labels or None).

    ``progress`` False hides the progress bar (None: the global setting of `torchslim._progress`).
    """
    from torchslim._progress import bar

    outputs, labels = [], []
    samples = len(data.splits[split]) if limit <= 0 else min(limit, len(data.splits[split]))
    batches = data.batches(split, preprocess, batch_size, limit=limit)
    for inputs, target in bar(batches, total=-(-samples // batch_size), desc=desc, show=progress):
        outputs.append(deployable(inputs).float())
        if target is not None:
            labels.append(target)
    return torch.cat(outputs), (torch.cat(labels) if labels else None)


def evaluate(outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None,
             task: str) -> Evaluation:
    """Score outputs: accuracy (ROC-AUC for "ctr") where there are labels, else fidelity to the reference
    (baseline) outputs."""
    reference = outputs if reference is None else reference
    if task == "lm":
        return evaluate_lm(outputs, reference)
    if task == "ctr":
        return evaluate_ctr(outputs, labels, reference)
    if task == "embedding":
        mean, minimum = cosine_similarity_stats(outputs, reference)
        return Evaluation("cosine", mean, {"cosine": mean, "cosine_min": minimum}, outputs)
    metrics = {"agreement": top1_agreement(outputs, reference), **fidelity(outputs, reference)}
    if labels is not None:
        metrics = {"accuracy": accuracy(outputs, labels), **metrics}
        return Evaluation("accuracy", metrics["accuracy"], metrics, outputs)
    return Evaluation("agreement", metrics["agreement"], metrics, outputs)


def fidelity(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """What plain top-1 agreement hides: agreement on the samples the reference is confident about (its top-1
    softmax probability above its top-2 by more than ``confident_margin``; ``confident_samples`` of them), top-5
    agreement (the reference's class among the stage's five best) and mean KL(reference || stage) in nats."""
    agreement, count = confident_agreement(logits, reference, CONFIDENT_MARGIN)
    metrics = {"top5_agreement": topk_agreement(logits, reference, 5), "kl": kl_divergence(logits, reference),
               "confident_margin": CONFIDENT_MARGIN, "confident_samples": float(count)}
    if agreement is not None:
        metrics["confident_agreement"] = agreement
    return metrics


def evaluate_ctr(logits: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor) -> Evaluation:
    """Click-through models (one logit per sample): ROC-AUC and log-loss against the labels, and the mean
    absolute difference of click probabilities to the reference (``prob_mae``; ``prob_fidelity`` is
    ``1 - prob_mae``, the score where there are no labels)."""
    probability = torch.sigmoid(logits.double().reshape(-1))
    difference = float((probability - torch.sigmoid(reference.double().reshape(-1))).abs().mean())
    metrics = {"prob_mae": difference}
    if labels is None:
        metrics["prob_fidelity"] = 1.0 - difference
        return Evaluation("prob_fidelity", metrics["prob_fidelity"], metrics, logits)
    target = labels.double().reshape(-1)
    logloss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits.double().reshape(-1), target))
    metrics = {"roc_auc": roc_auc(probability, target), "logloss": logloss, **metrics}
    return Evaluation("roc_auc", metrics["roc_auc"], metrics, logits)


def evaluate_lm(sums: torch.Tensor, reference: torch.Tensor) -> Evaluation:
    """Causal LMs (per sequence ``[NLL sum, tokens]``, see `torchslim.zoo.hub.CausalLMScorer`): perplexity
    over all tokens (lower is better), its ratio to the reference's, and the mean token NLL."""
    nll = float(sums[:, 0].double().sum() / sums[:, 1].double().sum())
    reference_nll = float(reference[:, 0].double().sum() / reference[:, 1].double().sum())
    metrics = {"perplexity": math.exp(nll), "nll": nll, "perplexity_ratio": math.exp(nll - reference_nll),
               "tokens": float(sums[:, 1].sum())}
    return Evaluation("perplexity", metrics["perplexity"], metrics, sums)


def first_samples(batch: Any, count: int) -> Any:
    """The first ``count`` samples of an input batch (a tensor or a tuple of tensors)."""
    if isinstance(batch, (tuple, list)):
        return tuple(t[:count] for t in batch)
    return batch[:count]


def measure_deployable(deployable, artifact_dir: Path, batch: Any, batch_size: int, example_inputs: Any, *,
                       warmup: int, repeats: int) -> dict:
    """Params, MACs (per sample), artifact bytes, latency at batch 1 and ``batch_size``, peak memory."""
    module = deployable.module
    path = deployable.save(artifact_dir)
    raw, shipped = artifact_bytes(path)
    single = first_samples(batch, 1)
    bs1 = measure_latency(deployable, single, warmup=warmup, repeats=repeats, min_seconds=0.5)
    batched = measure_latency(deployable, batch, warmup=warmup, repeats=repeats)
    return {
        "runtime": deployable.runtime,
        "params": count_params(module),
        "params_nonzero": count_nonzero_params(module),
        "macs": count_macs(module, example_inputs),
        "size_bytes": shipped,
        "size_bytes_raw": raw,
        "latency_ms_bs1": round(bs1.median_ms, 4),
        "latency_ms_batch": round(batched.median_ms, 4),
        "latency_spread_ms_batch": [round(batched.min_ms, 4), round(batched.max_ms, 4)],
        "batch_size": batch_size,
        "peak_memory_bytes": peak_memory_bytes(lambda: deployable.load_and_run(path, batch)),
        # eager PyTorch keeps the module's tensors; another runtime holds the artifact's weights instead
        "resident_param_bytes": resident_parameter_bytes(module) if deployable.runtime == "torch" else raw,
        "artifact": path.name,
    }
