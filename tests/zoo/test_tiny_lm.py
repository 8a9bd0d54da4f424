"""The causal-LM path: tokenizer training, packed blocks, per-sequence NLL scoring, perplexity and generation."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torchslim.measure.generation import measure_generation  # noqa: E402
from torchslim.measure.stage import evaluate  # noqa: E402
from torchslim.report import _ratios, _score_change  # noqa: E402
from torchslim.zoo.hub import CausalLMScorer, load_hf_folder  # noqa: E402
from torchslim.zoo.tiny_lm import lm_loss, packed_blocks, train_tokenizer  # noqa: E402

TEXTS = [f"The value {i} is returned when the list holds {i % 7} items and the flag is set." for i in range(60)] + [
    "Return a new array of given shape and type, filled with zeros.",
    "This module provides access to the mathematical functions defined by the C standard."]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def lm(tokenizer):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.GPT2LMHeadModel(config).eval()


def test_tokenizer_round_trips_text_and_starts_with_the_boundary_token(tokenizer):
    ids = tokenizer(TEXTS[-1])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == tokenizer.pad_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXTS[-1]
    assert len(tokenizer) <= 300


def test_packed_blocks_are_full_and_keep_the_token_stream(tokenizer):
    blocks = packed_blocks(tokenizer, TEXTS, tokens=200, context=16)
    assert len(blocks) == 200 // 16 and all(b.shape == (16,) for b in blocks)
    stream = sum((tokenizer(t)["input_ids"] for t in TEXTS[:20]), [])
    assert torch.cat(blocks).tolist() == stream[:len(blocks) * 16]


@torch.no_grad()
def test_scorer_nll_matches_transformers_loss_and_ignores_padding(tokenizer, lm):
    scorer = CausalLMScorer(lm)
    encoded = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    sums = scorer(encoded["input_ids"], encoded["attention_mask"])
    for row in range(3):
        length = int(encoded["attention_mask"][row].sum())
        ids = encoded["input_ids"][row:row + 1, :length]
        reference = lm(input_ids=ids, labels=ids).loss  # mean NLL of the length-1 next tokens
        assert sums[row, 1] == length - 1
        assert float(sums[row, 0] / sums[row, 1]) == pytest.approx(float(reference), rel=1e-4)
    mean = lm_loss(lm(**encoded).logits, encoded["input_ids"], encoded["attention_mask"])
    assert float(mean) == pytest.approx(float(sums[:, 0].sum() / sums[:, 1].sum()), rel=1e-4)


def test_perplexity_evaluation_and_relative_change_in_the_report():
    base = torch.tensor([[20.0, 10.0], [10.0, 10.0]])  # mean NLL 1.5
    worse = torch.tensor([[22.0, 10.0], [11.0, 10.0]])  # mean NLL 1.65
    evaluation = evaluate(worse, None, base, "lm")
    assert evaluation.metric == "perplexity"
    assert evaluation.score == pytest.approx(math.exp(1.65))
    assert evaluation.metrics["perplexity_ratio"] == pytest.approx(math.exp(0.15))
    stage = {"metric": "perplexity", "score": math.exp(1.65), "params": 1, "params_nonzero": 1, "macs": 1,
             "size_bytes": 1, "size_bytes_raw": 1, "latency_ms_bs1": 1, "latency_ms_batch": 1}
    base_stage = dict(stage, score=math.exp(1.5))
    stage["ratios"] = _ratios(stage, base_stage)
    assert _score_change(stage) == f"perplexity +{(math.exp(0.15) - 1) * 100:.2f}%"


def test_generation_decodes_exactly_the_requested_tokens(tokenizer, lm):
    result = measure_generation(CausalLMScorer(lm), tokenizer, prompt="The value", new_tokens=6, repeats=2)
    assert result["decode_tokens_per_s"] > 0
    assert len(tokenizer(result["generated_text"])["input_ids"]) >= 1 + 2  # boundary + prompt at least
    assert measure_generation(torch.nn.Linear(2, 2), tokenizer) == {}


def test_hf_causal_lm_folder_loads_as_an_lm_bundle(tmp_path, tokenizer, lm):
    lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    bundle = load_hf_folder(str(tmp_path), spec=f"hf:{tmp_path}")
    assert bundle.task == "lm" and bundle.modality == "text"
    ids, mask = bundle.preprocess(TEXTS[:2])
    sums = bundle.model(ids, mask)
    assert sums.shape == (2, 2) and float(sums[:, 1].sum()) == float(mask[:, 1:].sum())
