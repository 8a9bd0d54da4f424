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


def _fidelity_case():
    """Four samples over six classes: the reference's probabilities are given, the stage's logits rank them."""
    reference = torch.tensor([[0.50, 0.30, 0.05, 0.05, 0.05, 0.05],   # confident (margin 0.20), agreed
                              [0.30, 0.28, 0.105, 0.105, 0.105, 0.105],  # near-tie (0.02): the flip is excused
                              [0.05, 0.05, 0.05, 0.05, 0.05, 0.75],   # confident, flipped, not even in top 5
                              [0.05, 0.05, 0.05, 0.60, 0.20, 0.05]]).log()  # confident (0.40), agreed
    stage = torch.tensor([[5., 4, 3, 2, 1, 0], [4., 5, 3, 2, 1, 0], [0., 1, 5, 3, 2, -1], [0., 1, 2, 5, 3, 4]])
    return stage, reference


def test_confident_and_top5_agreement_on_hand_built_logits():
    from torchslim.measure.metrics import confident_agreement, topk_agreement

    stage, reference = _fidelity_case()
    assert top1_agreement(stage, reference) == 0.5
    assert confident_agreement(stage, reference, 0.1) == (pytest.approx(2 / 3), 3)
    assert confident_agreement(stage, reference, 0.01) == (0.5, 4)
    assert confident_agreement(stage, reference, 0.9) == (None, 0)
    assert topk_agreement(stage, reference, 5) == 0.75
    assert topk_agreement(stage, reference, 1) == 0.5


def test_classification_evaluation_keeps_agreement_as_headline_and_adds_fidelity():
    from torchslim.measure.stage import evaluate

    stage, reference = _fidelity_case()
    evaluation = evaluate(stage, None, reference, "classification")
    assert evaluation.metric == "agreement" and evaluation.score == 0.5
    assert evaluation.metrics["confident_agreement"] == pytest.approx(2 / 3)
    assert evaluation.metrics["confident_samples"] == 3 and evaluation.metrics["confident_margin"] == 0.1
    assert evaluation.metrics["top5_agreement"] == 0.75
    assert evaluation.metrics["kl"] == pytest.approx(kl_divergence(stage, reference), rel=1e-12)
    p = torch.softmax(reference.double(), -1)
    expected = float((p * (p.log() - torch.log_softmax(stage.double(), -1))).sum(-1).mean())
    assert evaluation.metrics["kl"] == pytest.approx(expected, rel=1e-9)
    baseline = evaluate(reference, None, reference, "classification").metrics
    assert baseline["agreement"] == baseline["confident_agreement"] == baseline["top5_agreement"] == 1.0
    assert baseline["kl"] == pytest.approx(0.0, abs=1e-12)
