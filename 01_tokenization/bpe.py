"""Byte-level byte-pair encoding (BPE), as in GPT-2 and GPT-4: training, encoding, decoding, save/load.

A text becomes UTF-8 bytes (ids 0-255). Training repeatedly finds the most frequent adjacent pair
of ids and replaces it everywhere by a new id, the concatenation of the two tokens:

    (a, b)* = argmax_(a, b) count(a, b)          vocab[new_id] = vocab[a] + vocab[b]

Ties between equally frequent pairs go to the lexicographically smallest (vocab[a], vocab[b]).
Pairs never cross the boundaries of pre-tokenization: a regex (GPT2_PATTERN, GPT4_PATTERN) first
splits the text into "words" (letters, numbers, punctuation, whitespace runs), so " dog" and
"dog." stay separate. Special tokens ("<|endoftext|>") are cut out before that and are never merged.
Encoding repeats the merges on each word, lowest rank (earliest merge) first, as tiktoken does.

Contents, simple to advanced:
    GPT2_PATTERN, GPT4_PATTERN, resolve_pattern       the pre-tokenization regexes
    merge_pair, count_words                           shared building blocks
    train_bpe_naive                                   the slow baseline: recount every pair per merge
    train_bpe                                         the same result with incremental pair counts
    Tokenizer                                         encode / decode / encode_iterable / save / load
"""

import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import regex

# The split regex of the original GPT-2 release (openai/gpt-2, src/encoder.py).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The split regex of GPT-4's cl100k_base (tiktoken): case-insensitive contractions, numbers in groups
# of at most three digits, newlines kept apart from other whitespace.
GPT4_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

SAVE_FORMAT = "llm-lab-bpe/1"


