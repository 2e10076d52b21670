"""Byte-level byte-pair encoding (BPE), as in GPT-2 and GPT-4: training, encoding, decoding, save/load.

A text becomes UTF-8 bytes (ids 0-255). Training repeatedly finds the most frequent adjacent pair
of ids and replaces it everywhere by a new id, the concatenation of the two tokens:

    (a, b)* = argmax_(a, b) count(a, b)          vocab[new_id] = vocab[a] + vocab[b]

Ties between equally frequent pairs go to the lexicographically smallest (vocab[a], vocab[b]) by
default (tie_break="largest" picks the greatest instead).
Pairs never cross the boundaries of pre-tokenization: a regex (GPT2_PATTERN, GPT4_PATTERN) first
splits the text into "words" (letters, numbers, punctuation, whitespace runs), so " dog" and
"dog." stay separate. Special tokens ("<|endoftext|>") are cut out before that and are never merged.
Encoding repeats the merges on each word, lowest rank (earliest merge) first, as tiktoken does.

Contents, simple to advanced:
    GPT2_PATTERN, GPT4_PATTERN, resolve_pattern       the pre-tokenization regexes
    check_special_tokens, special_token_regex         special tokens: validated, matched longest first
    merge_pair, count_words                           shared building blocks
    train_bpe_naive                                   the slow baseline: recount every pair per merge
    train_bpe                                         the same result with incremental pair counts
    Tokenizer                                         encode (allowed_special / disallowed_special),
                                                      encode_ordinary, decode, save, load
    last_safe_cut, safe_blocks, read_file_pieces      streaming: Tokenizer.encode_iterable, training from a file
    bytes_to_unicode, read_gpt2_files,                other people's tokenizers: GPT-2's released files
    merges_from_ranks                                 (Tokenizer.from_gpt2_files) and tiktoken (from_tiktoken)
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
TIE_BREAKS = ("smallest", "largest")

SAVE_FORMAT = "llm-lab-bpe/1"
# Ids may leave gaps (cl100k_base leaves 20 before its last special token), but an id far beyond the
# number of tokens would make vocab_size, and every embedding table sized by it, mostly empty.
MAX_UNUSED_IDS = 1024


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
    """Validate special tokens: a sequence of unique, non-empty, valid Unicode strings (a lone string is refused)."""
    if isinstance(special_tokens, (str, bytes)) or not isinstance(special_tokens, Iterable):
        raise ValueError(f"special_tokens must be a sequence of strings, not {special_tokens!r}")
    specials = tuple(special_tokens)
    for token in specials:
        if not isinstance(token, str) or not token:
            raise ValueError(f"special_tokens must be non-empty strings, got {token!r}")
        check_unicode(token, "special_tokens")
    duplicates = sorted({t for t in specials if specials.count(t) > 1})
    if duplicates:
        raise ValueError(f"special_tokens must be unique, got duplicates {duplicates}")
    return specials


def check_unicode(text: str, name: str) -> None:
    """Refuse a str holding a lone surrogate (e.g. from a bad decode): it has no UTF-8 bytes to tokenize."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{name} must be valid Unicode: {error.object[error.start]!r} at position {error.start} "
                         f"(a lone surrogate) has no UTF-8 encoding") from None


@lru_cache(maxsize=64)
def special_token_regex(specials: tuple[str, ...]):
    """A regex with one capturing group matching any special token; longest first, so that at a given
    position '<|endoftext|>' beats a special token that is its prefix. None when there are none."""
    if not specials:
        return None
    alternatives = "|".join(regex.escape(s) for s in sorted(specials, key=lambda s: (-len(s), s)))
    return regex.compile(f"({alternatives})")


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


def count_words(source, pattern: str, specials: tuple[str, ...] = ()) -> Counter:
    """Pre-tokenize and count the distinct 'words' of source (a str, or a path-like object naming a
    UTF-8 file, streamed in blocks by safe_blocks below). Special tokens are cut out and not counted."""
    splitter, special_splitter = regex.compile(pattern), special_token_regex(specials)
    pieces = read_file_pieces(Path(source)) if isinstance(source, os.PathLike) else [source]
    counts = Counter()
    for block in safe_blocks(pieces, specials):
        segments = special_splitter.split(block)[::2] if special_splitter else [block]  # odd items are specials
        for segment in segments:
            counts.update(splitter.findall(segment))
    return counts


