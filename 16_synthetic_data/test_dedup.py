"""Tests for dedup: shingles and exact Jaccard by hand, the MinHash estimate within its binomial error
of the exact Jaccard, the LSH candidate rate against the closed form 1 - (1 - s^r)^b, and planted
exact and near duplicates found with high precision and recall."""

import math
import random

import numpy as np
import pytest

from dedup import (MinHasher, deduplicate, estimated_jaccard, exact_duplicate_groups, jaccard,
                   lsh_candidate_pairs, lsh_candidate_probability, near_duplicate_groups, shingles)
from generate import MarkovChain, add_noise


def sets_with_jaccard(rng: np.random.Generator, size_union: int, similarity: float):
    """Two sets of 32-bit ids whose union has size_union elements and whose intersection is round(s * union)."""
    universe = rng.choice(1 << 32, size=size_union, replace=False).astype(np.uint64)
    shared = round(similarity * size_union)
    rest = universe[shared:]
    return np.concatenate([universe[:shared], rest[: len(rest) // 2]]), np.concatenate([universe[:shared], rest[len(rest) // 2:]])


def test_shingles_and_jaccard_by_hand():
    assert len(shingles("abcabc", size=3)) == 3  # abc, bca, cab
    assert len(shingles("ab", size=3)) == 1
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    assert jaccard([], []) == 1.0
    assert jaccard(shingles("hello world"), shingles("hello world")) == 1.0


@pytest.mark.parametrize("similarity", [0.1, 0.3, 0.5, 0.8, 0.95])
def test_minhash_estimate_within_binomial_error(similarity):
    rng = np.random.default_rng(int(similarity * 100))
    hasher = MinHasher(num_hashes=256, seed=1)
    errors = []
    for _ in range(20):
        a, b = sets_with_jaccard(rng, 400, similarity)
        exact = jaccard(a, b)
        errors.append(estimated_jaccard(hasher.signature(a), hasher.signature(b)) - exact)
    sigma = math.sqrt(similarity * (1 - similarity) / 256)
    assert max(abs(e) for e in errors) < 4 * sigma
    assert abs(np.mean(errors)) < 4 * sigma / math.sqrt(len(errors))  # unbiased


def test_minhash_identical_sets_agree_everywhere_and_disjoint_sets_rarely():
    hasher = MinHasher(64, seed=0)
    a = np.arange(100, dtype=np.uint64)
    assert estimated_jaccard(hasher.signature(a), hasher.signature(a[::-1])) == 1.0
    assert estimated_jaccard(hasher.signature(a), hasher.signature(a + 1000)) < 0.1


@pytest.mark.parametrize("bands, rows", [(16, 8), (32, 4), (8, 4)])
def test_lsh_candidate_rate_matches_closed_form(bands, rows):
    rng = np.random.default_rng(bands * rows)
    num_hashes = bands * rows
    for similarity in (0.3, 0.5, 0.7):
        pairs = [sets_with_jaccard(rng, 200, similarity) for _ in range(150)]
        hits = 0
        for trial, (a, b) in enumerate(pairs):  # a fresh hash family per pair: independent trials
            hasher = MinHasher(num_hashes, seed=trial)
            hits += bool(lsh_candidate_pairs(np.stack([hasher.signature(a), hasher.signature(b)]), bands, rows))
        expected = float(lsh_candidate_probability(similarity, bands, rows))
        # binomial error plus a small allowance for the hash family being only approximately min-wise independent
        assert abs(hits / len(pairs) - expected) < 4 * math.sqrt(expected * (1 - expected) / len(pairs)) + 0.02


def test_lsh_probability_closed_form_values():
    assert lsh_candidate_probability(1.0, 20, 5) == 1.0 and lsh_candidate_probability(0.0, 20, 5) == 0.0
    assert lsh_candidate_probability(0.5, 1, 1) == pytest.approx(0.5)
    assert lsh_candidate_probability(0.5, 2, 3) == pytest.approx(1 - (1 - 0.125) ** 2)


def planted_corpus(num_unique=200, num_planted=40, noise=0.03, seed=0):
    """Random 300-character documents and near copies of some of them; returns texts and the true pairs."""
    chain = MarkovChain.random("abcdefghijklmnop ", order=1, concentration=1.0, seed=seed)
    texts = chain.sample_text(num_unique, 300, seed=seed + 1)
    rng = random.Random(seed)
    truth = set()
    for k in range(num_planted):
        source = rng.randrange(num_unique)
        copy = texts[source] if k % 2 else add_noise(texts[source], noise, alphabet=chain.alphabet, seed=k)
        texts.append(copy)
        truth.add((source, len(texts) - 1))
    return texts, truth


def test_near_dedup_finds_planted_duplicates_with_high_precision_and_recall():
    texts, truth = planted_corpus()
    groups = near_duplicate_groups(texts, threshold=0.5, num_hashes=128, bands=32)
    found = {(i, j) for g in groups for i in g for j in g if i < j}
    true_pairs = {(min(p), max(p)) for p in truth}
    recall = len(true_pairs & found) / len(true_pairs)
    # a found pair is right when both members come from the same source document
    source = {j: i for i, j in truth}
    precision = np.mean([source.get(i, i) == source.get(j, j) for i, j in found])
    assert recall >= 0.95 and precision >= 0.95, (precision, recall)
    kept = deduplicate(texts, threshold=0.5)
    assert len(kept) == 200 - sum(1 for g in groups if min(g) >= 200) and all(i < 200 for i in kept)


def test_exact_dedup_finds_only_identical_copies():
    texts, truth = planted_corpus()
    exact = exact_duplicate_groups(texts)
    found = {(g[0], j) for g in exact for j in g[1:]}
    identical = {p for p in truth if texts[p[0]] == texts[p[1]]}
    assert identical <= {(i, j) for g in exact for i in g for j in g if i < j} and len(found) >= len(identical)
    assert len(deduplicate(texts, near=False)) == len(texts) - sum(len(g) - 1 for g in exact)


@pytest.mark.parametrize("build, name", [
    (lambda: shingles("abc", size=0), "size"),
    (lambda: MinHasher(0), "num_hashes"),
    (lambda: MinHasher(4).signature(np.array([], dtype=np.uint64)), "shingle_ids"),
    (lambda: MinHasher(4).signature(np.zeros((2, 2), dtype=np.uint64)), "shingle_ids"),
    (lambda: lsh_candidate_pairs(np.zeros((2, 8), dtype=np.uint64), 3, 4), "bands"),
    (lambda: lsh_candidate_probability(1.5, 4, 2), "similarity"),
    (lambda: near_duplicate_groups(["a", "b"], threshold=0.0), "threshold"),
    (lambda: near_duplicate_groups(["a", "b"], num_hashes=128, bands=24), "bands"),
    (lambda: estimated_jaccard(np.zeros(3), np.zeros(4)), "signatures"),
])
def test_bad_arguments_raise_value_error_naming_them(build, name):
    with pytest.raises(ValueError, match=name):
        build()
