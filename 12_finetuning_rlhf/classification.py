"""Fine-tuning for classification: a pretrained lab model with a class head, against a classic baseline.

The language-model head is set aside; a linear layer reads the mean of the final (normalised) hidden states:

    logits = W * mean_t h_t + b,    h = final_norm(residual stream after the last block)   (B, C)

trained with cross-entropy on the labels, either with the backbone frozen (a linear probe: only W, b learn)
or with every weight learning (full fine-tuning). The baseline any such model must beat is older and
cheaper: TF-IDF of character n-grams and a logistic regression (scikit-learn).

Contents: SequenceClassifier, classification_batch_fn, classification_loss, classifier_accuracy,
tfidf_baseline.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline


class SequenceClassifier(nn.Module):
    """backbone (04's MiniFormer) + Linear(E, num_classes) on the mean-pooled final hidden state."""

    def __init__(self, backbone: nn.Module, num_classes: int, freeze_backbone: bool = False):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.embed_dim, num_classes)
        for parameter in backbone.parameters():
            parameter.requires_grad_(not freeze_backbone)

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, E): the final-normed hidden states averaged over the positions."""
        _, hidden = self.backbone.forward_with_hidden(ids)
        return self.backbone.final_norm(hidden[-1]).mean(dim=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, num_classes) logits."""
        return self.head(self.pooled(ids))


def classification_loss(model: SequenceClassifier, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the class logits: the loss_fn to hand 00_utils' train."""
    return F.cross_entropy(model(ids), labels)


def classification_batch_fn(splits: dict, batch_size: int, generator: torch.Generator, device="cpu"):
    """splits {name: (ids (N, T), labels (N,))} -> batch_fn(split) drawing batch_size random rows."""
    for name, (ids, labels) in splits.items():
        if ids.dim() != 2 or labels.shape != (ids.shape[0],) or ids.shape[0] == 0:
            raise ValueError(f"split {name!r} must hold ids (N, T) and labels (N,) with N >= 1, got "
                             f"{tuple(ids.shape)} and {tuple(labels.shape)}")

    def batch_fn(split: str):
        if split not in splits:
            raise ValueError(f"split must be one of {tuple(splits)}, got {split!r}")
        ids, labels = splits[split]
        rows = torch.randint(ids.shape[0], (batch_size,), generator=generator)
        return ids[rows].to(device), labels[rows].to(device)

    return batch_fn


@torch.no_grad()
def classifier_accuracy(model: SequenceClassifier, ids: torch.Tensor, labels: torch.Tensor, chunk: int = 512) -> float:
    """Fraction of rows whose highest logit is the label (eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions = torch.cat([model(ids[i:i + chunk].to(device)).argmax(-1).cpu() for i in range(0, len(ids), chunk)])
    model.train(was_training)
    return (predictions == labels.cpu()).float().mean().item()


def tfidf_baseline(train_texts: list, train_labels, test_texts: list, test_labels, ngram_range=(1, 4)) -> float:
    """Test accuracy of TF-IDF over character n-grams (within words) + logistic regression."""
    pipeline = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=ngram_range, sublinear_tf=True),
                             LogisticRegression(max_iter=2000, C=10.0))
    pipeline.fit(train_texts, np.asarray(train_labels))
    return float((pipeline.predict(test_texts) == np.asarray(test_labels)).mean())