def resolve_pattern(pattern: str) -> str:
    """A pattern name ('gpt2', 'gpt4') or a regex string -> the regex string.

    A bare word (letters, digits, underscores) is read as a name and must be one of PATTERNS; anything
    else is compiled as a regex, which must match every character of any text (the GPT patterns do),
    otherwise the characters it skips are lost by encode.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a name in {sorted(PATTERNS)} or a regex string, got {pattern!r}")
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    if regex.fullmatch(r"\w+", pattern):
        raise ValueError(f"unknown pattern name {pattern!r}: pattern must be one of {sorted(PATTERNS)} or a regex")
    try:
        regex.compile(pattern)
    except regex.error as error:
        raise ValueError(f"pattern is not a valid regex: {error}") from error
    return pattern


def check_special_tokens(special_tokens) -> tuple[str, ...]:
    """Validate special tokens: a sequence of unique, non-empty strings (a lone string is refused)."""
    if isinstance(special_tokens, (str, bytes)):
        raise ValueError(f"special_tokens must be a sequence of strings, not a single string: {special_tokens!r}")
    specials = tuple(special_tokens)
    for token in specials:
        if not isinstance(token, str) or not token:
            raise ValueError(f"special_tokens must be non-empty strings, got {token!r}")
    duplicates = sorted({t for t in specials if specials.count(t) > 1})
    if duplicates:
        raise ValueError(f"special_tokens must be unique, got duplicates {duplicates}")
    return specials


def special_token_regex(specials: tuple[str, ...]):
    """A regex with one capturing group matching any special token; longest first, so that at a given
    position '<|endoftext|>' beats a special token that is its prefix. None when there are none."""
    if not specials:
        return None
    alternatives = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    return regex.compile(f"({alternatives})")


# A "safe cut": just after a newline that has non-whitespace on both sides. No pre-token of either
# GPT pattern spans it and no match before it looks past it, so text[:cut] and text[cut:] pre-tokenize
# exactly as the whole text does (test_safe_blocks_never_change_the_encoding checks it; a custom pattern
# whose tokens can run across such a newline would need its own rule). Searched from the end ((?r)).
_SAFE_CUT = regex.compile(r"(?r)(?<=\S\n)(?=\S)")


def last_safe_cut(text: str, specials: tuple[str, ...] = ()) -> int:
    """Largest cut where text can be split without changing its encoding (0 when there is none).

    The cut must leave every special token whole and see the whole of any special starting at it.
    """
    longest = max((len(s) for s in specials), default=1)
    for match in _SAFE_CUT.finditer(text, 0, len(text) - longest + 1):
        cut = match.start()
        if not any(s in text[max(0, cut - len(s) + 1): cut + len(s) - 1] for s in specials):
            return cut
    return 0


def safe_blocks(pieces: Iterable[str], specials: tuple[str, ...] = (), block_chars: int = 1 << 20) -> Iterator[str]:
    """Regroup a stream of text pieces into blocks of about block_chars that end at safe cuts.

    Encoding the blocks one by one gives the same ids as encoding their concatenation, while only
    one block is held in memory (a text without any safe cut stays one block).
    """
    pending, size, threshold = [], 0, block_chars
    for piece in pieces:
        pending.append(piece)
        size += len(piece)
        if size >= threshold:
            buffer = "".join(pending)
            cut = last_safe_cut(buffer, specials)
            if cut > 0:
                yield buffer[:cut]
                buffer = buffer[cut:]
            # Without a cut the buffer keeps growing; raise the threshold so it is not re-scanned per piece.
            threshold = block_chars if cut > 0 else 2 * len(buffer)
            pending, size = [buffer], len(buffer)
    tail = "".join(pending)
    if tail:
        yield tail


def read_file_pieces(path: Path, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """The text of a UTF-8 file in pieces of chunk_chars characters (newline='' keeps '\\r\\n' as is)."""
    with open(path, encoding="utf-8", newline="") as f:
        yield from iter(lambda: f.read(chunk_chars), "")


def count_words(source, pattern: str, specials: tuple[str, ...] = ()) -> Counter:
    """Pre-tokenize and count the distinct 'words' of source (a str, or a path-like object naming a
    UTF-8 file, streamed in blocks). Special tokens are cut out and not counted."""
    splitter, special_splitter = regex.compile(pattern), special_token_regex(specials)
    pieces = read_file_pieces(Path(source)) if isinstance(source, os.PathLike) else [source]
    counts = Counter()
    for block in safe_blocks(pieces, specials):
        segments = special_splitter.split(block)[::2] if special_splitter else [block]  # odd items are specials
        for segment in segments:
            counts.update(splitter.findall(segment))
    return counts


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of pair in ids, scanning left to right, by new_id: (1,2,2,2) -(2,2)-> (1,N,2)."""
    first, second = pair
    merged, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == first and ids[i + 1] == second:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def _prepare_training(text, vocab_size: int, special_tokens, pattern: str):
    """Validate the arguments; return (specials, words as lists of byte ids, their counts)."""
    specials = check_special_tokens(special_tokens)
    pattern = resolve_pattern(pattern)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be an int >= 256 + {len(specials)} special tokens = "
                         f"{256 + len(specials)}, got {vocab_size!r}")
    if not isinstance(text, (str, os.PathLike)):
        raise ValueError(f"text must be a str or a path-like object naming a file, got {type(text).__name__}")
    word_counts = count_words(text, pattern, specials)
    words, counts = [], []
    for word, count in word_counts.items():
        ids = list(word.encode("utf-8"))
        if len(ids) > 1:  # a single byte has no pair to merge
            words.append(ids)
            counts.append(count)
    return specials, words, counts


def _with_specials(vocab: dict[int, bytes], merges: list, specials: tuple[str, ...]):
    """Append the special tokens after the last merge: ids 256 + len(merges), ..."""
    for token in specials:
        vocab[len(vocab)] = token.encode("utf-8")
    return vocab, merges


def train_bpe_naive(text, vocab_size: int, special_tokens=(), pattern: str = GPT4_PATTERN):
    """THE SLOW BASELINE: same arguments and same result as train_bpe, but every merge recounts all
    pairs of all distinct words. Cost O(merges x total length of the distinct words)."""
    specials, words, counts = _prepare_training(text, vocab_size, special_tokens, pattern)
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for new_id in range(256, vocab_size - len(specials)):
        pair_counts = Counter()
        for word, count in zip(words, counts):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += count
        if not pair_counts:  # every word is a single token: nothing left to merge
            break
        top = max(pair_counts.values())
        best = min((p for p, c in pair_counts.items() if c == top), key=lambda p: (vocab[p[0]], vocab[p[1]]))
        words = [merge_pair(word, best, new_id) for word in words]
        merges.append((vocab[best[0]], vocab[best[1]]))
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
    return _with_specials(vocab, merges, specials)


