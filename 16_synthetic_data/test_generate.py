"""Tests for generate: the entropy rate against a hand-computed two-state chain and a Monte-Carlo
estimate from samples, the stationary distribution against numpy's eigenvector, fitted counts, noise
rates within their binomial error, hash splits that are deterministic and hit their fractions."""

import math

import numpy as np
import pytest

from generate import MarkovChain, add_noise, assign_splits, corrupt_ids, split_of


def binary_entropy(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


# ---------------------------------------------------------------------------------------------- Markov chain

def test_two_state_chain_hand_computed():
    # P = [[1-a, a], [b, 1-b]]: pi = (b, a) / (a + b), H = pi_0 h(a) + pi_1 h(b)
    a, b = 0.1, 0.4
    chain = MarkovChain("xy", 1, np.array([[1 - a, a], [b, 1 - b]]))
    np.testing.assert_allclose(chain.stationary_distribution(), [b / (a + b), a / (a + b)], atol=1e-12)
    expected = b / (a + b) * binary_entropy(a) + a / (a + b) * binary_entropy(b)
    assert chain.entropy_rate() == pytest.approx(expected, abs=1e-12)


def test_uniform_chain_has_entropy_log_k_and_deterministic_cycle_has_zero():
    assert MarkovChain("abcd", 2, np.full((16, 4), 0.25)).entropy_rate() == pytest.approx(math.log(4))
    cycle = MarkovChain("abc", 1, np.roll(np.eye(3), 1, axis=1))  # a -> b -> c -> a
    assert cycle.entropy_rate() == pytest.approx(0.0, abs=1e-12)
    assert cycle.sample_text(1, 7, seed=3)[0] in ("abcabca", "bcabcab", "cabcabc")


def test_stationary_distribution_matches_numpy_left_eigenvector():
    chain = MarkovChain.random("abcdefg", order=1, concentration=0.5, seed=1)
    values, vectors = np.linalg.eig(chain.transitions.T)
    reference = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    np.testing.assert_allclose(chain.stationary_distribution(), reference / reference.sum(), atol=1e-10)


def test_higher_order_stationary_is_invariant_under_the_state_transition():
    chain = MarkovChain.random("abc", order=3, concentration=0.3, seed=2)
    pi = chain.stationary_distribution()
    moved = np.bincount(chain.next_states().ravel(), weights=(pi[:, None] * chain.transitions).ravel(),
                        minlength=chain.num_states)
    np.testing.assert_allclose(moved, pi, atol=1e-12)
    assert pi.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("order, concentration", [(1, 0.2), (2, 1.0), (3, 0.5)])
def test_entropy_rate_equals_monte_carlo_estimate(order, concentration):
    chain = MarkovChain.random("abcde", order=order, concentration=concentration, seed=order)
    nll = chain.negative_log_likelihood(chain.sample_ids(400, 200, seed=5))  # (400, 200 - k)
    per_sequence = nll.mean(1)  # independent sequences: their means are i.i.d.
    standard_error = per_sequence.std(ddof=1) / math.sqrt(len(per_sequence))
    assert abs(per_sequence.mean() - chain.entropy_rate()) < 4 * standard_error


def test_conditional_entropies_match_empirical_block_frequencies():
    chain = MarkovChain.random("abc", order=2, concentration=0.4, seed=7)
    floor = chain.conditional_entropies(5)
    assert floor[0] > floor[1] > floor[2] - 1e-12 and floor[2] == pytest.approx(chain.entropy_rate())
    samples = chain.sample_ids(20000, 2, seed=8)  # stationary pairs: their entropy is H_2
    _, counts = np.unique(samples[:, 0] * 3 + samples[:, 1], return_counts=True)
    p = counts / counts.sum()
    empirical_h2 = -(p * np.log(p)).sum()
    assert empirical_h2 == pytest.approx(floor[0] + floor[1], abs=0.03)  # H_2 = H(X_0) + H(X_1 | X_0)


def test_fit_recovers_the_generating_chain():
    source = MarkovChain.random("abcd", order=2, concentration=1.0, seed=11)
    text = "".join(source.sample_text(100, 2000, seed=12))  # 99 junctions among 200,000 transitions
    fitted = MarkovChain.fit(text, order=2, alphabet="abcd", smoothing=0.01)
    np.testing.assert_allclose(fitted.transitions, source.transitions, atol=0.03)
    assert fitted.entropy_rate() == pytest.approx(source.entropy_rate(), abs=0.01)


def test_fit_counts_hand_example():
    chain = MarkovChain.fit("abab", order=1, smoothing=1.0)  # a->b twice, b->a once, with add-one
    np.testing.assert_allclose(chain.transitions, [[1 / 4, 3 / 4], [2 / 3, 1 / 3]])


def test_sampling_is_seeded_and_reproducible():
    chain = MarkovChain.random("abcdef", order=2, seed=0)
    np.testing.assert_array_equal(chain.sample_ids(3, 50, seed=4), chain.sample_ids(3, 50, seed=4))
    assert not np.array_equal(chain.sample_ids(3, 50, seed=4), chain.sample_ids(3, 50, seed=5))
    again = MarkovChain.random("abcdef", order=2, seed=0)
    np.testing.assert_array_equal(chain.transitions, again.transitions)


@pytest.mark.parametrize("build, name", [
    (lambda: MarkovChain("a", 1, np.ones((1, 1))), "alphabet"),
    (lambda: MarkovChain("ab", 0, np.full((1, 2), 0.5)), "order"),
    (lambda: MarkovChain("ab", 1, np.full((2, 2), 0.4)), "sum to 1"),
    (lambda: MarkovChain("ab", 1, np.full((3, 2), 0.5)), "transitions"),
    (lambda: MarkovChain.random("ab", concentration=float("nan")), "concentration"),
    (lambda: MarkovChain.fit("abc", order=2, smoothing=0.0), "smoothing"),
    (lambda: MarkovChain.random("ab").sample_ids(0, 5), "num_sequences"),
    (lambda: MarkovChain.random("ab", order=2).block_entropy(3), "length"),
    (lambda: MarkovChain.random("ab").conditional_entropies(0), "context_length"),
])
def test_bad_arguments_raise_value_error_naming_them(build, name):
    with pytest.raises(ValueError, match=name):
        build()


# ---------------------------------------------------------------------------------------------- noise

def test_noise_rate_within_binomial_error_and_substitutes_always_differ():
    ids = np.random.default_rng(0).integers(0, 10, size=50_000)
    rate = 0.1
    noisy = corrupt_ids(ids, rate, vocab_size=10, seed=1)
    changed = (noisy != ids).mean()
    assert abs(changed - rate) < 4 * math.sqrt(rate * (1 - rate) / ids.size)
    assert corrupt_ids(ids, 1.0, 10, seed=2).tolist() != ids.tolist()
    assert ((corrupt_ids(ids, 1.0, 10, seed=2) != ids).all())


def test_deletions_shorten_by_the_expected_amount():
    ids = np.zeros(40_000, dtype=np.int64)
    noisy = corrupt_ids(ids, 0.2, vocab_size=5, seed=3, deletion_fraction=0.5)  # 10% deleted, 10% substituted
    assert abs(1 - len(noisy) / len(ids) - 0.1) < 4 * math.sqrt(0.1 * 0.9 / ids.size)
    assert abs((noisy != 0).mean() - 0.1 / 0.9) < 0.01


def test_add_noise_is_reproducible_and_zero_rate_is_identity():
    text = "the quick brown fox jumps over the lazy dog"
    assert add_noise(text, 0.0) == text
    assert add_noise(text, 0.3, seed=4) == add_noise(text, 0.3, seed=4)
    assert set(add_noise(text, 0.5, seed=4)) <= set(text)


@pytest.mark.parametrize("kwargs, name", [({"rate": 1.5}, "rate"), ({"rate": float("nan")}, "rate"),
                                          ({"rate": 0.1, "deletion_fraction": -0.1}, "deletion_fraction"),
                                          ({"rate": 0.1, "vocab_size": 1}, "vocab_size")])
def test_noise_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        corrupt_ids(np.zeros(4, dtype=np.int64), **{"vocab_size": 4, **kwargs})


def test_deletion_needs_one_dimension():
    with pytest.raises(ValueError, match="deletion_fraction"):
        corrupt_ids(np.zeros((2, 3), dtype=np.int64), 0.5, 4, deletion_fraction=0.5)


# ---------------------------------------------------------------------------------------------- splits

def test_split_is_deterministic_and_independent_of_the_other_documents():
    documents = [f"document number {i}" for i in range(3000)]
    splits = assign_splits(documents)
    shuffled = assign_splits(documents[::-1])
    assert {documents[i]: name for name, idx in splits.items() for i in idx} == \
           {documents[::-1][i]: name for name, idx in shuffled.items() for i in idx}
    assert split_of("document number 7") == split_of("document number 7")
    assert split_of("document number 7", salt="x") in ("train", "val", "test")


def test_split_fractions_within_binomial_error():
    documents = [f"doc {i}" for i in range(20_000)]
    splits = assign_splits(documents, {"train": 0.7, "val": 0.2, "test": 0.1})
    for name, fraction in {"train": 0.7, "val": 0.2, "test": 0.1}.items():
        measured = len(splits[name]) / len(documents)
        assert abs(measured - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / len(documents))


def test_exact_duplicates_share_a_split():
    documents = [f"text {i % 50}" for i in range(500)]
    placed = {name: {documents[i] for i in idx} for name, idx in assign_splits(documents).items()}
    assert not (placed["train"] & placed["val"]) and not (placed["train"] & placed["test"])


@pytest.mark.parametrize("fractions, name", [({}, "fractions"), ({"a": 0.5, "b": 0.6}, "sum to 1"),
                                             ({"a": 1.5, "b": -0.5}, "fractions\\['a'\\]")])
def test_split_bad_fractions(fractions, name):
    with pytest.raises(ValueError, match=name):
        split_of("x", fractions)
