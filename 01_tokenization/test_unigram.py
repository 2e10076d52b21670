"""Tests of unigram.py: a hand-worked Viterbi, exact equality with HF tokenizers' Unigram model on the same
pieces (unknown characters included), the E-step against brute-force enumeration of every segmentation,
compression of the trained vocabulary within 10% of HF's UnigramTrainer, round trips, and bad inputs."""

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data
from testing import require
from unigram import SPACE, Unigram, expected_counts, lattice, pre_tokenize, train_unigram

MULTILINGUAL = "Naïve café, déjà vu! Ελληνικά и русский.  東京は日本の首都です。\n x**2 = 1234567; it's"


def corpus() -> str:
    return data.pydoc_text()[:30_000] + MULTILINGUAL * 5


@pytest.fixture(scope="module")
def trained():
    pieces = train_unigram(corpus(), 500, seed_size=5_000)
    return pieces, Unigram(pieces)


@pytest.fixture(scope="module")
def hf_twin(trained):
    """HF's model on the same pieces, built once per module."""
    return hf_unigram(trained[0])


def hf_unigram(pieces):
    tokenizers = require("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.Unigram(pieces, unk_id=0, byte_fallback=False))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    return tokenizer


def test_viterbi_by_hand():
    """'ab': a + b scores -1 - 2 = -3, the piece ab -2.5: ab wins. 'abb': ab + b = -4.5 beats a + b + b = -5."""
    model = Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0), ("ab", -2.5)])
    assert model.viterbi("ab") == [("ab", 3)]
    assert model.viterbi("abb") == [("ab", 3), ("b", 2)]
    # unknown characters score min - 10 = -12.5 each, and neighbours fuse into one <unk>
    assert model.viterbi("xyab") == [("xy", 0), ("ab", 3)]


def test_pre_tokenize_matches_hf_metaspace():
    tokenizers = require("tokenizers")
    metaspace = tokenizers.pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    for text in [MULTILINGUAL, " lead", "a  b", "", "  ", "x ▁y"]:
        assert pre_tokenize(text) == [w for w, _ in metaspace.pre_tokenize_str(text)]


def test_identical_ids_to_hf_on_text(trained):
    pieces, model = trained
    text = corpus()[-5_000:] + MULTILINGUAL + " Zürich ☃☃ snowmen"
    assert model.encode(text) == hf_unigram(pieces).encode(text).ids


@settings(max_examples=200, deadline=None)
@given(word=st.text(alphabet=st.sampled_from(list("etaoinshrdlu▁xq1é東☃")), min_size=1, max_size=30))
def test_identical_pieces_to_hf_on_any_word(trained, hf_twin, word):
    pieces, model = trained
    reference = [(t.value, t.id) for t in hf_twin.model.tokenize(word)]
    assert model.viterbi(word) == reference


def test_expected_counts_equal_brute_force_enumeration():
    """E-step against the definition: sum over every segmentation of P(segmentation | word) x occurrences."""
    scores = {"a": math.log(0.3), "b": math.log(0.2), "ab": math.log(0.1), "ba": math.log(0.15), "aba": math.log(0.05)}
    words = Counter({"abab": 2, "aba": 1})
    expected = Counter()
    for word, frequency in words.items():
        segmentations = []
        for cuts in itertools.product([0, 1], repeat=len(word) - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [len(word)]
            parts = [word[s:e] for s, e in zip(bounds, bounds[1:])]
            if all(p in scores for p in parts):
                segmentations.append((parts, math.exp(sum(scores[p] for p in parts))))
        z = sum(p for _, p in segmentations)
        for parts, p in segmentations:
            for part in parts:
                expected[part] += frequency * p / z
    lattices = {word: lattice(word, scores, 3) for word in words}
    counts, log_likelihood = expected_counts(words, scores, lattices)
    assert set(counts) == set(expected)
    for piece in expected:
        assert counts[piece] == pytest.approx(expected[piece], rel=1e-12)


def test_trained_vocabulary_compresses_within_10_percent_of_hf():
    """Both trained on the same 40k characters of Shakespeare, vocabulary 500, scored on the next 20k."""
    tokenizers = require("tokenizers")
    text = data.load_corpus("auto")[0]
    train_text, heldout = text[:40_000], text[40_000:60_000]
    pieces = train_unigram(train_text, 500, seed_size=4_000)
    hf = tokenizers.Tokenizer(tokenizers.models.Unigram())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    hf.train_from_iterator([train_text], tokenizers.trainers.UnigramTrainer(
        vocab_size=500, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False))
    ours_tokens, hf_tokens = len(Unigram(pieces).encode(heldout)), len(hf.encode(heldout).ids)
    assert ours_tokens <= 1.10 * hf_tokens
    assert len(pieces) <= 500 and pieces[0] == ("<unk>", 0.0)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("etaoinshrdlu ,.\n'")), max_size=80))
def test_decode_inverts_encode(trained, text):
    """Exact for text whose characters are all pieces, except that a leading space is dropped (SentencePiece)."""
    _, model = trained
    assert model.decode(model.encode(text)) == (text[1:] if text.startswith(" ") else text)


@pytest.mark.parametrize("pieces, unk_id, error", [(None, 0, TypeError), ([("a", -1.0), ("", -2.0)], 0, TypeError),
                                                   ([("a", math.nan)], 0, ValueError), ([("a", -1.0)], 1, ValueError),
                                                   ([("a", -1.0)], True, ValueError)])
def test_bad_models_are_refused(pieces, unk_id, error):
    with pytest.raises(error, match="pieces|unk_id"):
        Unigram(pieces, unk_id)


@pytest.mark.parametrize("kwargs, match", [(dict(vocab_size=1), "vocab_size"), (dict(vocab_size=50.0), "vocab_size"),
                                           (dict(vocab_size=50, shrinking_factor=1.0), "shrinking_factor")])
def test_bad_training_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_unigram("some text", **kwargs)


@pytest.mark.parametrize("text", [None, b"bytes"])
def test_encode_refuses_what_is_not_a_str(trained, text):
    with pytest.raises(TypeError, match="text must be a str"):
        trained[1].encode(text)
