"""Tests of TF-IDF retrieval: scores == the formula computed by hand (numpy), a planted needle is found,
ties keep the pieces' order, the retrieved prompt keeps the key-value answer, clear errors."""

import math

import numpy as np
import pytest

from retrieval import TfidfRetriever, key_value_pieces, retrieval_prompt
from synthetic_tasks import KeyValueTask


def tfidf_by_hand(pieces: list[list[str]], query: list[str]) -> np.ndarray:
    """cos(tfidf(q), tfidf(d)) with tf = counts, idf = ln((1 + n) / (1 + df)) + 1, straight from the docstring."""
    terms = sorted({t for piece in pieces for t in piece})
    n = len(pieces)
    idf = np.array([math.log((1 + n) / (1 + sum(t in piece for piece in pieces))) + 1 for t in terms])

    def vector(words):
        v = np.array([words.count(t) for t in terms], dtype=float) * idf
        return v / (np.linalg.norm(v) or 1.0)

    return np.array([vector(piece) @ vector(query) for piece in pieces])


def test_scores_equal_the_formula_by_hand():
    pieces = ["the cat sat on the mat", "the dog sat", "a cat and a dog and a cat", "nothing here at all"]
    query = "cat on mat"
    retriever = TfidfRetriever(pieces, token_pattern=r"\w+")
    expected = tfidf_by_hand([p.split() for p in pieces], query.split())
    np.testing.assert_allclose(retriever.scores(query), expected, atol=1e-12)
    assert retriever.search(query, 2)[0][0] == 0  # the only piece with "on" and "mat"


def test_a_planted_needle_is_found_among_distractors():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(50)]
    pieces = [" ".join(rng.choice(words, 12)) for _ in range(200)]
    pieces[137] += " magicword"
    assert TfidfRetriever(pieces, token_pattern=r"\w+").search("where is the magicword", 1)[0][0] == 137


def test_ties_keep_the_order_of_the_pieces():
    retriever = TfidfRetriever(["x y", "y x", "z"], token_pattern=r"\w+")
    assert [i for i, _ in retriever.search("x", 3)] == [0, 1, 2]


@pytest.mark.parametrize("key_length", [1, 2])
def test_retrieval_prompt_keeps_the_answer(key_length):
    task = KeyValueTask(num_pairs=20, key_length=key_length, value_length=1)
    for example in task.examples(300, seed=key_length):
        short = retrieval_prompt(example.prompt)
        assert len(key_value_pieces(short)[0]) == 1
        assert task.solve(short) == example.answer


def test_a_value_that_spells_the_key_does_not_tie_with_the_key():
    assert retrieval_prompt("a:b,b:c,c:a|b=") == "b:c|b="
    assert retrieval_prompt("a:b,b:c,c:a|b=", k=2) in ("a:b,b:c|b=", "b:c,c:a|b=")


@pytest.mark.parametrize("call, argument", [
    (lambda: TfidfRetriever([]), "pieces"),
    (lambda: TfidfRetriever(["a b", 3]), "pieces"),
    (lambda: TfidfRetriever(["!!", "??"]), "token_pattern"),
    (lambda: TfidfRetriever(["ab cd"]).search("ab", 2), "k"),
    (lambda: TfidfRetriever(["ab cd"]).search("ab", 0), "k"),
    (lambda: TfidfRetriever(["ab cd"]).scores(None), "query"),
    (lambda: key_value_pieces("a:b,c:d"), "prompt"),
])
def test_bad_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
