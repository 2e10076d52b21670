"""WordPiece, BERT's tokenizer: greedy longest-match-first encoding, likelihood-scored merges in training.

Encoding a word: take the longest vocabulary entry that starts it, then the longest entry "##..." that
continues it, and so on. If some position has no match, the whole word becomes [UNK] (there is no byte
fallback, unlike byte-level BPE). Words come from a pre-tokenizer that splits at whitespace and
punctuation (WORD_PATTERN, the regex of HF tokenizers' `Whitespace` pre-tokenizer).

Training starts from the characters (a word's first character as is, each later one as "##c") and,
like BPE, merges one adjacent pair at a time. BPE merges the most frequent pair; WordPiece (Schuster and
Nakajima 2012) merges the pair that most raises the likelihood of the training tokens under a unigram
model, L = sum_t n_t log(n_t / N), when each of its n_ab occurrences becomes one token:

    gain(a, b) = f(n_ab) + f(n_a - n_ab) - f(n_a) + f(n_b - n_ab) - f(n_b) - [f(N - n_ab) - f(N)],  f(x) = x log x

The shortcut often quoted for it (e.g. HF's course), count(ab) / (count(a) count(b)), drops the size of
the gain and merges pairs of rare characters first (score="ratio"; the demo measures what it costs).
HF's WordPieceTrainer takes BPE's most frequent pair instead; its vocabulary is our compression peer.

Contents: WORD_PATTERN, pre_tokenize, WordPiece (tokenize_word, encode, decode), merge_scores, train_wordpiece
"""

from collections import Counter, defaultdict

import numpy as np
import regex

from bpe import merge_pair

WORD_PATTERN = regex.compile(r"\w+|[^\w\s]+")
PREFIX = "##"


def pre_tokenize(text: str) -> list[str]:
    """Words and punctuation runs, whitespace dropped: 'Hello, world!' -> ['Hello', ',', 'world', '!']."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return WORD_PATTERN.findall(text)


class WordPiece:
    """vocab: the tokens (a list, ids are positions, or a dict {token: id}); continuation pieces start with
    "##". A word longer than max_chars_per_word, or with a position no token matches, becomes unk_token."""

    def __init__(self, vocab, unk_token: str = "[UNK]", max_chars_per_word: int = 100):
        if isinstance(vocab, (list, tuple)):
            vocab = {token: i for i, token in enumerate(vocab)}
        if not isinstance(vocab, dict) or not all(isinstance(t, str) and t for t in vocab):
            raise TypeError("vocab must be a list of non-empty strings or a dict {token: id}")
        if unk_token not in vocab:
            raise ValueError(f"unk_token {unk_token!r} must be in vocab")
        if isinstance(max_chars_per_word, bool) or not isinstance(max_chars_per_word, int) or max_chars_per_word < 1:
            raise ValueError(f"max_chars_per_word must be an int >= 1, got {max_chars_per_word!r}")
        self.vocab, self.unk_token, self.max_chars_per_word = dict(vocab), unk_token, max_chars_per_word
        self.tokens = {i: token for token, i in self.vocab.items()}
        self.longest = max(len(token) for token in self.vocab)

    def tokenize_word(self, word: str) -> list[str]:
        """Greedy longest match first: 'unaffable' -> ['un', '##aff', '##able'] with BERT's vocabulary."""
        if len(word) > self.max_chars_per_word:
            return [self.unk_token]
        pieces, start = [], 0
        while start < len(word):
            prefix = PREFIX if start else ""
            for end in range(min(len(word), start + self.longest), start, -1):
                if prefix + word[start:end] in self.vocab:
                    pieces.append(prefix + word[start:end])
                    start = end
                    break
            else:  # nothing matches here: the whole word is unknown
                return [self.unk_token]
        return pieces

    def encode(self, text: str) -> list[int]:
        return [self.vocab[piece] for word in pre_tokenize(text) for piece in self.tokenize_word(word)]

    def decode(self, ids) -> str:
        """Words joined by single spaces, '##' pieces glued to the previous one (the spacing is not kept)."""
        text = " ".join(self.tokens[i] for i in ids)
        return text.replace(" " + PREFIX, "")


SCORES = ("likelihood", "ratio")


