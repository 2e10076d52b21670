"""Exact and near-duplicate detection: hashing, MinHash and locality-sensitive hashing (LSH).

Exact duplicates share a hash of their text. Near duplicates share most of their character n-grams
("shingles"); their similarity is the Jaccard index of the two shingle sets, J(A, B) = |A & B| / |A | B|.
MinHash estimates it without comparing sets: for a random hash h, P[min h(A) = min h(B)] = J(A, B), so
with n independent hashes the fraction of equal minima is an unbiased estimate with standard error
sqrt(J (1 - J) / n). LSH finds the similar pairs without comparing all N^2 of them: cut each signature
into b bands of r rows and call two documents candidates when any band is identical:

    P(candidate | similarity s) = 1 - (1 - s^r)^b          (an S-curve with its steep part near (1/b)^(1/r))

Contents: shingles, jaccard, mix64, MinHasher (signatures), estimated_jaccard, lsh_candidate_probability,
lsh_buckets, lsh_candidate_pairs, exact_duplicate_groups, near_duplicate_groups, deduplicate.
"""

import hashlib
import zlib

import numpy as np

MASK_64 = (1 << 64) - 1


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of 64-bit integers in which every input bit moves every output bit.
    (A linear hash (a x + b) mod p with small a keeps the order of small x and so correlates the minima.)"""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # wraps mod 2^64, as intended
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingles(text: str, size: int = 5) -> np.ndarray:
    """The distinct character n-grams of `text`, each hashed to a 32-bit integer (CRC-32); sorted uint64.
    A text shorter than `size` is one shingle."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    data = text.encode("utf-8")
    grams = {data[i: i + size] for i in range(max(1, len(data) - size + 1))}
    return np.unique(np.fromiter((zlib.crc32(g) for g in grams), dtype=np.uint64, count=len(grams)))


def jaccard(a, b) -> float:
    """Exact Jaccard index |A & B| / |A | B| of two collections (1.0 for two empty ones)."""
    a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    union = len(a | b)
    return len(a & b) / union if union else 1.0


class MinHasher:
    """n hash functions h_i(x) = mix64(x XOR key_i) with random 64-bit keys; signature[i] = min of h_i."""

    def __init__(self, num_hashes: int = 128, seed: int = 0):
        if num_hashes < 1:
            raise ValueError(f"num_hashes must be >= 1, got {num_hashes}")
        self.num_hashes = num_hashes
        self.keys = np.random.default_rng(seed).integers(0, MASK_64, size=num_hashes, dtype=np.uint64, endpoint=True)

    def signature(self, shingle_ids: np.ndarray) -> np.ndarray:
        """(n,) uint64 signature of one set of (up to 64-bit) integer shingle ids."""
        x = np.asarray(shingle_ids, dtype=np.uint64)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"shingle_ids must be a non-empty 1-D array, got shape {x.shape}")
        return mix64(x[:, None] ^ self.keys).min(axis=0)  # (m, n) -> (n,)

    def signatures(self, texts: list[str], shingle_size: int = 5) -> np.ndarray:
        """(N, n) signatures of the shingle sets of `texts`."""
        return np.stack([self.signature(shingles(text, shingle_size)) for text in texts])


def estimated_jaccard(signature_a: np.ndarray, signature_b: np.ndarray) -> float:
    """Fraction of equal signature entries: the MinHash estimate of J(A, B)."""
    if signature_a.shape != signature_b.shape:
        raise ValueError(f"signatures must have the same shape, got {signature_a.shape} and {signature_b.shape}")
    return float(np.mean(signature_a == signature_b))


def _check_bands(num_hashes: int, bands: int, rows: int) -> None:
    if bands < 1 or rows < 1 or bands * rows > num_hashes:
        raise ValueError(f"bands and rows must be >= 1 with bands * rows <= num_hashes ({num_hashes}), "
                         f"got bands={bands}, rows={rows}")


