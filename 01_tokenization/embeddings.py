"""Token embeddings: one-hot vectors versus vectors learned from text.

One-hot: token i -> e_i, the i-th unit vector of R^V. Distinct tokens are orthogonal, so every pair
has cosine similarity exactly 0: the representation cannot say that ' king' is closer to ' queen'
than to ' the'. Learned: a table E of shape (V, D) with D << V, trained inside a model that predicts
the surrounding tokens. Tokens that occur in similar contexts end up with similar rows, measured by

    cos(u, v) = u . v / (|u| |v|)

A lookup E[i] equals the product e_i^T E: an embedding layer is a linear map applied to the one-hot
vector, stored as a table because multiplying by a one-hot vector only selects a row.

Contents: one_hot, cosine_similarity_matrix, nearest_neighbours, group_cosine (mean cosine within and
between groups of related tokens), and the skip-gram model of word2vec (SkipGram, skipgram_loss,
noise_distribution, skipgram_batch) whose embedding table the demo trains on BPE tokens.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def one_hot(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """One-hot float vectors of ids: shape ids.shape + (vocab_size,)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    _check_ids(ids, vocab_size)
    return F.one_hot(ids.long(), vocab_size).float()


def _check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Integer token ids in [0, vocab_size); float ids are refused rather than truncated (2.7 -> 2)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids must be in [0, {vocab_size}), got values in [{ids.min()}, {ids.max()}]")


def cosine_similarity_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """cos(v_i, v_j) for every pair of rows of vectors (N, D): an (N, N) matrix (a zero row gives 0)."""
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be a 2-D tensor (N, D), got shape {tuple(vectors.shape)}")
    unit = F.normalize(vectors.float(), dim=1)  # (N, D), rows of length 1
    return unit @ unit.T  # (N, N)


def nearest_neighbours(embeddings: torch.Tensor, query_id: int, k: int = 5) -> list[tuple[int, float]]:
    """The k rows most cosine-similar to row query_id (itself excluded), as [(id, cosine), ...] best first."""
    vocab_size = embeddings.shape[0]
    if not 0 <= query_id < vocab_size:
        raise ValueError(f"query_id must be in [0, {vocab_size}), got {query_id}")
    if not 1 <= k < vocab_size:
        raise ValueError(f"k must be in [1, {vocab_size - 1}], got {k}")
    unit = F.normalize(embeddings.detach().float(), dim=1)  # (V, D)
    similarity = unit @ unit[query_id]  # (V,)
    similarity[query_id] = -float("inf")
    values, ids = similarity.topk(k)
    return [(int(i), float(v)) for i, v in zip(ids, values)]


def group_cosine(embeddings: torch.Tensor, groups: list[list[int]]) -> tuple[float, float]:
    """(mean cosine over pairs of tokens in the same group, mean over pairs in different groups).

    A representation that captures meaning scores within >> between for groups of related tokens
    (pronouns, titles, modal verbs); one-hot scores 0 and 0.
    """
    if len(groups) < 2 or any(len(group) < 2 for group in groups):
        raise ValueError(f"groups must be at least 2 groups of at least 2 ids each, got sizes {[len(g) for g in groups]}")
    ids = [i for group in groups for i in group]
    labels = torch.tensor([g for g, group in enumerate(groups) for _ in group])
    similarity = cosine_similarity_matrix(embeddings.detach()[ids])  # (N, N)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(ids), dtype=torch.bool)
    return float(similarity[same & off_diagonal].mean()), float(similarity[~same].mean())


class SkipGram(nn.Module):
    """word2vec's skip-gram with negative sampling (Mikolov et al., 2013), over token ids.

    Each token has an input vector u (the embedding we keep) and an output vector v. For a centre
    token c, a context token o seen within `window` positions of it, and K noise tokens n_k drawn from
    the unigram distribution raised to the power 3/4:

        loss = -log sigma(u_c . v_o) - sum_k log sigma(-u_c . v_(n_k))

    Tokens that share contexts get input vectors pointing the same way. No softmax over the vocabulary,
    so a step costs O(B (K + 1) D), not O(B V D) like a next-token model's output layer.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 64):
        super().__init__()
        for name, value in [("vocab_size", vocab_size), ("embed_dim", embed_dim)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.embedding = nn.Embedding(vocab_size, embed_dim)  # u
        self.context = nn.Embedding(vocab_size, embed_dim)  # v
        for table in (self.embedding, self.context):  # scores u . v start near 0, of order 1/sqrt(D)
            nn.init.normal_(table.weight, std=embed_dim ** -0.5)

    def forward(self, centers: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores u_c . v_x of each centre (B,) with its candidates (B, 1 + K): shape (B, 1 + K)."""
        return (self.embedding(centers)[:, None, :] * self.context(candidates)).sum(-1)


def skipgram_loss(model: SkipGram, centers: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Negative-sampling loss, batch mean; candidates[:, 0] is the true context, the rest are noise.
    Has the (model, x, y) signature of training.train's loss_fn."""
    scores = model(centers, candidates)  # (B, 1 + K)
    return -(F.logsigmoid(scores[:, 0]) + F.logsigmoid(-scores[:, 1:]).sum(1)).mean()


def noise_distribution(ids: torch.Tensor, vocab_size: int, power: float = 0.75) -> torch.Tensor:
    """P(token) proportional to count(token) ** power: word2vec's choice of 3/4 samples rare tokens more
    often than their frequency."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if ids.numel() == 0:  # no counts: every probability would be 0 / 0
        raise ValueError("ids must hold at least one token id, got an empty tensor")
    _check_ids(ids, vocab_size)  # an id >= vocab_size would lengthen the distribution past V
    if not math.isfinite(power):
        raise ValueError(f"power must be a finite number, got {power}")
    counts = torch.bincount(ids.flatten().long(), minlength=vocab_size).double()
    weights = counts ** power
    return (weights / weights.sum()).float()  # (V,)


def skipgram_batch(ids: torch.Tensor, batch_size: int, window: int, noise: torch.Tensor, num_negatives: int = 5,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
    """Random (centre, [context, noise...]) examples from the 1-D id sequence: (B,) and (B, 1 + K).

    The context is ids[i + offset] with offset uniform in [-window, -1] U [1, window].
    """
    if not 1 <= window < len(ids) // 2:
        raise ValueError(f"window must be in [1, {len(ids) // 2 - 1}] for {len(ids)} ids, got {window}")
    if batch_size < 1 or num_negatives < 0:
        raise ValueError(f"batch_size must be >= 1 and num_negatives >= 0, got {batch_size}, {num_negatives}")
    positions = torch.randint(window, len(ids) - window, (batch_size,), generator=generator)
    distance = torch.randint(1, window + 1, (batch_size,), generator=generator)
    sign = torch.randint(0, 2, (batch_size,), generator=generator) * 2 - 1
    negatives = torch.multinomial(noise, batch_size * num_negatives, replacement=True, generator=generator)
    candidates = torch.cat([ids[positions + sign * distance][:, None], negatives.view(batch_size, num_negatives)], 1)
    return ids[positions].to(device), candidates.to(device)  # (B,), (B, 1 + K)