def _prepare_training(text, vocab_size: int, special_tokens, pattern: str, tie_break: str):
    """Validate the arguments; return (specials, words as lists of byte ids, their counts)."""
    specials = check_special_tokens(special_tokens)
    pattern = resolve_pattern(pattern)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be an int >= 256 + {len(specials)} special tokens = "
                         f"{256 + len(specials)}, got {vocab_size!r}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    if not isinstance(text, (str, os.PathLike)):
        raise TypeError(f"text must be a str or a path-like object naming a file, got {type(text).__name__}")
    if isinstance(text, str):
        check_unicode(text, "text")  # before training, not after it
    try:
        word_counts = count_words(text, pattern, specials)
    except UnicodeDecodeError as error:
        raise ValueError(f"text file {text} is not valid UTF-8: {error}") from None
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


class _Descending:
    """Wraps a value so that it sorts in reverse: lets the min-heap of train_bpe pop the greatest pair."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __lt__(self, other):
        return other.value < self.value

    def __eq__(self, other):
        return self.value == other.value


def train_bpe_naive(text, vocab_size: int, special_tokens=(), pattern: str = GPT4_PATTERN,
                    tie_break: str = "smallest"):
    """THE SLOW BASELINE: same arguments and same result as train_bpe, but every merge recounts all
    pairs of all distinct words. Cost O(merges x total length of the distinct words)."""
    specials, words, counts = _prepare_training(text, vocab_size, special_tokens, pattern, tie_break)
    pick = min if tie_break == "smallest" else max
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
        best = pick((p for p, c in pair_counts.items() if c == top), key=lambda p: (vocab[p[0]], vocab[p[1]]))
        words = [merge_pair(word, best, new_id) for word in words]
        merges.append((vocab[best[0]], vocab[best[1]]))
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
    return _with_specials(vocab, merges, specials)


def train_bpe(text, vocab_size: int, special_tokens=(), pattern: str = GPT4_PATTERN, tie_break: str = "smallest"):
    """Train byte-level BPE; returns (vocab, merges).

    text: the training text, or a path-like object (pathlib.Path) naming a UTF-8 file, which is read in
        blocks so that memory holds only the distinct words and their counts (a plain str is always text).
    vocab_size: the final size: 256 byte tokens + merges + special tokens. Training stops early, with
        fewer merges, when no pair is left (every word has become one token).
    special_tokens: strings that get the last ids; they are removed from the training text.
    pattern: a name in PATTERNS or a split regex.
    tie_break: which of several equally frequent pairs is merged: "smallest" (default) or "largest"
        (vocab[a], vocab[b]), compared as byte strings. Implementations differ here (minbpe takes the
        first pair it met, HF the smallest pair of ids), so merges only agree when this rule agrees.
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
    specials, words, counts = _prepare_training(text, vocab_size, special_tokens, pattern, tie_break)
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            pair_words[pair].add(index)

    def heap_entry(pair):  # the smallest entry is the highest count, then the tie-break's choice of byte pair
        tie = (vocab[pair[0]], vocab[pair[1]])
        return -pair_counts[pair], tie if tie_break == "smallest" else _Descending(tie), pair

    heap = [heap_entry(pair) for pair in pair_counts]
    heapq.heapify(heap)

    for new_id in range(256, vocab_size - len(specials)):
        best = None
        while heap:
            negative_count, _, pair = heapq.heappop(heap)
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

    vocab {id: bytes} must hold the 256 single bytes and, for every merge (left, right) in merges, the
    tokens left, right and left + right. Ids are looked up by bytes, so any numbering works: ours (ids
    0-255 the bytes in order, 256 + k the k-th merge) and GPT-2's (the bytes in a shuffled, printable
    order) alike. Merge k has rank k: encoding applies the lowest rank first.
    special_tokens: a sequence of strings (each takes the id of a vocab entry with its bytes that is
    not a byte or a merge, else a new id at the end) or a dict {token: id} (ids as given, checked).
    Special tokens are matched first (leftmost, then longest), never split and never merged with their
    neighbours. encode() refuses a special token found in the text unless the caller allows it, as
    tiktoken does: text from a user must not be able to insert a control token.
    """

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special_tokens=(),
                 pattern: str = GPT4_PATTERN, cache_size: int = 1 << 16):
        if not isinstance(vocab, dict):
            raise TypeError(f"vocab must be a dict {{id: bytes}}, got {type(vocab).__name__}")
        if isinstance(merges, (str, bytes)) or not isinstance(merges, Iterable):
            raise TypeError(f"merges must be a list of (left bytes, right bytes) pairs, got {type(merges).__name__}")
        self.pattern = resolve_pattern(pattern)
        self.vocab = dict(vocab)
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self._check_ids(self.vocab, "vocab")
        self._merge_ranks, self._merge_ids, ordinary = self._check_layout()
        self.special_tokens = self._assign_special_ids(special_tokens, ordinary)
        self._splitter = regex.compile(self.pattern)
        # Our layout maps byte b to id b; GPT-2's permutes them. Either way a translate table turns bytes into ids.
        self._byte_table = bytes(self._byte_ids) if max(self._byte_ids) < 256 else None
        # Real text repeats its words: cache the ids of each pre-tokenized chunk (bounded, least recently used).
        self._encode_chunk = lru_cache(maxsize=cache_size)(self._merge_chunk)

    @staticmethod
    def _check_ids(vocab: dict, name: str) -> None:
        limit = len(vocab) + MAX_UNUSED_IDS
        for token_id, token in vocab.items():
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < limit:
                raise ValueError(f"{name} ids must be ints in [0, {limit}) (at most {MAX_UNUSED_IDS} unused ids), "
                                 f"got {token_id!r}")
            if not isinstance(token, bytes):
                raise TypeError(f"{name}[{token_id}] must be bytes, got {type(token).__name__}")

    def _check_layout(self):
        """(pair of ids -> rank, pair of ids -> merged id, the set of ordinary ids: bytes and merges)."""
        id_of: dict[bytes, int] = {}
        for token_id in sorted(self.vocab):
            id_of.setdefault(self.vocab[token_id], token_id)  # a repeated token keeps its smallest id
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in id_of]
        if missing:
            raise ValueError(f"vocab must hold all 256 single bytes; {len(missing)} missing, e.g. {missing[0]!r}")
        self._byte_ids = [id_of[bytes([b])] for b in range(256)]
        known, ranks, merge_ids = set(self._byte_ids), {}, {}
        for rank, (left, right) in enumerate(self.merges):
            left_id, right_id, merged_id = id_of.get(left), id_of.get(right), id_of.get(left + right)
            if left_id not in known or right_id not in known or merged_id is None:
                raise ValueError(f"merges[{rank}] = {(left, right)!r} does not match vocab: both parts must be "
                                 f"earlier tokens and their concatenation must be in vocab")
            if (left_id, right_id) in ranks:
                raise ValueError(f"merges[{rank}] = {(left, right)!r} repeats merge {ranks[(left_id, right_id)]}")
            ranks[(left_id, right_id)], merge_ids[(left_id, right_id)] = rank, merged_id
            known.add(merged_id)
        return ranks, merge_ids, known

    def _assign_special_ids(self, special_tokens, ordinary: set[int]) -> dict[str, int]:
        if isinstance(special_tokens, dict):
            specials, wanted = check_special_tokens(special_tokens), special_tokens
        else:
            specials, wanted = check_special_tokens(special_tokens), {}
        extra_ids = {self.vocab[i]: i for i in sorted(self.vocab, reverse=True) if i not in ordinary}
        assigned: dict[str, int] = {}
        for token in specials:
            token_bytes = token.encode("utf-8")
            token_id = wanted.get(token, extra_ids.get(token_bytes))
            if token in wanted:
                limit = len(self.vocab) + len(specials) + MAX_UNUSED_IDS
                if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < limit:
                    raise ValueError(f"special_tokens[{token!r}] must be an int id in [0, {limit}), got {token_id!r}")
                if token_id in assigned.values():
                    raise ValueError(f"special_tokens[{token!r}] = {token_id} is also the id of another special token")
                if token_id in ordinary or self.vocab.get(token_id, token_bytes) != token_bytes:
                    raise ValueError(f"special_tokens[{token!r}] = {token_id} is already the id of "
                                     f"{self.vocab[token_id]!r}")
            elif token_id is None:
                token_id = max(self.vocab) + 1
            self.vocab[token_id] = token_bytes
            assigned[token] = token_id
        return assigned

    @property
    def vocab_size(self) -> int:
        return max(self.vocab) + 1

    def _merge_chunk(self, chunk: str) -> tuple[int, ...]:
        """Apply merges to one pre-tokenized chunk, always the lowest-rank adjacent pair first."""
        data = chunk.encode("utf-8")
        ids = list(data.translate(self._byte_table)) if self._byte_table else [self._byte_ids[b] for b in data]
        ranks = self._merge_ranks
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            ids = merge_pair(ids, pair, self._merge_ids[pair])
        return tuple(ids)

    def _special_set(self, specials, name: str) -> frozenset[str]:
        if specials == "all":
            return frozenset(self.special_tokens)
        if isinstance(specials, (str, bytes)) or not isinstance(specials, Iterable):
            raise ValueError(f'{name} must be "all" or a set of special tokens, got {specials!r}')
        unknown = set(specials) - self.special_tokens.keys()
        if unknown:
            raise ValueError(f"{name} holds {sorted(unknown)!r}, which are not special tokens of this tokenizer "
                             f"({sorted(self.special_tokens)})")
        return frozenset(specials)

    def encode(self, text: str, *, allowed_special=(), disallowed_special="all") -> list[int]:
        """Ids of text: special tokens by their id, every other segment pre-tokenized and merged.

        allowed_special: the special tokens ("all" or a set) that become their control id when the text
            holds them. By default none: text is treated as data.
        disallowed_special: the special tokens whose appearance raises a ValueError ("all" = every special
            not allowed, the default; () = none: they are encoded as ordinary text, like encode_ordinary).
        Same arguments and defaults as tiktoken's Encoding.encode.
        """
        if not isinstance(text, str):
            hint = " (decode bytes first, e.g. data.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
            raise TypeError(f"text must be a str, got {type(text).__name__}{hint}")
        allowed = self._special_set(allowed_special, "allowed_special")
        disallowed = (frozenset(self.special_tokens) - allowed if disallowed_special == "all"
                      else self._special_set(disallowed_special, "disallowed_special"))
        if disallowed:
            found = special_token_regex(tuple(sorted(disallowed))).search(text)
            if found:
                raise ValueError(f"text contains the special token {found.group()!r}. Pass allowed_special="
                                 f"{{{found.group()!r}}} (or 'all') to encode it as a control token, or "
                                 f"disallowed_special=() / encode_ordinary() to encode it as plain text")
        special_splitter = special_token_regex(tuple(sorted(allowed)))
        parts = special_splitter.split(text) if special_splitter else [text]
        ids = []
        for i, part in enumerate(parts):
            if i % 2:  # split() puts the captured special tokens at the odd positions
                ids.append(self.special_tokens[part])
                continue
            try:
                for chunk in self._splitter.findall(part):
                    ids.extend(self._encode_chunk(chunk))
            except UnicodeEncodeError:
                check_unicode(part, "text")
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of text with every special token treated as plain text (tiktoken's encode_ordinary)."""
        return self.encode(text, disallowed_special=())

    def encode_iterable(self, texts: Iterable[str], *, allowed_special=(), disallowed_special="all") -> Iterator[int]:
        """Stream the ids of the concatenation of texts (e.g. an open file's lines), holding one block
        (~64k characters) at a time; identical to encode(''.join(texts), same special arguments)."""
        for block in safe_blocks(texts, tuple(self.special_tokens), block_chars=1 << 16):
            yield from self.encode(block, allowed_special=allowed_special, disallowed_special=disallowed_special)

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
        ...] in rank order, "special_tokens": {token: id}}, plus "byte_ids" (the id of each byte 0-255) and
        "merge_ids" (the id each merge creates) when they are not our layout's 0-255 and 256 + rank.
        Written to a temporary file first and renamed, so a crash never leaves half a tokenizer behind."""
        pairs = list(self._merge_ranks)  # in rank order
        document = {"format": SAVE_FORMAT, "pattern": self.pattern, "merges": [list(pair) for pair in pairs],
                    "special_tokens": self.special_tokens}
        merge_ids = [self._merge_ids[pair] for pair in pairs]
        if self._byte_ids != list(range(256)) or merge_ids != list(range(256, 256 + len(pairs))):
            document |= {"byte_ids": self._byte_ids, "merge_ids": merge_ids}
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read a file written by save(); any problem is a ValueError that names the file."""
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"tokenizer file {path} is truncated or not JSON: {error}") from None
        if not isinstance(document, dict) or document.get("format") != SAVE_FORMAT:
            raise ValueError(f"tokenizer file {path} is not of format {SAVE_FORMAT!r}")
        try:
            merges = document["merges"]
            byte_ids = document.get("byte_ids", list(range(256)))
            merge_ids = document.get("merge_ids", list(range(256, 256 + len(merges))))
            if len(byte_ids) != 256 or len(merge_ids) != len(merges):
                raise ValueError(f"byte_ids must hold 256 ids and merge_ids one per merge, got {len(byte_ids)} "
                                 f"and {len(merge_ids)} for {len(merges)} merges")
            vocab = {token_id: bytes([b]) for b, token_id in enumerate(byte_ids)}
            pair_bytes = []
            for rank, ((left, right), new_id) in enumerate(zip(merges, merge_ids)):
                if left not in vocab or right not in vocab or new_id in vocab:
                    raise ValueError(f"merges[{rank}] = {[left, right]} -> {new_id} must join two earlier ids "
                                     f"into a new one")
                pair_bytes.append((vocab[left], vocab[right]))
                vocab[new_id] = vocab[left] + vocab[right]
            specials = document["special_tokens"]
            if not isinstance(specials, dict):
                raise ValueError(f"special_tokens must be an object {{token: id}}, got {specials!r}")
            return cls(vocab, pair_bytes, specials, pattern=document["pattern"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"tokenizer file {path} is malformed: {type(error).__name__}: {error}") from None

    @classmethod
    def from_gpt2_files(cls, encoder_json_path, vocab_bpe_path, special_tokens=("<|endoftext|>",)) -> "Tokenizer":
        """GPT-2's released tokenizer (encoder.json and vocab.bpe, see read_gpt2_files) with GPT-2's own ids:
        encode returns the ids that GPT-2, and tiktoken's "gpt2" encoding, return."""
        vocab, merges, specials = read_gpt2_files(encoder_json_path, vocab_bpe_path, special_tokens)
        return cls(vocab, merges, specials, pattern=GPT2_PATTERN)

    @classmethod
    def from_tiktoken(cls, encoding) -> "Tokenizer":
        """A tiktoken Encoding (e.g. tiktoken.get_encoding("cl100k_base") when cached): its ranks become our
        ids, its merges are recovered from the ranks (merges_from_ranks), its split regex and special
        tokens are kept. tiktoken keeps these in attributes with a leading underscore, read here."""
        ranks = encoding._mergeable_ranks
        vocab = {rank: token for token, rank in ranks.items()}
        return cls(vocab, merges_from_ranks(ranks), dict(encoding._special_tokens), pattern=encoding._pat_str)


# --- streaming: encode_iterable and training from a file hold one block at a time -----------------------

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
    end = len(text) - longest + 1
    if end <= 0:  # shorter than a special token: no cut can see a whole one (a negative end counts from the back)
        return 0
    for match in _SAFE_CUT.finditer(text, 0, end):
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


# --- other people's tokenizers: GPT-2's released files and tiktoken's ranks -----------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as in openai/gpt-2 src/encoder.py.

    encoder.json and vocab.bpe are text files, so GPT-2 writes each byte as one visible character: the
    188 bytes that are printable Latin-1 characters stand for themselves ('A' is 'A'), the other 68
    (control bytes, space, non-breaking space, soft hyphen...) become chr(256), chr(257), ... in byte
    order, so the space is 'Ġ' (chr(288)) and the newline 'Ċ'. GPT-2's ids 0-255 are the bytes in this
    order: the printable ones first, not 0-255 in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def read_gpt2_files(encoder_json_path, vocab_bpe_path, special_tokens=("<|endoftext|>",)):
    """Read GPT-2's encoder.json ({token written with bytes_to_unicode: id}) and vocab.bpe (a '#version'
    line, then one merge per line: 'left right', highest priority first); returns (vocab, merges,
    {special token: id}). Errors name the file and, in vocab.bpe, the line."""
    encoder_json_path, vocab_bpe_path = Path(encoder_json_path), Path(vocab_bpe_path)
    byte_of = {char: b for b, char in bytes_to_unicode().items()}

    def no_duplicate_keys(pairs):
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"{encoder_json_path}: token {repeated[0]!r} appears twice")
        return dict(pairs)

    try:
        encoder = json.loads(encoder_json_path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{encoder_json_path} is not a JSON file: {error}") from None
    if not isinstance(encoder, dict):
        raise ValueError(f"{encoder_json_path}: expected an object {{token: id}}")
    specials = check_special_tokens(special_tokens)
    missing = [token for token in specials if token not in encoder]
    if missing:
        raise ValueError(f"{encoder_json_path}: special token {missing[0]!r} is not in the file")
    vocab, id_of = {}, {}
    for string, token_id in encoder.items():
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id in vocab:
            raise ValueError(f"{encoder_json_path}: token {string!r} has id {token_id!r}, which is not a new int id")
        if string in specials:
            vocab[token_id] = string.encode("utf-8")
            continue
        unknown = [char for char in string if char not in byte_of]
        if unknown or not string:
            raise ValueError(f"{encoder_json_path}: token {string!r} holds {unknown[:1]!r}, which is not one of "
                             f"GPT-2's byte stand-ins (bytes_to_unicode)")
        token = bytes(byte_of[char] for char in string)
        if token in id_of:
            raise ValueError(f"{encoder_json_path}: tokens {id_of[token]} and {token_id} have the same bytes {token!r}")
        vocab[token_id], id_of[token] = token, token_id

    merges, known = [], {bytes([b]) for b in range(256)}
    lines = vocab_bpe_path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if (number == 1 and line.startswith("#version")) or (not line and number == len(lines)):
            continue
        parts = line.split(" ")
        where = f"{vocab_bpe_path}, line {number}"
        if len(parts) != 2 or not all(parts) or any(char not in byte_of for part in parts for char in part):
            raise ValueError(f"{where}: expected two tokens of GPT-2 byte stand-ins separated by one space, "
                             f"got {line!r}")
        left, right = (bytes(byte_of[char] for char in part) for part in parts)
        for part, token in zip(parts, (left, right)):
            if token not in known:
                raise ValueError(f"{where}: {part!r} is not an earlier token (a single byte or an earlier merge)")
        if left + right not in id_of:
            raise ValueError(f"{where}: the merged token {parts[0] + parts[1]!r} is not in {encoder_json_path}")
        merges.append((left, right))
        known.add(left + right)
    return vocab, merges, {token: encoder[token] for token in specials}


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges behind tiktoken-style ranks {token bytes: rank}, in rank order.

    A multi-byte token of rank r is what BPE makes of its own bytes using only the tokens of rank < r:
    run the merges that far and exactly two parts remain; they are its merge (left, right).
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= rank:
                break
            parts[best: best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2 or ranks.get(parts[0] + parts[1], rank) != rank or any(p not in ranks for p in parts):
            raise ValueError(f"ranks: token {token!r} (rank {rank}) is not the merge of two lower-rank tokens")
        merges.append((parts[0], parts[1]))
    return merges
