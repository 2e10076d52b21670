"""The speaker task: which of Shakespeare's most talkative characters says this piece of a speech?

A probe for representations (11 fits a logistic regression on frozen features) and a classification
fine-tune (12 trains a head), with one split for both: pieces of `length` characters cut from each speech,
the same number per speaker, and train/test split by speech (70/30), so no speech gives pieces to both
sides (neighbouring pieces of one speech share words and would leak the label).

Contents: SpeakerPieces, speeches_by_speaker, speaker_pieces.
"""

from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass
class SpeakerPieces:
    train_texts: list  # [str], each `length` characters
    train_labels: np.ndarray  # (N_train,) int, index into names
    test_texts: list
    test_labels: np.ndarray
    names: list  # the speakers, most words first


def speeches_by_speaker(text: str) -> dict:
    """{speaker: [speech, ...]} from the corpus layout 'NAME:\\nline\\nline\\n\\n'."""
    speeches: dict = {}
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and lines[0].endswith(":"):
            speeches.setdefault(lines[0][:-1], []).append("\n".join(lines[1:]))
    return speeches


def speaker_pieces(text: str, speakers: int, per_speaker: int, length: int, seed: int) -> SpeakerPieces:
    """Up to per_speaker pieces (70% train, 30% test) for each of the `speakers` characters who say most."""
    for name, value in (("speakers", speakers), ("per_speaker", per_speaker), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "speakers" else 1):
            raise ValueError(f"{name} must be an integer >= {2 if name == 'speakers' else 1}, got {value!r}")
    speeches = speeches_by_speaker(text)
    if len(speeches) < speakers:
        raise ValueError(f"speakers must be at most the {len(speeches)} speakers found in the text, got {speakers}")
    volume = Counter({name: sum(len(s) for s in said) for name, said in speeches.items()})
    names = [name for name, _ in volume.most_common(speakers)]
    rng = np.random.default_rng(seed)
    pieces = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(names):
        said = [s for s in speeches[name] if len(s) >= length]
        order = rng.permutation(len(said))
        split_at = int(0.7 * len(said))
        for split, chosen in (("train", order[:split_at]), ("test", order[split_at:])):
            cut = [said[i][start:start + length] for i in chosen for start in range(0, len(said[i]) - length + 1, length)]
            limit = int(per_speaker * (0.7 if split == "train" else 0.3))
            for piece in [cut[i] for i in rng.permutation(len(cut))[:limit]]:
                pieces[split][0].append(piece)
                pieces[split][1].append(label)
    (train_texts, train_labels), (test_texts, test_labels) = pieces["train"], pieces["test"]
    return SpeakerPieces(train_texts, np.array(train_labels), test_texts, np.array(test_labels), names)
