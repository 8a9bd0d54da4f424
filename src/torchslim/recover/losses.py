"""Losses for training and recovery, in a registry: hard-label losses (cross-entropy with label smoothing, focal,
binary cross-entropy for click-through models) and distillation losses (logits with temperature, binary logits,
embeddings, intermediate features, attention relations).

`finetune` combines them with weights: ``alpha * kd + (1 - alpha) * <loss.name> + feature_weight * feature +
attention_weight * attention``; each term's epoch mean is reported.

Example:
    >>> get_loss("focal")(logits, labels, gamma=2.0)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_LOSSES: dict[str, Callable[..., torch.Tensor]] = {}


def register_loss(name: str):
    """Decorator: make a loss available to recipes under ``name``."""
    def decorate(fn):
        _LOSSES[name] = fn
        return fn
    return decorate


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    if name not in _LOSSES:
        raise KeyError(f"unknown loss {name!r} (known: {', '.join(sorted(_LOSSES))})")
    return _LOSSES[name]


def list_losses() -> list[str]:
    return sorted(_LOSSES)


@register_loss("cross_entropy")
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
                  **_: float) -> torch.Tensor:
    """Cross-entropy; ``label_smoothing`` moves that much probability mass from the label to a uniform spread."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


@register_loss("focal")
def focal_loss(logits: torch.Tensor, labels: torch.Tensor, *, gamma: float = 2.0, label_smoothing: float = 0.0,
               **_: float) -> torch.Tensor:
    """Focal loss (Lin et al., 2017): cross-entropy weighted by ``(1 - p_label)^gamma``, so that examples the
    model already gets right count less; ``gamma = 0`` is cross-entropy."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    target = F.one_hot(labels, logits.shape[-1]).to(log_p.dtype)
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
    weight = (1 - log_p.exp()).pow(gamma)
    return -(target * weight * log_p).sum(-1).mean()


@register_loss("kd")
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) between temperature-softened distributions, scaled by T^2 (Hinton et al., 2015)
    so that its gradients keep the same magnitude as the hard-label loss's whatever the temperature."""
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


@register_loss("embedding")
def embedding_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Sentence-embedding distillation: ``1 - cosine`` (default) or mean squared error, averaged over the batch."""
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


@register_loss("feature")
def feature_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Hidden-state distillation (FitNets-style) between a student feature, already projected to the teacher's
    width, and the teacher's: MSE, or ``1 - cosine`` over the channel/hidden dimension. A student map of another
    spatial size is pooled to the teacher's."""
    student, teacher = student.float(), teacher.float()
    if student.ndim == 4 and student.shape[-2:] != teacher.shape[-2:]:
        student = F.adaptive_avg_pool2d(student, teacher.shape[-2:])
    if kind == "cosine":
        dim = 1 if student.ndim == 4 else -1
        return (1 - F.cosine_similarity(student, teacher, dim=dim)).mean()
    return F.mse_loss(student, teacher)


def relation(states: torch.Tensor, other: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-head scaled dot-product relation ``log softmax(A B^T / sqrt(d))`` of (N, T, D) states split into
    ``heads`` heads; padded key positions (``mask == 0``) get no probability. Returns (N, heads, T, T)."""
    n, t, d = states.shape
    a = states.float().view(n, t, heads, d // heads).transpose(1, 2)
    b = other.float().view(n, t, heads, d // heads).transpose(1, 2)
    scores = a @ b.transpose(-1, -2) / (d // heads) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


@register_loss("attention")
def attention_distillation_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], heads: int,
                                mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM-style self-attention distillation (Wang et al., 2020) on one layer: KL(teacher || student) of the
    attention distributions softmax(QK^T/sqrt(d)) and of the value relations softmax(VV^T/sqrt(d)), per head,
    averaged over real (unpadded) query positions. ``student``/``teacher`` hold "query", "key", "value" states
    (N, T, D); widths may differ as long as both divide into ``heads`` relation heads."""
    total = student["query"].new_zeros((), dtype=torch.float32)
    weights = None if mask is None else mask.float()[:, None, :]  # (N, 1, T) over query positions
    for a, b in (("query", "key"), ("value", "value")):
        log_t = relation(teacher[a], teacher[b], heads, mask)
        log_s = relation(student[a], student[b], heads, mask)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (N, heads, T)
        if weights is None:
            total = total + kl.mean()
        else:
            total = total + (kl * weights).sum() / (weights.sum() * heads)
    return total


@register_loss("bce")
def binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
                         **_: float) -> torch.Tensor:
    """Binary cross-entropy on one logit per sample (click-through models); ``label_smoothing`` moves the 0/1
    targets that much towards 1/2."""
    target = labels.float() * (1 - label_smoothing) + label_smoothing / 2
    return F.binary_cross_entropy_with_logits(logits.float(), target)


@register_loss("binary_kd")
def binary_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """The two-class form of `distillation_loss` for one logit per sample: KL(teacher || student) between the
    Bernoulli distributions ``sigmoid(logit / T)``, scaled by T^2 (zero when the logits agree)."""
    student = student_logits.float() / temperature
    teacher = torch.sigmoid(teacher_logits.float() / temperature)
    cross = F.binary_cross_entropy_with_logits(student, teacher)
    entropy = F.binary_cross_entropy(teacher, teacher)
    return (cross - entropy) * temperature ** 2
