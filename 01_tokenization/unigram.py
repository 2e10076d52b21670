"""The Unigram language-model tokenizer (Kudo 2018), SentencePiece's default: Viterbi encoding, EM training.

Model: the pieces of a word are independent draws, P(x_1 ... x_n) = prod_i p(x_i). Encoding picks the
most likely segmentation, found by dynamic programming over the positions of the word (Viterbi):

    best[end] = max_{piece = word[start:end]} best[start] + log p(piece)

Training fits p by EM and shrinks the vocabulary by pruning:
  E-step: expected count of every piece over ALL segmentations of every word, weighted by their
          probability (forward-backward: alpha[start] + log p + beta[end] - log Z for each lattice edge).
  M-step: p(piece) = expected count / total.
  Prune:  for each piece, the loss in likelihood if it were removed and its occurrences re-segmented by
          the best alternative; keep the 75% with the largest loss (single characters always stay).
Seed vocabulary: every substring of up to max_piece_length characters, the most frequent x length first.
Words are pre-tokenized as SentencePiece does: a space becomes "▁" and every word starts with one, so
decode is exact (for text whose characters are all in the vocabulary).

Contents: SPACE, pre_tokenize, Unigram (viterbi, encode, decode), lattice, expected_counts, train_unigram
"""

import math
from collections import Counter

import regex

SPACE = "▁"  # U+2581, SentencePiece's visible space
UNKNOWN_PENALTY = 10.0  # an unknown character scores (lowest log p) - 10, as in SentencePiece and HF


