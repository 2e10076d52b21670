"""The speaker task: labels are right, counts are balanced, and no speech gives pieces to both splits."""

import pytest

from speakers import speaker_pieces, speeches_by_speaker

TEXT = "\n\n".join(
    [f"ALICE:\n{'a' * 39}{i}" for i in range(10)] + [f"BOB:\n{'b' * 29}{i}" for i in range(10)]
    + ["CAROL:\nccccc", "not a speech"]) + "\n"


def test_speeches_are_grouped_by_the_name_line():
    speeches = speeches_by_speaker(TEXT)
    assert sorted(speeches) == ["ALICE", "BOB", "CAROL"]
    assert len(speeches["ALICE"]) == 10 and speeches["CAROL"] == ["ccccc"]


def test_pieces_carry_their_speakers_label_and_splits_share_no_speech():
    pieces = speaker_pieces(TEXT, speakers=2, per_speaker=40, length=10, seed=0)
    assert pieces.names == ["ALICE", "BOB"]  # most characters first
    for texts, labels in ((pieces.train_texts, pieces.train_labels), (pieces.test_texts, pieces.test_labels)):
        assert all(len(t) == 10 and set(t.strip("0123456789")) == {"ab"[label]} for t, label in zip(texts, labels))
    # A piece from a speech's end holds its number: the speech numbers of the two splits are disjoint.
    ends = {split: {t for t in texts if not t.isalpha()} for split, texts in
            (("train", pieces.train_texts), ("test", pieces.test_texts))}
    assert ends["train"] and ends["test"] and ends["train"].isdisjoint(ends["test"])
    assert speaker_pieces(TEXT, 2, 40, 10, 0).train_texts == pieces.train_texts  # seeded


@pytest.mark.parametrize("settings, name", [(dict(speakers=1), "speakers"), (dict(speakers=4), "speakers"),
                                            (dict(per_speaker=0), "per_speaker"), (dict(length=0), "length")])
def test_bad_arguments_name_themselves(settings, name):
    arguments = dict(speakers=2, per_speaker=10, length=10, seed=0) | settings
    with pytest.raises(ValueError, match=name):
        speaker_pieces(TEXT, **arguments)
