"""Synthetic text whose true entropy is known, noise injection, and deterministic splits.

A language model's loss is a cross-entropy, and no model can beat the entropy of the source that
made the text. For real text that floor is unknown; for an order-k Markov chain it is a formula.
The chain reads the last k symbols (its state s) and draws the next symbol j with P[s, j]:

    stationary distribution   pi = pi T          (T moves state s to state (s * K + j) mod K^k with P[s, j])
    entropy rate              H = - sum_s pi_s sum_j P[s, j] log P[s, j]      (nats per symbol)

A model that sees t < k previous symbols has a higher floor, the conditional block entropy
H(X_t | X_<t) = H_{t+1} - H_t, where H_m is the entropy of m consecutive symbols (a marginal of pi).

Contents, in reading order:
  MarkovChain           random(), fit() to a text, stationary_distribution(), entropy_rate(),
                        conditional_entropies() (the floor per position), sample_ids(), sample_text(),
                        negative_log_likelihood() (the Monte-Carlo estimate of H from samples)
  corrupt_ids, add_noise    each symbol independently substituted or deleted with probability `rate`
  split_of, assign_splits   hash-based splits: a document lands in the same split on every run and machine

Checkable tasks (copy, reverse, addition, key-value lookup) are in synthetic_tasks.py, exact and
near-duplicate detection (MinHash, LSH) in dedup.py.
"""

import hashlib
import math

import numpy as np

DEFAULT_SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _entropy(probabilities: np.ndarray, axis=-1) -> np.ndarray:
    """-sum p log p in nats, with 0 log 0 = 0."""
    logs = np.log(np.where(probabilities > 0, probabilities, 1.0))
    return -(probabilities * logs).sum(axis=axis)


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# 1. A Markov chain of order k: text with a known entropy rate.
# ----------------------------------------------------------------------------------------------