def lsh_candidate_probability(similarity, bands: int, rows: int):
    """Closed form 1 - (1 - s^r)^b: the chance that two documents of Jaccard s share at least one band."""
    _check_bands(bands * rows, bands, rows)
    s = np.asarray(similarity, dtype=np.float64)
    if ((s < 0) | (s > 1) | ~np.isfinite(s)).any():
        raise ValueError(f"similarity must be in [0, 1], got {similarity}")
    return 1.0 - (1.0 - s ** rows) ** bands


def lsh_buckets(signatures: np.ndarray, bands: int, rows: int):
    """Yield, band by band, every bucket of >= 2 documents whose signatures agree on all rows of that band."""
    num_docs, num_hashes = signatures.shape
    _check_bands(num_hashes, bands, rows)
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        block = np.ascontiguousarray(signatures[:, band * rows: (band + 1) * rows])  # (N, r)
        for index in range(num_docs):
            buckets.setdefault(block[index].tobytes(), []).append(index)
        yield from (members for members in buckets.values() if len(members) > 1)


def lsh_candidate_pairs(signatures: np.ndarray, bands: int, rows: int) -> set[tuple[int, int]]:
    """Pairs (i, j), i < j, whose signatures agree on every row of at least one band."""
    pairs = set()
    for members in lsh_buckets(signatures, bands, rows):
        pairs.update((members[i], other) for i in range(len(members)) for other in members[i + 1:])
    return pairs


def _groups_from_pairs(num_docs: int, pairs) -> list[list[int]]:
    """Connected components (union-find) of size >= 2, each sorted, listed by their first member."""
    parent = list(range(num_docs))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(j)] = root(i)
    components: dict[int, list[int]] = {}
    for i in range(num_docs):
        components.setdefault(root(i), []).append(i)
    return sorted((c for c in components.values() if len(c) > 1), key=lambda c: c[0])


def exact_duplicate_groups(texts: list[str]) -> list[list[int]]:
    """Groups of indices whose texts are byte-for-byte identical (SHA-256 of the UTF-8 text)."""
    by_hash: dict[bytes, list[int]] = {}
    for index, text in enumerate(texts):
        by_hash.setdefault(hashlib.sha256(text.encode("utf-8")).digest(), []).append(index)
    return [group for group in by_hash.values() if len(group) > 1]


def near_duplicate_groups(texts: list[str], threshold: float = 0.5, num_hashes: int = 128, bands: int = 32,
                          shingle_size: int = 5, seed: int = 0) -> list[list[int]]:
    """Groups of near duplicates: LSH candidates (bands x rows = num_hashes) kept when their MinHash
    estimate of Jaccard is >= threshold, joined transitively."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if bands < 1 or num_hashes % bands:
        raise ValueError(f"bands must be >= 1 and divide num_hashes ({num_hashes}), got {bands}")
    signatures = MinHasher(num_hashes, seed).signatures(texts, shingle_size)  # (N, n)
    # Each bucket's members are checked against its first member only: linear in the bucket size, where
    # all pairs would be quadratic (a bucket of 200 copies holds 19,900 pairs). Groups join transitively.
    verified = [(members[0], other) for members in lsh_buckets(signatures, bands, num_hashes // bands)
                for other in members[1:] if estimated_jaccard(signatures[members[0]], signatures[other]) >= threshold]
    return _groups_from_pairs(len(texts), verified)


def deduplicate(texts: list[str], near: bool = True, **near_settings) -> list[int]:
    """Indices of the documents to keep: the first of every duplicate group and every unique document.
    near=False removes exact duplicates only; near=True also near duplicates (near_duplicate_groups)."""
    groups = near_duplicate_groups(texts, **near_settings) if near else exact_duplicate_groups(texts)
    dropped = {index for group in groups for index in group[1:]}
    return [index for index in range(len(texts)) if index not in dropped]