def train_bpe(text, vocab_size: int, special_tokens=(), pattern: str = GPT4_PATTERN):
    """Train byte-level BPE; returns (vocab, merges).

    text: the training text, or a path-like object (pathlib.Path) naming a UTF-8 file, which is read in
        blocks so that memory holds only the distinct words and their counts (a plain str is always text).
    vocab_size: the final size: 256 byte tokens + merges + special tokens. Training stops early, with
        fewer merges, when no pair is left (every word has become one token).
    special_tokens: strings that get the last ids; they are removed from the training text.
    pattern: a name in PATTERNS or a split regex.
    Returns vocab {id: bytes} (0-255 single bytes, then one id per merge in order, then the special
    tokens) and merges [(left bytes, right bytes), ...] in creation order.

    Incremental algorithm. The text is reduced to its W distinct words with their counts. We keep
    pair_counts[pair], an index pair_words[pair] = {words that contain the pair}, and a max-heap of
    (count, pair) with lazy deletion (an entry whose count is out of date is skipped when popped). A merge
    touches only the words in pair_words[best]: each is rewritten, the net change of its pair counts is
    accumulated, and only pairs whose count changed are updated and pushed again.
    Cost per merge: O(L_best + P_changed * log H), where L_best is the total length of the words holding
    the best pair, P_changed the number of pairs whose count changed and H the heap size, instead of the
    baseline's O(total length of all W words) for every merge.
    Counting overlapping pairs ('aaa' holds (a, a) twice) is the same convention as the baseline.
    """
    specials, words, counts = _prepare_training(text, vocab_size, special_tokens, pattern)
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            pair_words[pair].add(index)

    def heap_entry(pair):  # the smallest entry is the highest count, then the smallest byte pair
        return -pair_counts[pair], vocab[pair[0]], vocab[pair[1]], pair

    heap = [heap_entry(pair) for pair in pair_counts]
    heapq.heapify(heap)

    for new_id in range(256, vocab_size - len(specials)):
        best = None
        while heap:
            negative_count, _, _, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) == -negative_count > 0:  # else a stale entry
                best = pair
                break
        if best is None:  # no pair left to merge
            break
        merges.append((vocab[best[0]], vocab[best[1]]))
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        delta: dict[tuple[int, int], int] = defaultdict(int)  # net change of each pair's count
        for index in pair_words.pop(best):
            word, count = words[index], counts[index]
            merged = merge_pair(word, best, new_id)
            if len(merged) == len(word):  # a stale index entry: this word lost the pair earlier
                continue
            for pair in zip(word, word[1:]):
                delta[pair] -= count
            for pair in zip(merged, merged[1:]):
                delta[pair] += count
                pair_words[pair].add(index)
            words[index] = merged
        for pair, change in delta.items():
            if change == 0:
                continue
            pair_counts[pair] += change
            if pair_counts[pair] > 0:
                heapq.heappush(heap, heap_entry(pair))
            else:
                del pair_counts[pair]
                pair_words.pop(pair, None)
    return _with_specials(vocab, merges, specials)


