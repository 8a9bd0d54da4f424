"""Causal LMs through the pipeline's steps: one-shot pruning, fine-tuning with token-level distillation,
weight-only quantization and its pickle-free reload, on a small GPT-2 trained for a few seconds here."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import torchslim  # noqa: E402
from torchslim._config import from_dict  # noqa: E402
from torchslim._context import _StepContext as StepContext  # noqa: E402
from torchslim.data import DataBundle  # noqa: E402
from torchslim.measure.stage import collect_outputs, evaluate  # noqa: E402
from torchslim.registry import get_method  # noqa: E402
from torchslim.runtime import TorchDeployable  # noqa: E402
from torchslim.zoo import ModelBundle  # noqa: E402
from torchslim.zoo.hub import CausalLMScorer  # noqa: E402
from torchslim.zoo.preprocess import TextPreprocess  # noqa: E402
from torchslim.zoo.tiny_lm import lm_loss, train_tokenizer  # noqa: E402


WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray").split()


def _cycle_texts(count: int, seed: int) -> list[str]:
    """Twelve consecutive words of a fixed cycle from random starts: a language whose next word is predictable,
    so a small model learns it in seconds and pruning visibly breaks it."""
    starts = np.random.default_rng(seed).integers(0, len(WORDS), count)
    return [" ".join(WORDS[(s + i) % len(WORDS)] for i in range(12)) for s in starts]


@pytest.fixture(scope="module")
def trained():
    """(bundle factory, data): a 2-layer GPT-2 (width 64) trained 60 steps on the word cycle."""
    splits = {"train": _cycle_texts(256, 0), "val": _cycle_texts(32, 1), "test": _cycle_texts(64, 2),
              "calib": _cycle_texts(32, 3)}
    data = DataBundle(spec="test:cycle", modality="text", splits=splits, labels={k: None for k in splits})
    tokenizer = train_tokenizer(list(data.splits["train"]), vocab_size=400)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    lm = transformers.GPT2LMHeadModel(config)
    preprocess = TextPreprocess(tokenizer, max_length=48)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    for step in range(60):
        texts = [data.splits["train"][(step * 16 + i) % 256] for i in range(16)]
        ids, mask = preprocess(texts)
        loss = lm_loss(lm(input_ids=ids, attention_mask=mask).logits, ids, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.eval()

    def bundle() -> ModelBundle:
        return ModelBundle(model=CausalLMScorer(copy.deepcopy(lm)).eval(), spec="test:tiny-gpt2", task="lm",
                           modality="text", preprocess=preprocess, example_inputs=preprocess.example)

    return bundle, data


def _context(bundle, data, tmp_path) -> StepContext:
    return StepContext(model=bundle.model, teacher=copy.deepcopy(bundle.model).requires_grad_(False), bundle=bundle,
                       data=data, seed=0, threads=2, workdir=tmp_path, progress=False, where="test")


def _apply(context, kind, method, settings):
    entry = get_method(kind, method)
    return entry.handler(context, from_dict(entry.config_cls, settings))


def _perplexity(context) -> float:
    outputs, _ = collect_outputs(TorchDeployable(context.model), context.data, context.bundle.preprocess, 32, 0)
    return evaluate(outputs, None, None, "lm").score


def test_distillation_recovers_perplexity_after_pruning_and_keeps_zeros(trained, tmp_path):
    make, data = trained
    context = _context(make(), data, tmp_path)
    base = _perplexity(context)
    _apply(context, "prune", "magnitude", {"sparsity": 0.8, "scope": "local"})
    pruned = _perplexity(context)
    deployable = _apply(context, "finetune", "distill", {
        "epochs": 2, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 2e-3},
        "distill": {"alpha": 0.5, "temperature": 2.0}})
    recovered = _perplexity(context)
    assert pruned > base * 1.1, (base, pruned)  # pruning hurt
    assert recovered < pruned - 0.5 * (pruned - base), (base, pruned, recovered)  # distillation won half back
    assert set(deployable.details["loss_terms"]) == {"kd", "lm_nll"}
    assert len(deployable.details["val_metric"]) == 2 and all(v < 0 for v in deployable.details["val_metric"])
    head = context.model.model.transformer.h[0].mlp.c_fc.weight
    assert math.isclose(float((head == 0).float().mean()), 0.8, abs_tol=0.01)  # masks kept through training
    assert "model.lm_head" in context.skipped  # tied to the input embedding: left dense


def test_int4_gptq_keeps_perplexity_packs_the_model_and_reloads_without_pickle(trained, tmp_path):
    from torchslim.quant.weight_only import WeightOnlyEmbedding, WeightOnlyLinear

    make, data = trained
    context = _context(make(), data, tmp_path)
    base = _perplexity(context)
    float_dir = tmp_path / "float"
    TorchDeployable(context.model).save(float_dir)
    deployable = _apply(context, "quantize", "int4-weight", {"algorithm": "gptq", "group_size": 32,
                                                            "calibration": {"samples": 32, "batch_size": 16}})
    quantized = _perplexity(context)
    assert quantized < base * 1.05, (base, quantized)
    layers = [m for m in context.model.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(layers) == 2 * 4 + 1  # four Conv1D per block, and the head
    embedding = context.model.model.transformer.wte
    assert isinstance(embedding, WeightOnlyEmbedding)
    assert embedding.qweight.data_ptr() == context.model.model.lm_head.qweight.data_ptr()  # one table for both
    path = deployable.save(tmp_path / "int4")
    fresh = torchslim.load(tmp_path / "int4", make().model)
    ids, mask = context.bundle.preprocess(data.splits["test"][:8])
    assert torch.equal(fresh(ids, mask), context.model(ids, mask))
    ratio = (float_dir / "model.safetensors").stat().st_size / path.stat().st_size
    assert ratio > 3.0, ratio


def test_layers_a_group_size_does_not_fit_stay_float_and_are_reported(trained, tmp_path):
    make, data = trained
    context = _context(make(), data, tmp_path)
    deployable = _apply(context, "quantize", "int4-weight", {"group_size": 128, "head_bits": 0})
    assert deployable.details["quantized_layers"] == 2  # only the MLP down-projections have 256 (2 x 128) inputs
    reasons = [context.skipped[f"model.transformer.h.{i}.attn.c_attn"] for i in range(2)]
    assert all("group size 128 does not divide its 64 inputs" in r for r in reasons)
    assert "output head kept in float" in context.skipped["model.lm_head"]


def test_pruned_weights_stay_exactly_zero_through_int4_gptq(trained, tmp_path):
    make, data = trained
    context = _context(make(), data, tmp_path)
    _apply(context, "prune", "sparsegpt", {"sparsity": 0.5, "calibration": {"samples": 32, "batch_size": 16}})
    names = ["mlp.c_fc", "attn.c_proj"]  # attn.c_proj is square: its mask's layout cannot be told by shape
    masks = {n: context.masks[f"model.transformer.h.0.{n}.weight"].t() for n in names}  # Conv1D keeps (in, out)
    _apply(context, "quantize", "int4-weight", {"algorithm": "gptq", "group_size": 32,
                                                "calibration": {"samples": 32, "batch_size": 16}})
    for name, mask in masks.items():
        weight = context.model.model.transformer.h[0].get_submodule(name).dequantized_weight()
        assert float((~mask).float().mean()) == pytest.approx(0.5, abs=0.01)
        assert int((weight[~mask] != 0).sum()) == 0
        assert float((weight[mask] != 0).float().mean()) > 0.9


def test_weight_only_quantization_of_a_model_without_linear_layers_is_a_clear_error(tmp_path):
    from conftest import tiny_bundle

    from torchslim.errors import InputError

    bundle = tiny_bundle()
    bundle.model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    context = _context(bundle, DataBundle(spec="x", modality="image", splits={}, labels={}), tmp_path)
    with pytest.raises(InputError, match="has no Linear layers to quantize"):
        _apply(context, "quantize", "int8-weight", {})


def test_width_pruning_of_gpt2_ffns_then_distillation(trained, tmp_path):
    make, data = trained
    context = _context(make(), data, tmp_path)
    base = _perplexity(context)
    _apply(context, "prune", "channel", {"ratio": 0.5, "skip": ["*attn*"]})
    block = context.model.model.transformer.h[0]
    assert block.mlp.c_fc.weight.shape == (64, 128) and block.mlp.c_proj.weight.shape == (128, 64)
    pruned = _perplexity(context)
    _apply(context, "finetune", "distill", {"epochs": 2, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 2e-3},
                                            "distill": {"alpha": 0.5, "temperature": 2.0}})
    recovered = _perplexity(context)
    assert recovered < pruned and recovered < base * 1.2, (base, pruned, recovered)


def test_data_aware_width_pruning_of_a_trained_lm_beats_weight_magnitude(trained, tmp_path):
    make, data = trained
    perplexity = {}
    for name, settings in {"l1": {}, "random": {"importance": "random"}, "taylor": {"importance": "taylor"},
                           "activation+refit": {"importance": "activation", "reconstruct": True}}.items():
        context = _context(make(), data, tmp_path)
        details = _apply(context, "prune", "channel", {"ratio": 0.5, "skip": ["*attn*"], **settings}).details
        assert context.model.model.transformer.h[0].mlp.c_fc.nf == 128  # 256 -> 128
        perplexity[name] = _perplexity(context)
        if name == "activation+refit":
            assert details["refit_relative_error"]["layers"] == 2  # both blocks' c_proj
    # Taylor scores come from the next-token loss (no labels needed): better than chance; activation importance
    # with the refit loses less than weight magnitude.
    assert perplexity["taylor"] < perplexity["random"], perplexity
    assert perplexity["activation+refit"] < perplexity["l1"], perplexity


def test_taylor_importance_on_unlabelled_encoder_data_is_a_clear_error(trained, tmp_path):
    import dataclasses

    from torchslim.errors import InputError

    make, data = trained
    bundle = dataclasses.replace(make(), task="embedding")  # no labels and no next-token loss to take gradients of
    with pytest.raises(InputError, match="taylor needs a task loss .* use importance: activation"):
        _apply(_context(bundle, data, tmp_path), "prune", "channel", {"importance": "taylor"})


def test_a_causal_lm_recipe_runs_end_to_end_with_perplexity_and_decode_speed(trained, tmp_path):
    import json

    from torchslim.data import register_builtin_data
    from torchslim.pipeline import compress
    from torchslim.recipe import parse_recipe
    from torchslim.zoo import register_builtin_model

    make, data = trained
    register_builtin_model("tiny-test-lm")(make)
    register_builtin_data("tiny-test-cycle")(lambda seed=0: data)
    recipe = parse_recipe({"model": "builtin:tiny-test-lm", "data": "builtin:tiny-test-cycle", "steps": [
        {"prune": {"method": "wanda", "pattern": "4:8", "calibration": {"samples": 32, "batch_size": 16}}},
        {"quantize": {"method": "int8-weight"}}], "measure": {"batch_size": 8, "warmup": 1, "repeats": 3, "threads": 1}})
    report = compress(recipe, tmp_path / "out", progress=False, log=lambda *a: None)
    base, pruned, final = report["stages"]
    assert [s["metric"] for s in report["stages"]] == ["perplexity"] * 3
    assert base["score"] == pytest.approx(base["metrics"]["perplexity"]) and base["metrics"]["perplexity_ratio"] == 1
    assert final["ratios"]["score_ratio"] == pytest.approx(final["metrics"]["perplexity_ratio"], rel=1e-3)
    assert all(s["decode_tokens_per_s"] > 0 and s["generated_text"] for s in report["stages"])
    assert pruned["details"]["pattern"] == "4:8" and pruned["details"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert final["size_bytes_raw"] < base["size_bytes_raw"] / 2.5
    assert final["params"] == base["params"]  # packed weights count as the weights they stand for
    saved = json.loads((tmp_path / "out" / "model.weight_only.json").read_text())
    assert saved["format"] == "torchslim.weight-only/1" and len(saved["layers"]) == 2 * 4 + 2
    assert "perplexity +" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("kind, method, settings", [
    ("quantize", "int4-weight", {"algorithm": "gptq", "group_size": 32}),
    ("prune", "wanda", {"sparsity": 0.5})])
def test_a_calibration_set_too_small_is_a_clear_error(trained, tmp_path, kind, method, settings):
    from torchslim.errors import InputError

    make, data = trained
    context = _context(make(), data, tmp_path)
    with pytest.raises(InputError, match="calibration samples/tokens, fewer than the 64"):
        _apply(context, kind, method, {**settings, "calibration": {"samples": 2, "batch_size": 2}})
