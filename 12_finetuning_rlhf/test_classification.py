"""Classification fine-tune: what the head reads, what trains, and the TF-IDF baseline."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from classification import (SequenceClassifier, classification_batch_fn, classification_loss, classifier_accuracy,
                            tfidf_baseline)
from training import TrainConfig, train
from transformer import MiniFormer, TransformerConfig

V = 12


def backbone(seed=0):
    torch.manual_seed(seed)
    return MiniFormer(TransformerConfig(vocab_size=V, context_length=16, num_layers=2, num_heads=2, embed_dim=16))


def test_the_head_reads_the_mean_of_the_final_normed_states_that_the_lm_head_reads():
    """The LM head's logits are head(final_norm(h)); with the class head set to the LM head's rows, the class
    logits must equal the position-mean of the LM logits (a linear map commutes with the mean)."""
    model = SequenceClassifier(backbone(), V)
    with torch.no_grad():
        model.head.weight.copy_(model.backbone.head.weight)
        model.head.bias.zero_()
    ids = torch.randint(V, (3, 10))
    torch.testing.assert_close(model(ids), model.backbone(ids).mean(dim=1))


def test_a_frozen_backbone_gets_no_gradient_and_a_full_fine_tune_does():
    ids, labels = torch.randint(V, (4, 8)), torch.tensor([0, 1, 2, 0])
    for freeze in (True, False):
        model = SequenceClassifier(backbone(), 3, freeze_backbone=freeze)
        classification_loss(model, ids, labels).backward()
        assert model.head.weight.grad is not None
        assert all((p.grad is None) == freeze for p in model.backbone.parameters())
    torch.testing.assert_close(classification_loss(model, ids, labels), F.cross_entropy(model(ids), labels))


def test_training_learns_a_separable_problem_through_the_shared_loop():
    """Class = whether the sequence holds token 1 or token 2 (every position): a full fine-tune learns it."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(2, (64,), generator=generator)
    ids = (labels + 1)[:, None].repeat(1, 8)
    model = SequenceClassifier(backbone(), 2)
    assert classifier_accuracy(model, ids, labels) < 1.0  # not solved by chance at the start
    batch_fn = classification_batch_fn({"train": (ids, labels), "val": (ids, labels)}, 16, generator)
    train(model, batch_fn, TrainConfig(steps=40, learning_rate=3e-3, warmup_steps=2, eval_interval=40, eval_batches=1,
                                       progress=False), loss_fn=classification_loss)
    assert classifier_accuracy(model, ids, labels, chunk=7) == 1.0


def test_tfidf_baseline_equals_the_same_pipeline_built_by_hand():
    rng = np.random.default_rng(0)
    words = {0: ["thee", "thou", "doth"], 1: ["you", "does", "okay"]}
    labels = rng.integers(2, size=60)
    texts = [" ".join(rng.choice(words[int(label)], 5)) for label in labels]
    noisy = [t if i % 7 else t.replace("th", "yo") for i, t in enumerate(texts)]
    accuracy = tfidf_baseline(noisy[:40], labels[:40], noisy[40:], labels[40:])
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True)
    classifier = LogisticRegression(max_iter=2000, C=10.0).fit(vectorizer.fit_transform(noisy[:40]), labels[:40])
    expected = (classifier.predict(vectorizer.transform(noisy[40:])) == labels[40:]).mean()
    assert accuracy == pytest.approx(expected) and accuracy > 0.8


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_classes"):
        SequenceClassifier(backbone(), 1)
    with pytest.raises(ValueError, match="split 'train'"):
        classification_batch_fn({"train": (torch.zeros(3, 4, dtype=torch.long), torch.zeros(2))}, 2, torch.Generator())
    batch_fn = classification_batch_fn({"train": (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3))}, 2,
                                       torch.Generator())
    with pytest.raises(ValueError, match="split"):
        batch_fn("test")