def _xlogx(x: np.ndarray) -> np.ndarray:
    return x * np.log(np.maximum(x, 1e-300))  # 0 log 0 = 0


def merge_scores(pair_count, left_count, right_count, same, total: float, score: str) -> np.ndarray:
    """Score of merging each pair (arrays, one entry per pair): the likelihood gain of the module docstring
    (for a == b the two middle terms become f(n_a - 2 n_ab) - f(n_a)), or the "ratio" shortcut."""
    if score == "ratio":
        return pair_count / np.maximum(left_count * right_count, 1e-300)
    gain = _xlogx(pair_count) - _xlogx(total - pair_count) + _xlogx(np.float64(total))
    separate = _xlogx(left_count - pair_count) - _xlogx(left_count) + _xlogx(right_count - pair_count) - _xlogx(right_count)
    together = _xlogx(np.maximum(left_count - 2 * pair_count, 0)) - _xlogx(left_count)
    return gain + np.where(same, together, separate)


def train_wordpiece(text: str, vocab_size: int, special_tokens=("[UNK]",), max_chars_per_word: int = 100,
                    score: str = "likelihood"):
    """Train a WordPiece vocabulary on text; returns the token list (special tokens first, then the
    characters in both forms, then one token per merge in order).

    Incremental like bpe.train_bpe: token and pair counts are updated only for the words a merge touches.
    A pair's score changes whenever its parts' counts change, so instead of a heap every merge scores
    all pairs at once with numpy (merge_scores). Ties go to the pair met first in the text.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    word_counts = Counter(w for w in pre_tokenize(text) if len(w) <= max_chars_per_word)
    alphabet = sorted({c if i == 0 else PREFIX + c for word in word_counts for i, c in enumerate(word)})
    vocab = list(dict.fromkeys([*special_tokens, *alphabet]))
    token_id = {token: i for i, token in enumerate(vocab)}  # merged tokens get new ids as they appear
    words = [[token_id[word[0]]] + [token_id[PREFIX + c] for c in word[1:]] for word in word_counts]
    counts = list(word_counts.values())
    token_counts = np.zeros(len(vocab) + max(vocab_size, 0) + 1)
    slot_of, pair_words = {}, defaultdict(set)
    lefts, rights, pair_counts = [], [], np.zeros(0)

    def add_pair(pair, change, index):
        nonlocal pair_counts
        if pair not in slot_of:
            slot_of[pair] = len(lefts)
            lefts.append(pair[0])
            rights.append(pair[1])
            if len(lefts) > len(pair_counts):
                pair_counts = np.concatenate([pair_counts, np.zeros(max(1024, len(pair_counts)))])
        pair_counts[slot_of[pair]] += change
        if change > 0:
            pair_words[pair].add(index)

    for index, (word, count) in enumerate(zip(words, counts)):
        for token in word:
            token_counts[token] += count
        for pair in zip(word, word[1:]):
            add_pair(pair, count, index)
    total = float(sum(len(word) * count for word, count in zip(words, counts)))  # N, the number of tokens
    while len(vocab) < vocab_size and len(lefts) and pair_counts.max() > 0:
        live, left, right = pair_counts[:len(lefts)], np.array(lefts), np.array(rights)
        scores = merge_scores(live, token_counts[left], token_counts[right], left == right, total, score)
        best_slot = int(np.argmax(np.where(live > 0, scores, -np.inf)))
        best = (lefts[best_slot], rights[best_slot])
        merged_text = vocab[best[0]] + vocab[best[1]].removeprefix(PREFIX)
        if merged_text not in token_id:  # two different pairs can spell the same token: it keeps one id
            token_id[merged_text] = len(vocab)
            vocab.append(merged_text)
        new_id = token_id[merged_text]
        for index in pair_words.pop(best):
            word, count = words[index], counts[index]
            merged = merge_pair(word, best, new_id)
            if len(merged) == len(word):  # a stale index entry: this word lost the pair earlier
                continue
            total -= (len(word) - len(merged)) * count
            for token in word:
                token_counts[token] -= count
            for token in merged:
                token_counts[token] += count
            for pair in zip(word, word[1:]):
                add_pair(pair, -count, index)
            for pair in zip(merged, merged[1:]):
                add_pair(pair, count, index)
            words[index] = merged
    return vocab
