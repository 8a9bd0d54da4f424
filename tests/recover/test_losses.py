"""Loss values on known inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from torchslim.recover.losses import (attention_distillation_loss, cross_entropy, distillation_loss,
                                      embedding_distillation_loss, feature_distillation_loss, focal_loss, get_loss,
                                      list_losses)


def test_registry_names_every_loss():
    assert {"cross_entropy", "focal", "kd", "embedding", "feature", "attention"} <= set(list_losses())
    with pytest.raises(KeyError, match="unknown loss 'hinge'"):
        get_loss("hinge")


def test_kd_at_temperature_one_is_cross_entropy_against_teacher_soft_labels():
    torch.manual_seed(0)
    student = torch.randn(8, 5, requires_grad=True)
    teacher = torch.randn(8, 5)
    soft = teacher.softmax(-1)
    entropy = -(soft * soft.log()).sum(-1).mean()
    kd = distillation_loss(student, teacher, temperature=1.0)
    soft_ce = F.cross_entropy(student, soft)
    assert kd.item() == pytest.approx((soft_ce - entropy).item(), abs=1e-6)
    (grad_kd,) = torch.autograd.grad(kd, student)
    (grad_ce,) = torch.autograd.grad(F.cross_entropy(student, soft), student)
    assert torch.allclose(grad_kd, grad_ce, atol=1e-6)


def test_kd_scales_by_temperature_squared_and_vanishes_on_equal_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    assert float(distillation_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-7)
    teacher = torch.tensor([[0.0, 1.0, 0.0]])
    p = F.softmax(teacher / 2, -1)
    q = F.log_softmax(logits / 2, -1)
    expected = float((p * (p.log() - q)).sum()) * 4
    assert float(distillation_loss(logits, teacher, 2.0)) == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_value_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    label = torch.tensor([0])
    log_p = [2 - math.log(math.exp(2) + 2), -math.log(math.exp(2) + 2), -math.log(math.exp(2) + 2)]
    eps = 0.1
    expected = -((1 - eps + eps / 3) * log_p[0] + eps / 3 * (log_p[1] + log_p[2]))
    assert float(cross_entropy(logits, label, label_smoothing=eps)) == pytest.approx(expected, rel=1e-6)
    assert float(cross_entropy(torch.zeros(1, 4), label, label_smoothing=0.3)) == pytest.approx(math.log(4), rel=1e-6)


def test_focal_loss_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    assert float(focal_loss(logits, labels, gamma=0.0)) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    p = logits.softmax(-1)[torch.arange(2), labels]
    expected = float((-(1 - p) ** 2 * p.log()).mean())
    assert float(focal_loss(logits, labels, gamma=2.0)) == pytest.approx(expected, rel=1e-6)
    assert float(focal_loss(logits, labels, gamma=2.0)) < float(F.cross_entropy(logits, labels))


def test_embedding_and_feature_losses():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert float(embedding_distillation_loss(a, b)) == pytest.approx(0.5, abs=1e-6)  # cos 0 and 1
    assert float(embedding_distillation_loss(a, b, "mse")) == pytest.approx(((1 + 1) + (0 + 1)) / 4, abs=1e-6)
    student = torch.ones(2, 3, 8, 8)
    teacher = torch.full((2, 3, 4, 4), 3.0)
    # an 8x8 student map is pooled to the teacher's 4x4 before the squared error: (1 - 3)^2
    assert float(feature_distillation_loss(student, teacher)) == pytest.approx(4.0)
    assert float(feature_distillation_loss(student, teacher, "cosine")) == pytest.approx(0.0, abs=1e-6)


def test_attention_loss_is_zero_for_equal_states_and_ignores_padding():
    torch.manual_seed(0)
    states = {k: torch.randn(2, 6, 8) for k in ("query", "key", "value")}
    assert float(attention_distillation_loss(states, states, heads=2)) == pytest.approx(0.0, abs=1e-6)
    other = {k: torch.randn(2, 6, 8) for k in ("query", "key", "value")}
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    loss = float(attention_distillation_loss(other, states, heads=2, mask=mask))
    assert loss > 0.05
    # What padded positions hold (as keys or as queries) must not change the loss.
    changed = {k: v.clone() for k, v in other.items()}
    for v in changed.values():
        v[0, 4:] = 100.0
    assert float(attention_distillation_loss(changed, states, heads=2, mask=mask)) == pytest.approx(loss, rel=1e-5)
    # Student and teacher widths may differ when both split into the same number of relation heads.
    narrow = {k: torch.randn(2, 6, 4) for k in ("query", "key", "value")}
    assert float(attention_distillation_loss(narrow, states, heads=2)) > 0