def pre_tokenize(text: str) -> list[str]:
    """'Hello  world' -> ['▁Hello', '▁', '▁world'] (HF's Metaspace pre-tokenizer with prepend_scheme='always')."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = text.replace(" ", SPACE)
    if text and not text.startswith(SPACE):
        text = SPACE + text
    return regex.findall(f"{SPACE}[^{SPACE}]*", text)


class Unigram:
    """pieces: [(piece, log p), ...]; ids are positions. unk_id: the piece that stands for unknown characters
    (consecutive unknown characters become one unk token, as in HF)."""

    def __init__(self, pieces: list[tuple[str, float]], unk_id: int = 0):
        if not isinstance(pieces, (list, tuple)) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and p[0] for p in pieces):
            raise TypeError("pieces must be a list of (non-empty piece, log probability) pairs")
        scores = [float(score) for _, score in pieces]
        if not all(math.isfinite(score) for score in scores):
            raise ValueError("pieces' log probabilities must be finite")
        if isinstance(unk_id, bool) or not isinstance(unk_id, int) or not 0 <= unk_id < len(pieces):
            raise ValueError(f"unk_id must be an id in [0, {len(pieces)}), got {unk_id!r}")
        self.pieces = [(piece, score) for (piece, _), score in zip(pieces, scores)]
        self.unk_id = unk_id
        self.ids = {}
        for i, (piece, _) in enumerate(self.pieces):
            self.ids.setdefault(piece, i)
        self.longest = max(len(piece) for piece, _ in self.pieces)
        self.unknown_score = min(scores) - UNKNOWN_PENALTY

    def viterbi(self, word: str) -> list[tuple[str, int]]:
        """The most likely segmentation of word as [(text, id)]; ties go to the earlier start (HF's rule)."""
        n = len(word)
        best = [-math.inf] * (n + 1)
        best[0] = 0.0
        back = [None] * (n + 1)  # back[end] = (start, id)
        for start in range(n):
            if back[start] is None and start:  # unreachable cannot happen: every character has a node
                continue
            single = False
            for end in range(start + 1, min(n, start + self.longest) + 1):
                token_id = self.ids.get(word[start:end])
                if token_id is None:
                    continue
                single |= end == start + 1
                score = best[start] + self.pieces[token_id][1]
                if back[end] is None or score > best[end]:
                    best[end], back[end] = score, (start, token_id)
            if not single:  # no piece covers this character: an unknown node
                score = best[start] + self.unknown_score
                if back[start + 1] is None or score > best[start + 1]:
                    best[start + 1], back[start + 1] = score, (start, self.unk_id)
        tokens, end = [], n
        while end > 0:
            start, token_id = back[end]
            if token_id == self.unk_id and tokens and tokens[-1][1] == self.unk_id:
                tokens[-1] = (word[start:end] + tokens[-1][0], token_id)  # fuse consecutive unknowns
            else:
                tokens.append((word[start:end], token_id))
            end = start
        return tokens[::-1]

    def encode(self, text: str) -> list[int]:
        return [token_id for word in pre_tokenize(text) for _, token_id in self.viterbi(word)]

    def decode(self, ids) -> str:
        text = "".join(self.pieces[i][0] for i in ids).replace(SPACE, " ")
        return text[1:] if text.startswith(" ") else text


def lattice(word: str, pieces, longest: int) -> list[tuple[int, int, str]]:
    """Every (start, end, piece) with word[start:end] a piece, sorted by start: the edges of the Viterbi graph."""
    return [(start, end, word[start:end]) for start in range(len(word))
            for end in range(start + 1, min(len(word), start + longest) + 1) if word[start:end] in pieces]


def expected_counts(words: Counter, scores: dict[str, float], lattices: dict) -> tuple[Counter, float]:
    """E-step: (expected count of each piece over all segmentations, total log likelihood of the words).
    lattices[word] may hold edges of pieces no longer in scores; they are skipped. Log space throughout:
    log(e^a + e^b) = max + log1p(e^-|a - b|)."""
    counts, log_likelihood, log1p, exp = Counter(), 0.0, math.log1p, math.exp
    for word, frequency in words.items():
        n = len(word)
        edges = [(start, end, piece, scores[piece]) for start, end, piece in lattices[word] if piece in scores]
        alpha, beta = [-math.inf] * (n + 1), [-math.inf] * (n + 1)
        alpha[0], beta[n] = 0.0, 0.0
        for start, end, _, score in edges:  # sorted by start: alpha[start] is final when it is used
            a, b = alpha[end], alpha[start] + score
            alpha[end] = a + log1p(exp(b - a)) if a >= b else b + log1p(exp(a - b))
        for start, end, _, score in reversed(edges):  # start descending: beta[end] is final when it is used
            a, b = beta[start], beta[end] + score
            beta[start] = a + log1p(exp(b - a)) if a >= b else b + log1p(exp(a - b))
        log_z = alpha[n]
        log_likelihood += frequency * log_z
        for start, end, piece, score in edges:
            counts[piece] += frequency * exp(alpha[start] + score + beta[end] - log_z)
    return counts, log_likelihood


def _prune(words: Counter, scores: dict[str, float], keep: int) -> dict[str, float]:
    """Keep the `keep` pieces whose removal would cost the most likelihood (SentencePiece's pruning)."""
    model = Unigram(list(scores.items()))  # every character is a piece: no unknown node ever appears
    frequency = Counter()
    for word, count in words.items():
        for piece, _ in model.viterbi(word):
            frequency[piece] += count
    total = sum(frequency.values())
    always, losses = [], []
    for piece in scores:
        if len(piece) == 1:
            always.append(piece)
            continue
        if frequency[piece] == 0:
            continue  # never used by a best segmentation: dropped
        piece_id = model.ids.pop(piece)  # the best segmentation of the piece without the piece itself
        alternatives = [p for p, _ in model.viterbi(piece)]
        model.ids[piece] = piece_id
        log_p = math.log(frequency[piece]) - math.log(total)
        log_sum_alternatives = math.log(total + frequency[piece] * (len(alternatives) - 1))
        log_p_alternatives = sum(math.log(frequency[p] + frequency[piece]) - log_sum_alternatives
                                 for p in alternatives)
        # weighted by the share of tokens it covers (SentencePiece sums its words' frequencies per occurrence)
        losses.append((frequency[piece] / total * (log_p - log_p_alternatives), piece))
    losses.sort(reverse=True)
    kept = always + [piece for _, piece in losses[:max(0, keep - len(always))]]
    return {piece: scores[piece] for piece in kept}


def train_unigram(text: str, vocab_size: int, unk_token: str = "<unk>", max_piece_length: int = 16,
                  seed_size: int = 100_000, shrinking_factor: float = 0.75, em_iterations: int = 2) -> list:
    """Train a Unigram vocabulary on text; returns [(piece, log p)] with unk_token first (score 0, as HF)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    if not (isinstance(shrinking_factor, float) and 0 < shrinking_factor < 1):
        raise ValueError(f"shrinking_factor must be a float in (0, 1), got {shrinking_factor!r}")
    words = Counter(pre_tokenize(text))
    substrings = Counter()
    for word, count in words.items():
        for start in range(len(word)):
            for end in range(start + 1, min(len(word), start + max_piece_length) + 1):
                substrings[word[start:end]] += count
    characters = [s for s in substrings if len(s) == 1]
    seeds = sorted((s for s in substrings if len(s) > 1), key=lambda s: (-substrings[s] * len(s), s))[:seed_size]
    total = sum(substrings[s] for s in characters + seeds)
    scores = {s: math.log(substrings[s] / total) for s in characters + seeds}
    lattices = {word: lattice(word, scores, max_piece_length) for word in words}
    target = vocab_size - 1  # the unk piece takes one id
    while True:
        for _ in range(em_iterations):
            counts, _ = expected_counts(words, scores, lattices)
            total = sum(counts.values())
            # M-step; a piece expected less than half a time is dropped (SentencePiece's rule), a character never
            scores = {p: math.log(max(counts[p], 0.5) / total) for p in scores if counts[p] >= 0.5 or len(p) == 1}
        if len(scores) <= target:
            break
        scores = _prune(words, scores, max(target, int(len(scores) * shrinking_factor)))
    ranked = sorted(scores.items(), key=lambda item: (len(item[0]) > 1, -item[1], item[0]))[:max(target, 0)]
    return [(unk_token, 0.0)] + sorted(ranked, key=lambda item: (-item[1], item[0]))
