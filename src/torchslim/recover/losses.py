"""Losses for recovery: knowledge distillation on logits and on embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) between temperature-softened distributions, scaled by T^2 (Hinton et al., 2015)
    so that its gradients keep the same magnitude as the hard-label loss's whatever the temperature."""
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def embedding_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between student and teacher embeddings, averaged over the batch."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
