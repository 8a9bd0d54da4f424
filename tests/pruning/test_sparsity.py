"""Sparsity masks, Wanda and SparseGPT on synthetic layers with correlated activations."""

from __future__ import annotations

import pytest
import torch

from torchslim.pruning.sparsity import (
    magnitude_mask, nm_mask, parse_pattern, pattern_sparsity, sparsegpt_prune, unstructured_mask, wanda_mask,
)


def correlated_layer(out_features=64, in_features=128, rows=2048):
    """A weight, its inputs' Hessian and squared norms: mixed (correlated) channels with log-normal scales."""
    generator = torch.Generator().manual_seed(0)
    mixing = 0.5 * torch.eye(in_features) + torch.randn(in_features, 8, generator=generator) @ torch.randn(
        8, in_features, generator=generator) / 4
    scales = torch.randn(in_features, generator=generator).exp()
    x = (torch.randn(rows, in_features, generator=generator) @ mixing) * scales
    w = torch.randn(out_features, in_features, generator=generator)
    return w, 2 / rows * x.t() @ x, (x * x).sum(0)


def objective(w, pruned, hessian) -> float:
    delta = w - pruned
    return float(torch.trace(delta @ hessian @ delta.t()))


def test_patterns_parse_and_imply_their_sparsity():
    assert parse_pattern("unstructured") is None and parse_pattern("2:4") == (2, 4)
    assert pattern_sparsity("1:4") == pytest.approx(0.75) and pattern_sparsity("unstructured") is None
    for bad in ("4:4", "0:4", "2-4", "half"):
        with pytest.raises(ValueError, match="N:M"):
            parse_pattern(bad)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_n_of_every_m_and_the_largest(n, m):
    scores = torch.randn(16, 64).abs()
    mask = nm_mask(scores, n, m)
    per_group = mask.reshape(16, 64 // m, m).sum(-1)
    assert int(per_group.min()) == n and int(per_group.max()) == n
    groups = scores.reshape(16, -1, m)
    kept_min = torch.where(mask.reshape(groups.shape), groups, torch.inf).amin(-1)
    dropped_max = torch.where(mask.reshape(groups.shape), -torch.inf, groups).amax(-1)
    assert bool((kept_min >= dropped_max).all())
    with pytest.raises(ValueError, match="multiple of 8"):
        nm_mask(torch.randn(2, 12), 4, 8)


def test_unstructured_mask_drops_an_exact_count_per_row_or_per_matrix():
    scores = torch.randn(10, 30)
    per_row = unstructured_mask(scores, 0.3)
    assert (~per_row).sum(1).tolist() == [9] * 10
    whole = unstructured_mask(scores, 0.37, per_row=False)
    assert int((~whole).sum()) == int(0.37 * 300) == 111
    assert float(scores[whole].min()) >= float(scores[~whole].max())
    assert bool(unstructured_mask(scores, 0.0).all())


def test_wanda_scores_weights_by_input_norm_within_each_row():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    sq_norm = torch.tensor([100.0, 1.0, 1.0, 0.01])  # ‖X‖ = 10, 1, 1, 0.1 -> scores 10, 2, 3, 0.4
    assert wanda_mask(w, sq_norm, 0.5).tolist() == [[True, False, True, False]]
    assert magnitude_mask(w, 0.5).tolist() == [[False, False, True, True]]
    w2, _, sq = correlated_layer()
    for pattern, per_row_zeros in (("unstructured", 64), ("2:4", 64), ("4:8", 64)):
        mask = wanda_mask(w2, sq, 0.5, pattern)
        assert (~mask).sum(1).tolist() == [per_row_zeros] * 64


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_sparsegpt_nm_has_exactly_n_nonzeros_in_every_group(pattern):
    n, m = parse_pattern(pattern)
    w, hessian, _ = correlated_layer()
    pruned, mask = sparsegpt_prune(w, hessian, 0.0, pattern, blocksize=30)  # blocksize rounds down to M's multiple
    nonzero = (pruned != 0).reshape(64, 128 // m, m).sum(-1)
    assert int(nonzero.min()) == n and int(nonzero.max()) == n
    assert torch.equal(pruned != 0, mask)


def test_sparsegpt_unstructured_hits_the_sparsity_exactly_and_zero_sparsity_changes_nothing():
    w, hessian, _ = correlated_layer()
    pruned, mask = sparsegpt_prune(w, hessian, 0.6, blocksize=48)
    assert int((pruned == 0).sum()) == int((~mask).sum()) == int(0.6 * w.numel())
    same, keep = sparsegpt_prune(w, hessian, 0.0)
    assert bool(keep.all()) and torch.allclose(same, w, atol=1e-6)
    half, _ = sparsegpt_prune(w.half(), hessian, 0.5)
    assert half.dtype == torch.float16


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    # Measured objective ratios, SparseGPT / Wanda: 0.081 (unstructured), 0.057 (2:4), 0.108 (4:8);
    # Wanda / magnitude: 0.136, 0.265, 0.182.
    w, hessian, sq_norm = correlated_layer()
    pruned, _ = sparsegpt_prune(w, hessian, 0.5, pattern)
    sparsegpt = objective(w, pruned, hessian)
    wanda = objective(w, w * wanda_mask(w, sq_norm, 0.5, pattern), hessian)
    magnitude = objective(w, w * magnitude_mask(w, 0.5, pattern), hessian)
    assert sparsegpt < 0.25 * wanda
    assert wanda < 0.5 * magnitude
