"""Tests of wordpiece.py: a hand-worked example, exact equality with HF tokenizers' WordPiece model on the
same vocabulary, the likelihood gain against a brute-force recount, compression of the trained vocabulary
within 10% of HF's WordPieceTrainer, round trips, and bad inputs."""

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data
from testing import require
from wordpiece import WordPiece, merge_scores, pre_tokenize, train_wordpiece

MULTILINGUAL = "Naïve café, déjà vu! Ελληνικά и русский. 東京は日本の首都です。 x**2 = 1234567; it's ça_va."


def corpus() -> str:
    return data.pydoc_text()[:40_000] + MULTILINGUAL * 5


@pytest.fixture(scope="module")
def trained():
    vocab = train_wordpiece(corpus(), 600)
    return vocab, WordPiece(vocab)


@pytest.fixture(scope="module")
def hf_twin(trained):
    """HF's model on the same vocabulary, built once per module."""
    return hf_wordpiece(trained[0])


def hf_wordpiece(vocab: list[str]):
    tokenizers = require("tokenizers")
    model = tokenizers.models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                        max_input_chars_per_word=100)
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tokenizer


def test_greedy_longest_match_by_hand():
    """BERT's docstring example: 'unaffable' -> un ##aff ##able, although 'u' and '##n' exist too."""
    tokenizer = WordPiece(["[UNK]", "u", "un", "##n", "##a", "##aff", "##able", "##f", "##l", "##e", "##b"])
    assert tokenizer.tokenize_word("unaffable") == ["un", "##aff", "##able"]
    assert tokenizer.tokenize_word("unx") == ["[UNK]"]  # one unknown position makes the whole word unknown
    assert tokenizer.encode("un, unaffable") == [2, 0, 2, 5, 6]  # ',' is not in the vocabulary


def test_pre_tokenize_matches_hf_whitespace():
    tokenizers = require("tokenizers")
    reference = [w for w, _ in tokenizers.pre_tokenizers.Whitespace().pre_tokenize_str(MULTILINGUAL)]
    assert pre_tokenize(MULTILINGUAL) == reference


def test_identical_ids_to_hf_on_text(trained):
    vocab, tokenizer = trained
    text = corpus()[-5_000:] + MULTILINGUAL + " antidisestablishmentarianism " + "z" * 120
    assert tokenizer.encode(text) == hf_wordpiece(vocab).encode(text).ids


@settings(max_examples=200, deadline=None)
@given(word=st.text(alphabet=st.sampled_from(list("etaoinshrdlu_xq1é東")), min_size=1, max_size=30))
def test_identical_pieces_to_hf_on_any_word(trained, hf_twin, word):
    vocab, tokenizer = trained
    assert tokenizer.tokenize_word(word) == [t.value for t in hf_twin.model.tokenize(word)]


def test_the_likelihood_gain_equals_a_recount():
    """merge_scores against L = sum n_t log(n_t / N) computed before and after actually merging each pair."""
    words = Counter({"abc": 5, "abd": 3, "bcd": 2, "cab": 4})
    tokens = lambda ws: Counter(t for w, n in ws.items() for t in w for _ in range(n))  # noqa: E731

    def log_likelihood(segmented):
        counts = Counter()
        for pieces, n in segmented:
            for piece in pieces:
                counts[piece] += n
        total = sum(counts.values())
        return sum(c * math.log(c / total) for c in counts.values())

    start = [(list(w), n) for w, n in words.items()]
    single = tokens(words)
    pairs = Counter()
    for w, n in words.items():
        for pair in zip(w, w[1:]):
            pairs[pair] += n
    for (a, b), n_ab in pairs.items():
        merged = []
        for pieces, n in start:
            out, i = [], 0
            while i < len(pieces):
                if pieces[i:i + 2] == [a, b]:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            merged.append((out, n))
        exact = log_likelihood(merged) - log_likelihood(start)
        score = merge_scores(np.array([n_ab], float), np.array([single[a]], float), np.array([single[b]], float),
                             np.array([a == b]), float(sum(single.values())), "likelihood")
        assert score[0] == pytest.approx(exact, rel=1e-9, abs=1e-9)


def test_the_ratio_shortcut_merges_rare_pairs_first():
    """'qz' occurs once, 'th' 50 times: the ratio prefers qz (1/(1*1) = 1 > 50/(50*50)); likelihood prefers th."""
    text = "th " * 50 + "qz"
    assert train_wordpiece(text, 6, score="ratio")[-1] == "qz"  # [UNK], q, t, ##h, ##z, then one merge
    assert train_wordpiece(text, 6)[-1] == "th"


def test_trained_vocabulary_compresses_within_10_percent_of_hf():
    """Both trained on the same 100k characters of Shakespeare, vocabulary 800, scored on the next 20k."""
    tokenizers = require("tokenizers")
    text = data.load_corpus("auto")[0]
    train_text, heldout = text[:100_000], text[100_000:120_000]
    ours = WordPiece(train_wordpiece(train_text, 800))
    hf = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.train_from_iterator([train_text], tokenizers.trainers.WordPieceTrainer(
        vocab_size=800, special_tokens=["[UNK]"], show_progress=False))
    ours_tokens, hf_tokens = len(ours.encode(heldout)), len(hf.encode(heldout).ids)
    assert ours_tokens <= 1.10 * hf_tokens
    assert len(ours.vocab) == 800


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("etaoinshrdlu ,.\n'")), max_size=80))
def test_round_trip_up_to_spacing(trained, text):
    _, tokenizer = trained
    assert tokenizer.decode(tokenizer.encode(text)) == " ".join(pre_tokenize(text))


@pytest.mark.parametrize("vocab, match", [(None, "vocab must be"), (["a", ""], "vocab must be"),
                                          ({"a": 0}, "unk_token")])
def test_bad_vocabularies_are_refused(vocab, match):
    with pytest.raises((TypeError, ValueError), match=match):
        WordPiece(vocab)


@pytest.mark.parametrize("kwargs, match", [(dict(vocab_size=0), "vocab_size"), (dict(vocab_size=2.5), "vocab_size"),
                                           (dict(vocab_size=100, score="bpe"), "score must be one of")])
def test_bad_training_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_wordpiece("some text", **kwargs)


@pytest.mark.parametrize("text", [None, b"bytes"])
def test_encode_refuses_what_is_not_a_str(trained, text):
    with pytest.raises(TypeError, match="text must be a str"):
        trained[1].encode(text)
