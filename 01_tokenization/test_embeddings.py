"""Tests of embeddings.py against independent references (torch's cosine_similarity, scikit-learn's
nearest neighbours, binary cross-entropy), the one-hot/lookup identity, and a synthetic corpus whose
answer is known."""

import pytest
import torch
import torch.nn.functional as F

from embeddings import (SkipGram, cosine_similarity_matrix, group_cosine, nearest_neighbours, noise_distribution,
                        one_hot, skipgram_batch, skipgram_loss)
from testing import require
from training import TrainConfig, train


def test_one_hot_vectors_are_orthogonal():
    vectors = one_hot(torch.arange(7), 7)
    assert torch.equal(vectors, torch.eye(7))
    assert torch.equal(cosine_similarity_matrix(vectors), torch.eye(7))  # every distinct pair at cosine 0


def test_cosine_matrix_matches_torch_pairwise():
    vectors = torch.randn(9, 5, generator=torch.Generator().manual_seed(0))
    reference = F.cosine_similarity(vectors[:, None, :], vectors[None, :, :], dim=-1)
    torch.testing.assert_close(cosine_similarity_matrix(vectors), reference)


def test_nearest_neighbours_match_scikit_learn():
    neighbors = require("sklearn.neighbors")
    embeddings = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    index = neighbors.NearestNeighbors(n_neighbors=6, metric="cosine", algorithm="brute").fit(embeddings.numpy())
    distances, ids = index.kneighbors(embeddings[[3]].numpy())
    ours = nearest_neighbours(embeddings, 3, k=5)
    assert [i for i, _ in ours] == [int(i) for i in ids[0][1:]]  # sklearn's first hit is the query itself
    assert [c for _, c in ours] == pytest.approx([1 - d for d in distances[0][1:]], abs=1e-5)


def test_embedding_lookup_equals_one_hot_times_table():
    table = torch.nn.Embedding(11, 4)
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    torch.testing.assert_close(table(ids), one_hot(ids, 11) @ table.weight)


def test_group_cosine_by_hand():
    # tokens 0, 1 point the same way, 2, 3 the opposite way: within = 1, between = -1
    embeddings = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [-3.0, 0.0]])
    assert group_cosine(embeddings, [[0, 1], [2, 3]]) == pytest.approx((1.0, -1.0))
    assert group_cosine(one_hot(torch.arange(4), 4), [[0, 1], [2, 3]]) == (0.0, 0.0)


def test_skipgram_loss_is_binary_cross_entropy_with_true_context_as_positive():
    torch.manual_seed(0)
    model = SkipGram(vocab_size=10, embed_dim=4)
    centers, candidates = torch.tensor([1, 2, 3]), torch.tensor([[4, 5, 6], [7, 8, 9], [0, 1, 2]])
    scores = model(centers, candidates)
    torch.testing.assert_close(scores[1, 2], model.embedding.weight[2] @ model.context.weight[9])
    labels = torch.zeros(3, 3)
    labels[:, 0] = 1.0
    reference = F.binary_cross_entropy_with_logits(scores, labels, reduction="none").sum(1).mean()
    torch.testing.assert_close(skipgram_loss(model, centers, candidates), reference)


def test_noise_distribution_is_count_to_the_three_quarters():
    ids = torch.tensor([0] * 16 + [1] * 1 + [3] * 81)
    expected = torch.tensor([16 ** 0.75, 1.0, 0.0, 81 ** 0.75])
    torch.testing.assert_close(noise_distribution(ids, 4), expected / expected.sum())


def test_skipgram_batch_takes_contexts_within_the_window():
    ids = torch.arange(1000) * 7  # the value says where it came from
    noise = torch.full((7000,), 1 / 7000)
    centers, candidates = skipgram_batch(ids, 256, 3, noise, num_negatives=4, generator=torch.Generator().manual_seed(0))
    assert centers.shape == (256,) and candidates.shape == (256, 5)
    distance = (candidates[:, 0] - centers) // 7
    assert set(distance.tolist()) == {-3, -2, -1, 1, 2, 3}


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread (and far faster when other processes load the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_interchangeable_tokens_learn_similar_embeddings(one_thread):
    """Tokens 1 and 2 always appear in the same contexts ('0 x 5'), as do 3 and 4 ('6 x 7'): after training,
    cos(1, 2) and cos(3, 4) must beat the cross-group similarities by a wide margin."""
    generator = torch.Generator().manual_seed(0)
    choices = torch.randint(0, 4, (3000,), generator=generator)
    sentences = [[0, 1 + int(c), 5] if c < 2 else [6, 1 + int(c), 7] for c in choices]
    ids = torch.tensor([i for s in sentences for i in s])
    noise = noise_distribution(ids, 8)
    torch.manual_seed(0)
    model = SkipGram(vocab_size=8, embed_dim=16)
    within_before, between_before = group_cosine(model.embedding.weight, [[1, 2], [3, 4]])
    config = TrainConfig(steps=300, learning_rate=2e-2, warmup_steps=10, eval_interval=300, eval_batches=2,
                         progress=False)
    history = train(model, lambda split: skipgram_batch(ids, 64, 1, noise, 5, generator), config,
                    loss_fn=skipgram_loss)
    within, between = group_cosine(model.embedding.weight, [[1, 2], [3, 4]])
    assert history.val_loss[-1] < history.val_loss[0]
    assert within_before < between_before + 0.2  # the random start does not already pass
    assert within > between + 0.5, (within, between)


@pytest.mark.parametrize("call, error, argument", [
    (lambda: one_hot(torch.tensor([0, 5]), 5), ValueError, "ids"),
    (lambda: one_hot(torch.tensor([0]), 0), ValueError, "vocab_size"),
    (lambda: cosine_similarity_matrix(torch.ones(3)), ValueError, "vectors"),
    (lambda: nearest_neighbours(torch.ones(4, 2), 4), ValueError, "query_id"),
    (lambda: nearest_neighbours(torch.ones(4, 2), 0, k=4), ValueError, "k"),
    (lambda: group_cosine(torch.ones(4, 2), [[0, 1]]), ValueError, "groups"),
    (lambda: group_cosine(torch.ones(4, 2), [[0, 1], [2]]), ValueError, "groups"),
    (lambda: SkipGram(0), ValueError, "vocab_size"),
    (lambda: SkipGram(10, embed_dim=0), ValueError, "embed_dim"),
    (lambda: skipgram_batch(torch.arange(10), 4, 5, torch.ones(10) / 10), ValueError, "window"),
    (lambda: skipgram_batch(torch.arange(10), 0, 1, torch.ones(10) / 10), ValueError, "batch_size"),
    (lambda: one_hot(torch.tensor([0.0, 2.7]), 5), TypeError, "ids must be an integer tensor"),
    (lambda: one_hot(torch.tensor([-1, 2]), 5), ValueError, "ids"),
    (lambda: noise_distribution(torch.tensor([0, 1, 7]), 4), ValueError, r"ids must be in \[0, 4\)"),
    (lambda: noise_distribution(torch.tensor([], dtype=torch.long), 4), ValueError, "ids must hold at least one"),
    (lambda: noise_distribution(torch.tensor([0.5, 1.0]), 4), TypeError, "ids must be an integer tensor"),
    (lambda: noise_distribution(torch.tensor([0, 1]), 0), ValueError, "vocab_size"),
    (lambda: noise_distribution(torch.tensor([0, 1]), 4, power=float("nan")), ValueError, "power"),
])
def test_bad_arguments_are_refused(call, error, argument):
    with pytest.raises(error, match=argument):
        call()