class MarkovChain:
    """Order-k chain over `alphabet` (K symbols). The state is the last k symbols, oldest first, as a
    base-K number s = sum_i a_i K^(k-1-i); transitions[s, j] = P(next symbol j | state s), shape (K^k, K)."""

    def __init__(self, alphabet: str, order: int, transitions: np.ndarray):
        if len(alphabet) < 2 or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet must have >= 2 distinct characters, got {alphabet!r}")
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        transitions = np.asarray(transitions, dtype=np.float64)
        size = len(alphabet)
        if transitions.shape != (size ** order, size):
            raise ValueError(f"transitions must have shape (K^order, K) = {(size ** order, size)}, "
                             f"got {transitions.shape}")
        if not np.isfinite(transitions).all() or (transitions < 0).any():
            raise ValueError("transitions must be finite and >= 0")
        if not np.allclose(transitions.sum(1), 1.0, atol=1e-9):
            raise ValueError("every row of transitions must sum to 1")
        self.alphabet, self.order, self.transitions = alphabet, order, transitions
        self.vocab_size, self.num_states = size, size ** order
        self._stationary = None

    @classmethod
    def random(cls, alphabet: str, order: int = 1, concentration: float = 1.0, seed=0) -> "MarkovChain":
        """Each row drawn from a symmetric Dirichlet(concentration): small values give peaked rows (low
        entropy), large values rows close to uniform (entropy rate close to log K)."""
        if not (math.isfinite(concentration) and concentration > 0):
            raise ValueError(f"concentration must be a finite number > 0, got {concentration}")
        if len(alphabet) < 2:
            raise ValueError(f"alphabet must have >= 2 distinct characters, got {alphabet!r}")
        rows = _rng(seed).dirichlet(np.full(len(alphabet), concentration), size=len(alphabet) ** order)
        return cls(alphabet, order, rows)

    @classmethod
    def fit(cls, text: str, order: int, alphabet: str | None = None, smoothing: float = 0.1) -> "MarkovChain":
        """The order-k chain whose transitions are the (additively smoothed) counts of `text`."""
        alphabet = alphabet or "".join(sorted(set(text)))
        if not (math.isfinite(smoothing) and smoothing > 0):
            raise ValueError(f"smoothing must be a finite number > 0 (it keeps every transition possible), "
                             f"got {smoothing}")
        if not isinstance(order, int) or order < 1 or len(text) <= order:
            raise ValueError(f"order must be an integer in [1, len(text) - 1], got {order!r}")
        ids = _encode(text, alphabet)
        size = len(alphabet)
        states = _states_of(ids, order, size)[:-1]  # state before each symbol from position k on
        counts = np.bincount(states * size + ids[order:], minlength=size ** order * size)
        counts = counts.reshape(size ** order, size) + smoothing
        return cls(alphabet, order, counts / counts.sum(1, keepdims=True))

    def next_states(self) -> np.ndarray:
        """(S, K): the state after emitting symbol j from state s (drop the oldest symbol, append j)."""
        return (np.arange(self.num_states)[:, None] * self.vocab_size + np.arange(self.vocab_size)) % self.num_states

    def stationary_distribution(self, tolerance: float = 1e-14, max_iterations: int = 200_000) -> np.ndarray:
        """pi with pi T = pi, by power iteration from the uniform distribution; (S,)."""
        if self._stationary is None:
            targets, pi = self.next_states().ravel(), np.full(self.num_states, 1.0 / self.num_states)
            for _ in range(max_iterations):
                new = np.bincount(targets, weights=(pi[:, None] * self.transitions).ravel(), minlength=self.num_states)
                if np.abs(new - pi).sum() < tolerance:
                    break
                pi = new
            else:
                raise RuntimeError(f"power iteration did not converge in {max_iterations} iterations")
            self._stationary = new / new.sum()
        return self._stationary

    def entropy_rate(self) -> float:
        """H = -sum_s pi_s sum_j P[s, j] log P[s, j], nats per symbol: the loss floor given >= k symbols."""
        return float(self.stationary_distribution() @ _entropy(self.transitions))

    def block_entropy(self, length: int) -> float:
        """H_m: entropy (nats) of m consecutive symbols, for 0 <= m <= order (the last m digits of the state)."""
        if not 0 <= length <= self.order:
            raise ValueError(f"length must be in [0, {self.order}], got {length}")
        marginal = np.bincount(np.arange(self.num_states) % self.vocab_size ** length,
                               weights=self.stationary_distribution())
        return float(_entropy(marginal))

    def conditional_entropies(self, context_length: int) -> np.ndarray:
        """(T,): the best achievable expected loss at each position of a window of T symbols,
        H(X_t | X_0..X_{t-1}) = H_{t+1} - H_t for t < k, the entropy rate from t = k on."""
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        floor = np.full(context_length, self.entropy_rate())
        for t in range(min(self.order, context_length)):
            floor[t] = self.block_entropy(t + 1) - self.block_entropy(t)
        return floor

    def sample_ids(self, num_sequences: int, length: int, seed=0) -> np.ndarray:
        """(N, L) int64 symbol ids; each row starts in a state drawn from pi, so every window is stationary."""
        if num_sequences < 1 or length < 1:
            raise ValueError(f"num_sequences and length must be >= 1, got {num_sequences}, {length}")
        rng = _rng(seed)
        size, order = self.vocab_size, self.order
        states = rng.choice(self.num_states, size=num_sequences, p=self.stationary_distribution())
        out = np.empty((num_sequences, max(length, order)), dtype=np.int64)
        for i in range(order):  # the k symbols of the initial state, oldest first
            out[:, i] = states // size ** (order - 1 - i) % size
        cumulative = self.transitions.cumsum(1)  # (S, K)
        for t in range(order, length):
            u = rng.random(num_sequences)[:, None]
            symbols = np.minimum((u >= cumulative[states]).sum(1), size - 1)  # inverse-CDF draw, (N,)
            out[:, t] = symbols
            states = (states * size + symbols) % self.num_states
        return out[:, :length]

    def sample_text(self, num_sequences: int, length: int, seed=0) -> list[str]:
        return ["".join(self.alphabet[i] for i in row) for row in self.sample_ids(num_sequences, length, seed)]

    def negative_log_likelihood(self, ids: np.ndarray) -> np.ndarray:
        """(..., L - k): -log P(x_t | previous k symbols) for t >= k; its mean estimates the entropy rate."""
        ids = np.asarray(ids)
        if ids.shape[-1] <= self.order:
            raise ValueError(f"sequences must be longer than order = {self.order}, got length {ids.shape[-1]}")
        states = _states_of(ids, self.order, self.vocab_size)[..., :-1]
        return -np.log(self.transitions[states, ids[..., self.order:]])


