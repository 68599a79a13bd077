"""Tests for the procedural agreement corpus and its checker (data_pipeline/grammar.py)."""

from __future__ import annotations

import math
import random

import pytest

from data_pipeline.grammar import (
    LEXICON,
    NUMBER_SWAP,
    VOCABULARY,
    AgreementResult,
    agreement_error_rate,
    check_agreement,
    generate_documents,
    split_sentences,
)

VOCAB_BOUND = 250  # keeps a tiny demo BPE tokenizer able to learn whole words


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return generate_documents(2000, seed=0)


@pytest.fixture(scope="module")
def sentences(documents: list[str]) -> list[str]:
    return [s for doc in documents for s in split_sentences(doc)]


def test_deterministic_in_seed_and_independent_of_global_rng() -> None:
    random.seed(1)
    first = generate_documents(50, seed=7)
    random.seed(2)
    before = random.getstate()
    assert generate_documents(50, seed=7) == first  # global seed does not matter
    assert random.getstate() == before  # ... and is not consumed
    assert generate_documents(50, seed=8) != first
    assert generate_documents(50) == generate_documents(50, seed=0)
    assert generate_documents(0) == []


def test_document_format(documents: list[str]) -> None:
    for doc in documents:
        parts = split_sentences(doc)
        assert 3 <= len(parts) <= 8
        assert all(p.endswith(" .") and p.count(".") == 1 for p in parts)
        assert " ".join(parts) == doc == " ".join(doc.split())  # single spaces, lossless split
        assert doc == doc.lower()


def test_every_generated_sentence_parses_and_agrees(
    documents: list[str], sentences: list[str]
) -> None:
    results = [check_agreement(s) for s in sentences]
    assert [s for s, r in zip(sentences, results, strict=True) if not r.parsed] == []
    assert [s for s, r in zip(sentences, results, strict=True) if not r.agrees] == []
    assert agreement_error_rate(documents) == (0.0, len(sentences))


def _swappable_positions(words: list[str]) -> list[int]:
    # Verbs and number-marked determiners; nouns are excluded because an object noun after
    # "the" is legitimately unconstrained.
    marked = {"VT", "VI", "COP", "DET"}
    return [i for i, w in enumerate(words) if w in NUMBER_SWAP and marked & set(LEXICON[w])]


def test_corrupting_any_verb_or_determiner_is_detected(sentences: list[str]) -> None:
    corrupted = 0
    for sentence in sentences[:2000]:
        words = sentence.split()
        positions = _swappable_positions(words)
        assert positions, sentence  # every sentence has at least its main verb
        for i in positions:
            bad = " ".join(words[:i] + [NUMBER_SWAP[words[i]]] + words[i + 1 :])
            result = check_agreement(bad)
            assert result.parsed, bad
            assert not result.agrees, bad
            assert result.distance == check_agreement(sentence).distance
            corrupted += 1
    assert corrupted > 3000


def test_mix_of_short_and_long_range_agreement(sentences: list[str]) -> None:
    distances = [check_agreement(s).distance for s in sentences]
    assert all(d is not None for d in distances)
    n = len(distances)
    short = sum(d == 0 for d in distances) / n
    long = sum(d >= 3 for d in distances) / n
    assert short > 0.3
    assert 0.25 < long < 0.7
    assert max(distances) >= 5


def test_pronoun_agreement_pairs_present(sentences: list[str]) -> None:
    openings = {tuple(s.split()[:2]) for s in sentences}
    expected = {
        ("i", "like"), ("she", "likes"), ("he", "likes"), ("it", "likes"), ("we", "like"),
        ("they", "like"), ("you", "like"), ("i", "am"), ("i", "was"), ("you", "were"),
        ("she", "is"),
    }  # fmt: skip
    assert expected <= openings
    assert not {("i", "likes"), ("she", "like"), ("i", "is"), ("i", "were")} & openings


@pytest.mark.parametrize(
    ("sentence", "parsed", "agrees", "distance"),
    [
        ("she likes tennis .", True, True, 0),
        ("she like tennis .", True, False, 0),
        ("I like tennis .", True, True, 0),
        ("i likes tennis", True, False, 0),
        ("i am happy .", True, True, 0),
        ("i is happy .", True, False, 0),
        ("i was happy .", True, True, 0),
        ("you was happy .", True, False, 0),
        ("we were in the garden .", True, True, 0),
        ("the dogs near the house run .", True, True, 3),
        ("the dogs near the house runs .", True, False, 3),
        ("the key to the cabinets is old .", True, True, 3),
        ("the key to the cabinets are old .", True, False, 3),
        ("the girl who the boys see likes tennis .", True, True, 4),
        ("the girl who the boys sees likes tennis .", True, False, 4),
        ("the dogs that chase the cat run .", True, True, 4),
        ("the dogs that chases the cat run .", True, False, 4),
        ("the boy who she sees sleeps .", True, True, 3),
        ("the boy who she see sleeps .", True, False, 3),
        ("she likes the dog that chase the cats .", True, False, 0),
        ("these dog runs .", True, False, 0),
        ("this dogs run .", True, False, 0),
        ("an old key is red .", True, True, 0),
        ("tennis likes the the .", False, False, None),
        ("the dog .", False, False, None),
        ("", False, False, None),
        ("she likes tennis tennis .", False, False, None),
        ("the dogs that the cat run .", False, False, None),
        ("she likes he .", False, False, None),
        ("the dogs near the house that sleep run .", False, False, None),
        ("she likes zebras .", False, False, None),
    ],
)
def test_check_agreement_examples(
    sentence: str, parsed: bool, agrees: bool, distance: int | None
) -> None:
    assert check_agreement(sentence) == AgreementResult(parsed, agrees, distance)


def test_agreement_error_rate_counts_only_parsed_sentences() -> None:
    texts = ["she likes tennis . she like tennis .", "tennis likes the the . the dogs run ."]
    rate, parsed = agreement_error_rate(texts)
    assert parsed == 3
    assert rate == pytest.approx(1 / 3)
    for nothing in ([], ["garbage words ."]):  # nothing parsed: no rate, never a perfect 0
        rate, parsed = agreement_error_rate(nothing)
        assert math.isnan(rate) and parsed == 0
    assert agreement_error_rate("she like tennis .") == (1.0, 1)  # a bare str is one text


def test_split_sentences() -> None:
    assert split_sentences("a b .  c d .\ne") == ["a b .", "c d .", "e"]
    assert split_sentences(". . x .") == ["x ."]
    assert split_sentences("tennis. is fun .") == ["tennis. is fun ."]  # attached dot: no split
    assert split_sentences("") == []


def test_vocabulary_bounded_and_fully_used(documents: list[str]) -> None:
    used = {w for doc in documents for w in doc.split()}
    assert 100 <= len(VOCABULARY) <= VOCAB_BOUND
    assert used <= VOCABULARY
    assert used == VOCABULARY  # no dead lexicon entries


def test_lexicon_is_unambiguous_and_swaps_stay_in_class() -> None:
    # Parsing is deterministic only while word classes that compete at one position are
    # disjoint; SUBJ and OBJ never compete.
    ambiguous = {w: set(c) for w, c in LEXICON.items() if len(c) > 1}
    assert ambiguous == {"you": {"SUBJ", "OBJ"}, "it": {"SUBJ", "OBJ"}}
    for word, swapped in NUMBER_SWAP.items():
        (cat,) = LEXICON[word]
        assert cat in LEXICON[swapped]
        assert LEXICON[word][cat] != LEXICON[swapped][cat]
