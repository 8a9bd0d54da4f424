"""torchslim.apply / ApplyResult / torchslim.load, and the contract every registered method keeps.

The contract (parametrized from ``list_methods()``, so a newly registered method is tested by registering it):
applied from Python to the first of three small models it changes (a CNN, a transformer, an embedding-bag click
model), the result runs, saves through ``ApplyResult.save``, reloads through ``torchslim.load`` on a fresh
instance of the model class, and the reloaded model gives the same outputs. A method that changes none of the
three models fails the test: nothing passes vacuously.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import torchslim
from torchslim.errors import ArtifactError, InputError

from api_models import CASES, SmallCNN, click_case, cnn_case

# Settings that make a method act on models this small, or keep it quick; every other method runs its defaults.
CONTRACT_SETTINGS = {
    ("factorize", "svd"): {"rank_ratio": 0.5},  # at the default energy, random small layers keep full rank
    ("quantize", "int8-static"): {"runtime": "onnxruntime"},  # "auto" times two runtimes (a minute of compile)
}
# How far a reloaded model may differ from the one `apply` returned: the same tensors on the same kernels.
TOLERANCE = {"torch": 0.0, "onnxruntime": 0.0, "torchinductor": 1e-4}


def _changed(before: nn.Module, result) -> bool:
    """Whether the method did something: another runtime, or a tensor added, removed, reshaped or changed."""
    if result.runtime != "torch":
        return True
    old, new = before.state_dict(), result.model.state_dict()
    return set(old) != set(new) or any(old[k].shape != new[k].shape or not torch.equal(old[k], new[k]) for k in old)


def _call(model, inputs):
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


@pytest.fixture(scope="module")
def cases():
    return [make() for make in CASES]


@pytest.mark.parametrize("entry", torchslim.list_methods(), ids=lambda e: f"{e.kind}:{e.name}")
def test_every_method_applies_saves_and_reloads(entry, cases, tmp_path):
    config = entry.config_cls(**CONTRACT_SETTINGS.get((entry.kind, entry.name), {}))
    why = {}
    for case in cases:
        try:
            result = torchslim.apply(case.model, config, case.data, task=case.task)
        except InputError as error:  # e.g. "has no Linear layers to quantize": try the next model
            why[case.name] = str(error)
            continue
        if _changed(case.model, result):
            break
        why[case.name] = f"unchanged; skipped {result.skipped}"
    else:
        pytest.fail(f"{entry.kind}:{entry.name} changed none of the models ({why}): add a model it applies to "
                    f"(tests/api_models.py) or settings (CONTRACT_SETTINGS)")
    assert result.method == f"{entry.kind}:{entry.name}"
    with torch.inference_mode():
        expected = _call(result.deployable, case.inputs)
        reference = _call(case.model, case.inputs)
    assert expected.shape == reference.shape
    artifact = result.save(tmp_path / "artifact")
    assert artifact.is_file() and (tmp_path / "artifact" / "manifest.json").is_file()
    loaded = torchslim.load(tmp_path / "artifact", case.fresh())
    with torch.inference_mode():
        got = _call(loaded, case.inputs)
    assert (got - expected).abs().max().item() <= TOLERANCE[result.runtime]


def test_apply_leaves_the_model_as_given_unless_inplace():
    case = cnn_case()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    result = torchslim.apply(case.model, torchslim.MagnitudePruningConfig(sparsity=0.5), case.data)
    assert all(torch.equal(before[k], v) for k, v in case.model.state_dict().items())
    assert result.details["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (result.model.features[0].weight == 0).any()
    in_place = torchslim.apply(case.model, torchslim.MagnitudePruningConfig(sparsity=0.5), inplace=True,
                               example_inputs=case.inputs)
    assert in_place.model is case.model and (case.model.features[0].weight == 0).any()


def test_a_finetune_after_pruning_keeps_the_pruned_weights_at_zero():
    case = cnn_case()
    pruned = torchslim.apply(case.model, torchslim.MagnitudePruningConfig(sparsity=0.6), case.data)
    zeros = (pruned.model.features[0].weight == 0).sum().item()
    tuned = torchslim.apply(pruned, torchslim.FinetuneConfig(epochs=1), case.data)
    weight = tuned.model.features[0].weight
    assert (weight == 0).sum().item() == zeros
    assert not torch.equal(weight, case.model.features[0].weight)


def test_batches_may_be_tensors_pairs_or_mappings():
    case = cnn_case()
    images = [batch[0] for batch in case.data]
    config = torchslim.WandaConfig(sparsity=0.5)
    from_tensors = torchslim.apply(case.model, config, images)
    from_pairs = torchslim.apply(case.model, config, case.data)
    from_mappings = torchslim.apply(case.model, config, [{"x": batch} for batch in images])
    for other in (from_pairs, from_mappings):
        assert torch.equal(other.model.features[0].weight, from_tensors.model.features[0].weight)


def test_a_recipe_step_mapping_is_a_config():
    case = cnn_case()
    result = torchslim.apply(case.model, {"prune": {"method": "magnitude", "sparsity": 0.25}}, case.data)
    assert result.method == "prune:magnitude"
    assert result.details["sparsity"] == pytest.approx(0.25, abs=0.01)


def test_bad_configs_and_data_are_input_errors():
    case = cnn_case()
    with pytest.raises(InputError, match="not the config of a registered method"):
        torchslim.apply(case.model, object(), case.data)
    newer = dataclasses.replace(torchslim.MagnitudePruningConfig(), version=99)
    with pytest.raises(InputError, match="version 99 is newer than this torchslim reads"):
        torchslim.apply(case.model, newer, case.data)
    with pytest.raises(InputError, match=r"steps\[0\]\.prune\.version: .*newer"):
        torchslim.apply(case.model, {"prune": {"method": "magnitude", "version": 2}}, case.data)
    with pytest.raises(InputError, match="a batch must be a tensor"):
        torchslim.apply(case.model, torchslim.WandaConfig(), [("a", "b", "c")])
    with pytest.raises(InputError, match="example_inputs: required"):
        torchslim.apply(case.model, torchslim.MagnitudePruningConfig())


def test_a_newer_config_version_in_a_recipe_is_refused():
    from torchslim.recipe import parse_recipe

    raw = {"model": "builtin:digits-cnn", "data": "builtin:digits",
           "steps": [{"quantize": {"method": "int8-dynamic", "version": 2}}]}
    with pytest.raises(InputError, match=r"steps\[0\]\.quantize\.version: Int8DynamicConfig version 2 is newer"):
        parse_recipe(raw, "r.yaml")


def test_method_configs_are_exported_frozen_and_named_config():
    for entry in torchslim.list_methods():
        cls = entry.config_cls
        assert cls.__name__.endswith("Config") and getattr(torchslim, cls.__name__) is cls
        assert cls.__dataclass_params__.frozen
        assert isinstance(cls().version, int)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cls().version = 2


@pytest.mark.parametrize("old,new", [("ChannelPruning", "ChannelPruningConfig"), ("Int8Static", "Int8StaticConfig"),
                                     ("SvdFactorization", "SvdConfig"), ("WandaPruning", "WandaConfig")])
def test_old_config_names_still_resolve_with_a_deprecation_warning(old, new):
    with pytest.warns(DeprecationWarning, match=f"use torchslim.{new}"):
        assert getattr(torchslim, old) is getattr(torchslim, new)


def test_old_loaders_still_work_with_a_deprecation_warning(tmp_path):
    case = cnn_case()
    result = torchslim.apply(case.model, torchslim.ChannelPruningConfig(ratio=0.5), case.data)
    result.save(tmp_path / "pruned")
    with pytest.warns(DeprecationWarning, match=r"use torchslim.load\(path, model\)"):
        from torchslim.pruning.channel import load_pruned
    loaded = load_pruned(SmallCNN(), tmp_path / "pruned").eval()
    with torch.inference_mode():
        assert torch.equal(loaded(case.inputs), result.model(case.inputs))


def test_step_context_is_private_with_a_warning_alias():
    from torchslim._context import _StepContext

    with pytest.warns(DeprecationWarning, match="torchslim.apply"):
        from torchslim.pipeline import StepContext
    assert StepContext is _StepContext


def test_load_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(ArtifactError, match="no such file or folder"):
        torchslim.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="holds no torchslim artifact"):
        torchslim.load(tmp_path / "empty")
    case = cnn_case()
    torchslim.apply(case.model, torchslim.MagnitudePruningConfig(), case.data).save(tmp_path / "out")
    with pytest.raises(InputError, match="pass model="):
        torchslim.load(tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match="model.safetensors"):
        torchslim.load(tmp_path / "out", SmallCNN())


def test_load_reads_a_recipe_run_folder_without_a_model(tmp_path):
    recipe = torchslim.parse_recipe({"model": "builtin:digits-mlp", "data": "builtin:digits",
                                     "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5}}],
                                     "measure": {"repeats": 1, "warmup": 0, "max_eval_samples": 64}}, "r.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchslim.compress(recipe, tmp_path / "run", progress=False, log=lambda *a: None)
    loaded = torchslim.load(tmp_path / "run")
    weights = torch.cat([m.weight.flatten() for m in loaded.modules() if isinstance(m, nn.Linear)])
    assert (weights == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_a_transformers_model_takes_tokenizer_batches_and_reloads(tmp_path):
    transformers = pytest.importorskip("transformers")

    def build():
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, num_labels=3, max_position_embeddings=32)
        return transformers.BertForSequenceClassification(config).eval()

    model = build()
    ids = torch.randint(0, 200, (48, 12))
    batches = [{"input_ids": ids[i:i + 16], "attention_mask": torch.ones(16, 12, dtype=torch.long),
                "token_type_ids": torch.zeros(16, 12, dtype=torch.long), "labels": torch.randint(0, 3, (16,))}
               for i in range(0, 48, 16)]
    result = torchslim.apply(model, torchslim.WandaConfig(sparsity=0.5), batches)
    assert type(result.model) is type(model)  # the user's own class back, not torchslim's wrapper
    dense = result.model.bert.encoder.layer[0].intermediate.dense.weight
    assert (dense == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    result.save(tmp_path / "bert")
    fresh = build()
    with torch.no_grad():
        fresh.bert.encoder.layer[0].intermediate.dense.weight.fill_(1.0)
    loaded = torchslim.load(tmp_path / "bert", fresh)
    with torch.inference_mode():
        got, expected = loaded(input_ids=ids[:4]).logits, result.model(input_ids=ids[:4]).logits
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_int8_static_on_torchinductor_reloads_through_load_without_inputs(tmp_path):
    from torchslim.quant import pt2e_backend

    if pt2e_backend.available():
        pytest.skip(pt2e_backend.available())
    case = cnn_case()
    result = torchslim.apply(case.model, torchslim.Int8StaticConfig(runtime="torchinductor"), case.data)
    assert result.runtime == "torchinductor"
    expected = result.deployable(case.inputs)
    result.save(tmp_path / "int8")
    loaded = torchslim.load(tmp_path / "int8", case.fresh())  # input shapes come from the file
    assert (loaded(case.inputs) - expected).abs().max().item() <= TOLERANCE["torchinductor"]


def test_an_artifact_recording_a_renamed_calibration_key_still_loads(tmp_path):
    """Written before compress_embeddings' frequency_samples became calibration.samples: replay rebuilds the
    structure without it."""
    import json

    from torchslim.compact.embeddings import HashingConfig
    from torchslim.integrity import write_manifest

    case = click_case()
    result = torchslim.apply(case.model, HashingConfig(min_rows=1000), case.data, task=case.task)
    folder = tmp_path / "artifact"
    result.save(folder)
    shapes = folder / "model.shapes.json"
    raw = json.loads(shapes.read_text())
    (step,) = raw["replayed"]
    assert step["config"].pop("calibration")["samples"] == 0
    step["config"]["frequency_samples"] = 0
    shapes.write_text(json.dumps(raw))
    write_manifest(folder)
    loaded = torchslim.load(folder, case.fresh())
    with torch.inference_mode():
        assert torch.equal(_call(loaded, case.inputs), _call(result.deployable, case.inputs))