def _encode(text: str, alphabet: str) -> np.ndarray:
    index = {ch: i for i, ch in enumerate(alphabet)}
    unknown = set(text) - index.keys()
    if unknown:
        raise ValueError(f"text has characters outside the alphabet: {sorted(unknown)[:10]}")
    return np.array([index[ch] for ch in text], dtype=np.int64)


def _states_of(ids: np.ndarray, order: int, size: int) -> np.ndarray:
    """(..., L - k + 1): the state (last k symbols as a base-K number) ending at each position >= k - 1."""
    length = ids.shape[-1]
    states = np.zeros(ids.shape[:-1] + (length - order + 1,), dtype=np.int64)
    for i in range(order):
        states = states * size + ids[..., i: length - order + 1 + i]
    return states


# ----------------------------------------------------------------------------------------------
# 2. Noise: each symbol independently corrupted with probability `rate`.
# ----------------------------------------------------------------------------------------------

def corrupt_ids(ids: np.ndarray, rate: float, vocab_size: int, seed=0, deletion_fraction: float = 0.0) -> np.ndarray:
    """Corrupt each id with probability `rate`: deleted with probability `deletion_fraction`, else replaced
    by a uniformly random *different* id. Substitution-only noise keeps the shape (any shape); deletions
    need a 1-D sequence."""
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if not (math.isfinite(deletion_fraction) and 0.0 <= deletion_fraction <= 1.0):
        raise ValueError(f"deletion_fraction must be in [0, 1], got {deletion_fraction}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 (a substitute must differ from the original), got {vocab_size}")
    ids = np.asarray(ids)
    if deletion_fraction > 0 and ids.ndim != 1:
        raise ValueError(f"deletion_fraction > 0 needs a 1-D sequence, got shape {ids.shape}")
    rng = _rng(seed)
    corrupted = rng.random(ids.shape) < rate
    deleted = corrupted & (rng.random(ids.shape) < deletion_fraction)
    shift = rng.integers(1, vocab_size, size=ids.shape)  # never 0 mod vocab_size: the symbol always changes
    noisy = np.where(corrupted & ~deleted, (ids + shift) % vocab_size, ids)
    return noisy[~deleted] if deletion_fraction > 0 else noisy


def add_noise(text: str, rate: float, alphabet: str | None = None, seed=0, deletion_fraction: float = 0.0) -> str:
    """Text version of corrupt_ids; substitutes come from `alphabet` (default: the characters of `text`)."""
    alphabet = alphabet or "".join(sorted(set(text)))
    if not text:
        return text
    noisy = corrupt_ids(_encode(text, alphabet), rate, len(alphabet), seed, deletion_fraction)
    return "".join(alphabet[i] for i in noisy)


# ----------------------------------------------------------------------------------------------
# 3. Deterministic splits: the hash of a document decides its split.
# ----------------------------------------------------------------------------------------------

def _check_fractions(fractions: dict) -> None:
    if not fractions:
        raise ValueError("fractions must name at least one split")
    for name, value in fractions.items():
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"fractions[{name!r}] must be in [0, 1], got {value}")
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {sum(fractions.values())}")


def split_of(document: str, fractions: dict = DEFAULT_SPLITS, salt: str = "") -> str:
    """The split of `document`: u = blake2b(salt + document) / 2^64 in [0, 1) falls into one cumulative
    fraction. It depends on the text alone, so identical documents always share a split."""
    _check_fractions(fractions)
    digest = hashlib.blake2b((salt + document).encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0 ** 64
    cumulative = 0.0
    for name, fraction in fractions.items():
        cumulative += fraction
        if u < cumulative:
            return name
    return name  # u within rounding of 1.0: the last split


def assign_splits(documents: list[str], fractions: dict = DEFAULT_SPLITS, salt: str = "") -> dict[str, list[int]]:
    """{split name: indices of the documents in it}, each document placed by split_of."""
    _check_fractions(fractions)
    splits = {name: [] for name in fractions}
    for index, document in enumerate(documents):
        splits[split_of(document, fractions, salt)].append(index)
    return splits