class Tokenizer:
    """Encode text to ids and back with a trained vocabulary.

    vocab must have the layout train_bpe produces: ids 0-255 the single bytes, id 256 + k the k-th
    merge, then any other tokens. Each special token in special_tokens takes the id of an entry after
    the merges with the same bytes, or a new id at the end. Special tokens are matched first (leftmost,
    then longest), never split and never merged with their neighbours.
    """

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special_tokens=(),
                 pattern: str = GPT4_PATTERN, cache_size: int = 1 << 16):
        self.pattern = resolve_pattern(pattern)
        self.vocab = dict(vocab)
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self._merge_ids = self._check_layout()  # (left id, right id) -> merged id = 256 + rank
        num_ordinary = 256 + len(self.merges)
        extra_ids = {self.vocab[i]: i for i in sorted(self.vocab) if i >= num_ordinary}
        self.special_tokens: dict[str, int] = {}
        for token in check_special_tokens(special_tokens):
            token_id = extra_ids.get(token.encode("utf-8"))
            if token_id is None:
                token_id = max(self.vocab) + 1
                self.vocab[token_id] = token.encode("utf-8")
            self.special_tokens[token] = token_id
        self._splitter = regex.compile(self.pattern)
        self._special_splitter = special_token_regex(tuple(self.special_tokens))
        # Real text repeats its words: cache the ids of each pre-tokenized chunk (bounded, least recently used).
        self._encode_chunk = lru_cache(maxsize=cache_size)(self._merge_chunk)

    def _check_layout(self) -> dict[tuple[int, int], int]:
        for i in range(256):
            if self.vocab.get(i) != bytes([i]):
                raise ValueError(f"vocab[{i}] must be the single byte {bytes([i])!r}, got {self.vocab.get(i)!r}")
        ids_by_bytes = {bytes([i]): i for i in range(256)}
        merge_ids = {}
        for rank, (left, right) in enumerate(self.merges):
            new_id = 256 + rank
            if left not in ids_by_bytes or right not in ids_by_bytes or self.vocab.get(new_id) != left + right:
                raise ValueError(f"merges[{rank}] = {(left, right)!r} does not match vocab: both parts must be "
                                 f"earlier tokens and vocab[{new_id}] must be their concatenation")
            merge_ids[(ids_by_bytes[left], ids_by_bytes[right])] = new_id
            ids_by_bytes.setdefault(left + right, new_id)
        return merge_ids

    @property
    def vocab_size(self) -> int:
        return max(self.vocab) + 1

    def _merge_chunk(self, chunk: str) -> tuple[int, ...]:
        """Apply merges to one pre-tokenized chunk, always the lowest-rank adjacent pair first."""
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: self._merge_ids.get(p, float("inf")))
            if pair not in self._merge_ids:
                break
            ids = merge_pair(ids, pair, self._merge_ids[pair])
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Ids of text: special tokens by their id, every other segment pre-tokenized and merged."""
        parts = self._special_splitter.split(text) if self._special_splitter else [text]
        ids = []
        for i, part in enumerate(parts):
            if i % 2:  # split() puts the captured special tokens at the odd positions
                ids.append(self.special_tokens[part])
                continue
            try:
                for chunk in self._splitter.findall(part):
                    ids.extend(self._encode_chunk(chunk))
            except UnicodeEncodeError as error:
                raise ValueError(f"text must be valid Unicode: {error.object[error.start]!r} (a lone surrogate) "
                                 f"has no UTF-8 encoding") from None
        return ids

    def encode_iterable(self, texts: Iterable[str]) -> Iterator[int]:
        """Stream the ids of the concatenation of texts (e.g. an open file's lines), holding one block
        (~64k characters) at a time; identical to encode(''.join(texts))."""
        for block in safe_blocks(texts, tuple(self.special_tokens), block_chars=1 << 16):
            yield from self.encode(block)

    def decode(self, ids) -> str:
        """Text of ids: the tokens' bytes joined, then decoded as UTF-8 (invalid bytes become U+FFFD)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        try:
            data = b"".join([self.vocab[i] for i in ids])
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in self.vocab)
            raise ValueError(f"ids must be token ids in [0, {self.vocab_size}), got {bad!r}") from None
        return data.decode("utf-8", errors="replace")

    def save(self, path) -> Path:
        """Write a JSON file: {"format": "llm-lab-bpe/1", "pattern": regex, "merges": [[left id, right id],
        ...] in rank order (merge k creates id 256 + k), "special_tokens": {token: id}}."""
        ids_by_bytes = {self.vocab[i]: i for i in range(256 + len(self.merges))}
        document = {"format": SAVE_FORMAT, "pattern": self.pattern,
                    "merges": [[ids_by_bytes[a], ids_by_bytes[b]] for a, b in self.merges],
                    "special_tokens": self.special_tokens}
        path = Path(path)
        path.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read a file written by save()."""
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(document, dict) or document.get("format") != SAVE_FORMAT:
            raise ValueError(f"path {path} is not a tokenizer file of format {SAVE_FORMAT!r}")
        vocab = {i: bytes([i]) for i in range(256)}
        merges = []
        for left, right in document["merges"]:
            merges.append((vocab[left], vocab[right]))
            vocab[len(vocab)] = vocab[left] + vocab[right]
        for token, token_id in document["special_tokens"].items():
            vocab[token_id] = token.encode("utf-8")
        return cls(vocab, merges, list(document["special_tokens"]), pattern=document["pattern"])
