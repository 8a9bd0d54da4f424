"""Property-based fuzzing (hypothesis) of the recipe parser and every artifact reader.

Goals (issue 16): no traceback, no silent load of a damaged file, only InputError (exit 2) on bad input. The
default cases take seconds; ``-m slow`` runs many more of the same properties.
"""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchslim._fuzz import KINDS, READERS, Pristine, damage
from torchslim.defaults import DEMO_RECIPE
from torchslim.errors import ArtifactError, InputError
from torchslim.recipe import Recipe, load_recipe, load_yaml, parse_recipe

# The default suite draws the same cases every run (derandomize), so CI is repeatable; `-m slow` explores.
QUICK = settings(max_examples=15, deadline=None, database=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@functools.cache
def pristine(reader: str) -> Pristine:
    return Pristine(READERS[reader])


def _damaged_is_refused(reader: str, data) -> None:
    files = READERS[reader].files
    name = data.draw(st.sampled_from(files), label="file")
    kind = data.draw(st.sampled_from(KINDS), label="damage")
    seed = data.draw(st.integers(0, 2 ** 32), label="seed")
    outcome, message = pristine(reader).case(name, kind, random.Random(seed), verify=True)
    assert outcome == "rejected", (name, kind, outcome, message)
    assert name in message or "manifest.json" in message, message


def _unverified_never_crashes(reader: str, data) -> None:
    files = [f for f in READERS[reader].files if f != "manifest.json"]
    name = data.draw(st.sampled_from(files), label="file")
    kind = data.draw(st.sampled_from(KINDS), label="damage")
    seed = data.draw(st.integers(0, 2 ** 32), label="seed")
    outcome, message = pristine(reader).case(name, kind, random.Random(seed), verify=False)
    assert outcome != "crash", (name, kind, message)
    if kind in ("truncate", "append") and not name.endswith(".onnx"):
        # Framing is checked without the manifest too. A crafted file re-frames itself (lengths, CRCs), so a
        # renamed tensor or a changed value can pass unseen without the manifest, exactly like a flipped weight.
        assert outcome in ("rejected", "loaded-identical"), (name, kind, outcome)


@pytest.mark.parametrize("reader", sorted(READERS))
@QUICK
@given(data=st.data())
def test_a_damaged_artifact_is_refused_naming_the_file(reader, data):
    _damaged_is_refused(reader, data)


@pytest.mark.parametrize("reader", sorted(READERS))
@QUICK
@given(data=st.data())
def test_without_the_manifest_damage_is_refused_or_harmless_never_a_crash(reader, data):
    _unverified_never_crashes(reader, data)


@pytest.mark.slow
@pytest.mark.parametrize("reader", sorted(READERS))
@LONG
@given(data=st.data())
def test_long_fuzz_of_every_reader(reader, data):
    _damaged_is_refused(reader, data)
    _unverified_never_crashes(reader, data)


def test_every_reader_rejects_each_kind_of_damage_with_an_artifact_error():
    rng = random.Random(0)
    for reader in READERS:
        for name in READERS[reader].files:
            for kind in KINDS:
                outcome, message = pristine(reader).case(name, kind, rng)
                assert outcome == "rejected", (reader, name, kind, message)
    compact = pristine("compact")
    with pytest.raises(ArtifactError, match="section 'header' is malformed"):  # a valid CRC, a crafted header
        from torchslim.compact.artifact import decode_artifact

        decode_artifact(damage(compact.files["model.tslim"], "model.tslim", "craft", random.Random(3)))


# -- the recipe parser ----------------------------------------------------------------------------------------
def _assert_one_error(message: str, source: str) -> None:
    """One line naming ``source``, or (several problems) a summary line naming it and one short line each."""
    lines = message.splitlines()
    if len(lines) == 1:
        assert message.startswith(source) and len(message) < 1000, message[:300]
        return
    assert lines[0] == f"{len(lines) - 1} problems in {source}:" or lines[0].endswith(f"problems in {source}:")
    assert len(lines) <= 22 and all(line.startswith("  ") and len(line) < 1000 for line in lines[1:]), message[:300]


def _parses_or_input_error(text: str):
    try:
        raw = load_yaml(text, "fuzz.yaml")
        return parse_recipe(raw, "fuzz.yaml")
    except InputError as error:
        _assert_one_error(str(error), "fuzz.yaml")
        return None


@QUICK
@given(text=st.text(max_size=300))
def test_any_text_is_a_recipe_or_one_input_error(text):
    result = _parses_or_input_error(text)
    assert result is None or isinstance(result, Recipe)


@QUICK
@given(data=st.data())
def test_a_damaged_demo_recipe_is_a_recipe_or_one_input_error(data, tmp_path_factory):
    kind = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    damaged = damage(DEMO_RECIPE.encode(), "recipe.yaml", kind, random.Random(data.draw(st.integers(0, 2 ** 32))))
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_bytes(damaged)
    try:
        assert isinstance(load_recipe(path), Recipe)
    except InputError as error:
        _assert_one_error(str(error).strip(), str(path))


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=20)
    | st.sampled_from(["builtin:digits-cnn", "builtin:digits", "magnitude", "channel", "int8-static"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["prune", "finetune", "quantize", "method", "sparsity", "ratio", "epochs", "batch_size",
                         "optimizer", "lr", "distill", "teacher", "skip", "threads", "measure", "x"]), inner,
        max_size=4),
    max_leaves=12)


@QUICK
@given(steps=_VALUES, measure=_VALUES, seed=_VALUES)
def test_arbitrary_recipe_structures_are_validated_or_refused(steps, measure, seed):
    raw = {"model": "builtin:digits-cnn", "data": "builtin:digits", "steps": steps, "measure": measure, "seed": seed}
    try:
        assert isinstance(parse_recipe(raw, "fuzz.yaml"), Recipe)
    except InputError as error:
        _assert_one_error(str(error), "fuzz.yaml")
