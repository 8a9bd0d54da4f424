"""Task metrics on model outputs (tensors): accuracy, agreement/KL against a reference, cosine, perplexity, AUC."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    return float((logits.argmax(-1) == labels).float().mean())


def top1_agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Fraction of samples whose top-1 class matches the reference model's."""
    return float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())


CONFIDENT_MARGIN = 0.1  # reference top-1 minus top-2 softmax probability for a sample to count as confident


def confident_agreement(logits: torch.Tensor, reference_logits: torch.Tensor,
                        margin: float = CONFIDENT_MARGIN) -> tuple[float | None, int]:
    """Top-1 agreement over the samples the reference is confident about: its top-1 softmax probability
    exceeds its top-2 by more than ``margin``. A flip between two near-tied classes is left out here, so a
    drop in this figure means real disagreement. Returns (agreement, or None when no sample qualifies; count).
    """
    probabilities = F.softmax(reference_logits.double(), -1)
    top2 = probabilities.topk(min(2, probabilities.shape[-1]), dim=-1).values
    gap = top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0)
    confident = gap > margin
    count = int(confident.sum())
    if count == 0:
        return None, 0
    return top1_agreement(logits[confident], reference_logits[confident]), count


def topk_agreement(logits: torch.Tensor, reference_logits: torch.Tensor, k: int = 5) -> float:
    """Fraction of samples whose reference top-1 class is among the model's top ``k`` classes."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return float((top == reference_logits.argmax(-1, keepdim=True)).any(-1).float().mean())


def kl_divergence(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Mean over samples of KL(reference || model) between softmax distributions, in nats."""
    log_p = F.log_softmax(reference_logits.double(), -1)
    log_q = F.log_softmax(logits.double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def cosine_similarity_stats(embeddings: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(mean, minimum)`` cosine similarity between matching rows of two embedding matrices."""
    cos = F.cosine_similarity(embeddings.double(), reference.double(), dim=-1)
    return float(cos.mean()), float(cos.min())


def perplexity(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> float:
    """exp(mean token cross-entropy); ``logits`` (N, T, V) predict ``targets`` (N, T), positions already aligned."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1),
                           ignore_index=ignore_index)
    return math.exp(float(loss))


def roc_auc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve of binary ``labels`` ranked by ``scores`` (scikit-learn's roc_auc_score)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(labels), np.asarray(scores)))
