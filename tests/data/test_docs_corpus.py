"""builtin:docs: how paragraphs become passages, and which passages count as prose."""

from __future__ import annotations

import pytest

from torchslim.data.docs import PASSAGE_WORDS, _is_prose, _passages


def test_long_paragraphs_are_cut_at_sentence_ends_into_bounded_passages():
    sentence = "The parser reads one line at a time and returns the parsed value to its caller."  # 16 words
    paragraph = " ".join([sentence] * 12)
    passages = _passages(paragraph)
    assert len(passages) == 3 and all(len(p.split()) <= PASSAGE_WORDS for p in passages)
    assert [len(p.split()) for p in passages] == [80, 80, 32]
    assert " ".join(passages) == paragraph  # nothing lost, nothing reordered


def test_a_sentence_longer_than_a_passage_stays_whole():
    long_sentence = " ".join(["word"] * (PASSAGE_WORDS + 10)) + "."
    assert _passages(long_sentence) == [long_sentence]


@pytest.mark.parametrize("text, prose", [
    ("Return the number of items in the container.", True),
    (">>> len([1, 2, 3]) returns the number of items", False),  # doctest
    ("x = f(a, b) + g(c) * 2 ** n - 1", False),  # mostly symbols
    ("Too short.", False),
])
def test_prose_filter(text, prose):
    assert _is_prose(text) is prose
