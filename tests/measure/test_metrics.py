import math

import pytest
import torch

from torchslim.measure import accuracy, cosine_similarity_stats, kl_divergence, perplexity, roc_auc, top1_agreement


def test_accuracy_and_agreement_on_known_inputs():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)
    reference = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert top1_agreement(logits, reference) == pytest.approx(0.75)


def test_kl_divergence_matches_hand_computation():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(q.log(), p.log()) == pytest.approx(expected, rel=1e-9)
    assert kl_divergence(p.log(), p.log()) == pytest.approx(0.0, abs=1e-12)


def test_cosine_stats():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    mean, minimum = cosine_similarity_stats(a, b)
    assert minimum == pytest.approx(1 / math.sqrt(2))
    assert mean == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    logits = torch.zeros(2, 5, 50)
    targets = torch.randint(0, 50, (2, 5))
    assert perplexity(logits, targets) == pytest.approx(50.0)
    targets[0, :] = -100  # ignored positions do not count
    assert perplexity(logits, targets) == pytest.approx(50.0)


def test_roc_auc_known_values():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([0, 1])) == pytest.approx(1.0)
