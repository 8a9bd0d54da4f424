import copy

import pytest
import yaml

from torchslim.defaults import DEMO_RECIPE
from torchslim.errors import InputError
from torchslim.recipe import apply_overrides, load_recipe, parse_recipe

from conftest import TINY_RECIPE


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_demo_recipe_parses_and_round_trips():
    recipe = parse_recipe(yaml.safe_load(DEMO_RECIPE), "demo")
    assert [s.name for s in recipe.steps] == ["prune:channel", "finetune:distill", "quantize:int8-static"]
    assert recipe.steps[0].config.ratio == 0.5 and recipe.steps[0].config.round_to == 8
    assert recipe.steps[1].config.distill.temperature == 4.0
    assert recipe.measure.batch_size == 256
    again = parse_recipe(recipe.to_dict(), "again")
    assert again.to_dict() == recipe.to_dict()


def test_example_demo_recipe_matches_the_embedded_default():
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "recipes" / "demo.yaml"
    assert load_recipe(example).to_dict() == parse_recipe(yaml.safe_load(DEMO_RECIPE)).to_dict()


def test_finetune_without_method_uses_the_default():
    raw = copy.deepcopy(TINY_RECIPE)
    recipe = parse_recipe(raw)
    assert recipe.steps[1].method == "distill"
    assert recipe.steps[1].config.optimizer.name == "adamw"
    assert recipe.steps[1].config.optimizer.lr == pytest.approx(0.003)


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed", "malformed YAML (line 1"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\ncolour: red\n", "colour: unknown key"),
    ("model: nope:thing\ndata: builtin:digits\n", "unknown model spec 'nope:thing' (known prefixes: builtin:, file:"),
    ("model: builtin:digits-cnn\ndata: where:else\n", "unknown data spec 'where:else' (known prefixes: builtin:"),
    ("model: builtin:nonexistent\ndata: builtin:digits\n", "unknown built-in model 'nonexistent'"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - prune: {method: magnitude, sparsity: 1.5}\n",
     "steps[0].prune.sparsity: must be in [0, 1), got 1.5"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - prune: {method: magnitude, sparsity: high}\n",
     "steps[0].prune.sparsity: expected float, got 'high'"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - prune: {method: nonsense}\n",
     "steps[0].prune.method: unknown prune method 'nonsense' (known: channel, magnitude"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - prune: {sparsity: 0.5}\n",
     "steps[0].prune.method: required"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - squash: {}\n",
     "steps[0]: unknown step kind 'squash'"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - finetune: {epochs: 2, optimiser: {}}\n",
     "steps[0].finetune.optimiser: unknown key"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - finetune: {distill: {alpha: 2}}\n",
     "steps[0].finetune.distill.alpha: must be in [0, 1], got 2"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - finetune: {epochs: true}\n",
     "steps[0].finetune.epochs: expected int, got True"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - quantize: {method: int8-static}\n"
     "  - finetune: {}\n", "steps[0].quantize: must be the last step"),
    ("model: builtin:digits-cnn\ndata: builtin:digits\nmeasure: {batch_size: 0}\n",
     "measure.batch_size: must be >= 1, got 0"),
    ("- just\n- a list\n", "a recipe must be a mapping"),
])
def test_bad_recipes_name_file_step_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as error:
        load_recipe(path)
    assert str(path) in str(error.value)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("step, message", [
    ("prune: {method: channel, ignore: ['*attn*']}", "steps[0].prune.ignore: was renamed to skip"),
    ("prune: {method: sparsegpt, damp: 0.1}", "steps[0].prune.damp: was renamed to damping"),
    ("quantize: {method: int4-weight, damp: 0.1}", "steps[0].quantize.damp: was renamed to damping"),
    ("prune: {method: channel, steps: 2, recover: {epochs: 1}}", "steps[0].prune.recover: was renamed to finetune"),
    ("share_weights: {finetune_centroids: false}", "steps[0].share_weights.finetune_centroids: was renamed to finetune"),
    ("prune: {method: channel, calibration_samples: 64}", "steps[0].prune.calibration_samples: was renamed to "
                                                          "calibration.samples"),
    ("prune: {method: wanda, batch_size: 4}", "steps[0].prune.batch_size: was renamed to calibration.batch_size"),
    ("quantize: {method: int8-static, calibration_batches: 2}", "steps[0].quantize.calibration_batches: was renamed "
                                                                "to calibration.samples (samples, not batches"),
    ("quantize: {method: qat, calibration_batch_size: 8}", "steps[0].quantize.calibration_batch_size: was renamed "
                                                           "to calibration.batch_size"),
    ("quantize: {method: int4-weight, calibration_batches: 2}", "steps[0].quantize.calibration_batches: was renamed"),
    ("compress_embeddings: {method: hashing, frequency_samples: 0}", "steps[0].compress_embeddings.frequency_samples: "
                                                                    "was renamed to calibration.samples"),
])
def test_old_spellings_name_the_new_word(tmp_path, step, message):
    path = write(tmp_path, f"model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - {step}\n")
    with pytest.raises(InputError) as error:
        load_recipe(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(InputError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_overrides_set_nested_fields_and_list_items():
    raw = apply_overrides(TINY_RECIPE, ["steps.0.prune.sparsity=0.7", "measure.batch_size=64", "seed=3"])
    recipe = parse_recipe(raw)
    assert recipe.steps[0].config.sparsity == pytest.approx(0.7)
    assert recipe.measure.batch_size == 64
    assert recipe.seed == 3
    assert TINY_RECIPE["steps"][0]["prune"]["sparsity"] == 0.5  # the original is not modified


@pytest.mark.parametrize("override, message", [
    ("steps.9.prune.sparsity=0.1", "no such list index"),
    ("measure", "expected key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(InputError, match=message):
        apply_overrides(TINY_RECIPE, [override])


def test_every_example_recipe_loads():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[1] / "examples" / "recipes").glob("*.yaml"))
    assert len(examples) >= 8
    for path in examples:
        recipe = load_recipe(path)
        assert recipe.steps, path.name


def test_a_calibration_mapping_overrides_only_the_keys_it_names_of_the_method_default():
    raw = {"model": "builtin:digits-cnn", "data": "builtin:digits", "steps": [
        {"prune": {"method": "channel", "importance": "activation", "calibration": {"samples": 512}}},
        {"prune": {"method": "wanda", "calibration": {"batch_size": 4}}},
        {"quantize": {"method": "int8-static", "calibration": {"split": "train"}}}]}
    channel, wanda, int8 = (step.config.calibration for step in parse_recipe(raw).steps)
    assert (channel.samples, channel.batch_size, channel.split) == (512, 32, "train")
    assert (wanda.samples, wanda.batch_size, wanda.split) == (128, 4, "calib")
    assert (int8.samples, int8.batch_size, int8.split) == (256, 32, "train")


def test_an_old_search_spelling_names_the_new_word(tmp_path):
    path = write(tmp_path, "model: builtin:digits-cnn\ndata: builtin:digits\nsearch: {sensitivity: {samples: 32}}\n")
    with pytest.raises(InputError, match=r"search\.sensitivity\.samples: was renamed to calibration\.samples"):
        load_recipe(path)
    path = write(tmp_path, "model: builtin:digits-cnn\ndata: builtin:digits\nsearch: {recovery: {epochs: 1}}\n")
    with pytest.raises(InputError, match=r"search\.recovery: was renamed to finetune"):
        load_recipe(path)


def test_every_problem_is_reported_at_once_with_did_you_mean(tmp_path):
    from torchslim.errors import RecipeError

    path = write(tmp_path, "model: torchvison:resnet18\ndata: builtin:digit\nsed: 3\nsteps:\n"
                           "  - prune: {method: magnitud}\n  - finetun: {}\n"
                           "  - quantize: {method: int8-static, observr: minmax, fallback_layers: -1}\n"
                           "measure: {batch_sise: 8, repeats: 0}\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    lines = str(error.value).splitlines()
    assert lines[0] == f"7 problems in {path}:" and len(lines) == 8 and error.value.problems == \
        [line.strip() for line in lines[1:]]
    expected = ["sed: unknown key, did you mean 'seed'?", "model: unknown model spec 'torchvison:resnet18', "
                "did you mean 'torchvision:'?", "data: unknown built-in data set 'digit', did you mean 'digits'?",
                "steps[0].prune.method: unknown prune method 'magnitud', did you mean 'magnitude'?",
                "steps[1]: unknown step kind 'finetun', did you mean 'finetune'?",
                "steps[2].quantize.observr: unknown key, did you mean 'observer'?",
                "measure.batch_sise: unknown key, did you mean 'batch_size'?"]
    for text in expected:
        assert sum(text in line for line in lines[1:]) == 1, text
    # range checks run once a config's keys are all known: they would only repeat the problem
    assert not any("fallback_layers: must" in line or "repeats: must" in line for line in lines)


def test_one_problem_stays_one_line(tmp_path):
    path = write(tmp_path, "model: builtin:digits-cnn\ndata: builtin:digits\nsteps:\n  - prune: {method: magnitude,"
                           " sparsity: 0.5, scop: local}\n")
    with pytest.raises(InputError) as error:
        load_recipe(path)
    assert str(error.value) == (f"{path}: steps[0].prune.scop: unknown key, did you mean 'scope'? "
                                f"(known: sparsity, scope, skip, pattern, version)")


def test_a_recipe_of_many_broken_steps_lists_twenty_problems_and_counts_the_rest():
    from torchslim.errors import RecipeError

    raw = {"model": "builtin:digits-cnn", "data": "builtin:digits", "steps": [{"squash": {}}] * 30}
    with pytest.raises(RecipeError) as error:
        parse_recipe(raw, "many.yaml")
    lines = str(error.value).splitlines()
    assert lines[0] == "30 problems in many.yaml:" and len(error.value.problems) == 30
    assert len(lines) == 22 and lines[-1] == "  ... and 10 more" and lines[20].startswith("  steps[19]: ")
