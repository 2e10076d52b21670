"""Tests of bpe.py: hand-computed merges, naive == incremental, exact equality with tiktoken on the same
vocabulary, round trips (hypothesis), streaming, special tokens, save/load, and every bad input."""

import json
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

import data
from bpe import (GPT2_PATTERN, GPT4_PATTERN, PATTERNS, Tokenizer, count_words, merge_pair, resolve_pattern,
                 safe_blocks, train_bpe, train_bpe_naive)

MULTILINGUAL = (
    "Naïve café, déjà vu; Grüße aus Köln. Ελληνικά και русский текст.\r\n"
    "東京は日本の首都です。北京是中国的首都。 한국어 문장도 있습니다.\r\n"
    "Emoji: 🙂🙃 👩‍💻 🇫🇷 and ZWJ sequences.\n\n\n"
    "def f(x):\n\treturn x ** 2  # comment\n    \n"
    "Numbers 1234567 3.14159 and I'm, you're, HE'LL, they've.\n"
    "   leading spaces,\t\ttabs,   trailing spaces   \n"
    "<html><body class=\"x\">&amp;</body></html>\r\n"
)
SPECIALS = ("<|endoftext|>", "<|end|>")


def training_text() -> str:
    """A modest offline text (pydoc prose and code) plus multilingual lines, so multi-byte merges exist."""
    return data.pydoc_text()[:60_000] + MULTILINGUAL * 20


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def trained(request):
    """(pattern name, vocab, merges, tokenizer) trained on training_text() with special tokens."""
    vocab, merges = train_bpe(training_text(), 700, special_tokens=SPECIALS, pattern=request.param)
    return request.param, vocab, merges, Tokenizer(vocab, merges, SPECIALS, pattern=request.param)


def tiktoken_twin(tokenizer: Tokenizer):
    """The same vocabulary loaded into tiktoken: token bytes -> rank (= our id), same split regex."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {tokenizer.vocab[i]: i for i in range(256 + len(tokenizer.merges))}
    return tiktoken.Encoding(name="llm-lab-test", pat_str=tokenizer.pattern, mergeable_ranks=ranks,
                             special_tokens=tokenizer.special_tokens)


# --- hand-computed example and building blocks ---------------------------------------------------------

@pytest.mark.parametrize("trainer", [train_bpe, train_bpe_naive])
def test_wikipedia_aaabdaaabac(trainer):
    """aaabdaaabac: (a,a) occurs 4 times (overlapping) -> Z; then (a,b) and (Z,a) tie at 2 and the smaller
    byte pair (b'a', b'b') wins -> Y; then (Z,Y) -> X, giving XdXac as on Wikipedia."""
    vocab, merges = trainer("aaabdaaabac", 259)
    assert merges == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab")]
    assert vocab[256] == b"aa" and vocab[257] == b"ab" and vocab[258] == b"aaab"
    tokenizer = Tokenizer(vocab, merges)
    assert tokenizer.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


def test_merge_pair_is_left_to_right_and_non_overlapping():
    assert merge_pair([1, 2, 2, 2, 3], (2, 2), 9) == [1, 9, 2, 3]
    assert merge_pair([2, 2, 2, 2], (2, 2), 9) == [9, 9]
    assert merge_pair([1, 2, 1, 2], (1, 2), 7) == [7, 7]
    assert merge_pair([], (1, 2), 7) == []


def test_training_stops_when_nothing_is_left_to_merge():
    vocab, merges = train_bpe("ab ab ab", 1000, special_tokens=["<s>"])
    assert merges == [(b"a", b"b"), (b" ", b"ab")]
    assert vocab[len(vocab) - 1] == b"<s>" and len(vocab) == 256 + 2 + 1


@pytest.mark.parametrize("pattern, expected", [
    ("gpt2", ["Hello", " world", ",", " 2024", "!", "\n\n ", " hi"]),
    # GPT-4: digits in groups of at most three, punctuation keeps its newlines, a lone space stays alone
    ("gpt4", ["Hello", " world", ",", " ", "202", "4", "!\n\n", " ", " hi"]),
])
def test_pretokenization_by_hand(pattern, expected):
    text = "Hello world, 2024!\n\n  hi"
    assert regex.findall(resolve_pattern(pattern), text) == expected
    assert count_words(text, resolve_pattern(pattern)) == Counter(expected)


# --- naive baseline == incremental trainer -------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_naive_and_incremental_trainers_agree_on_real_text(pattern):
    text = training_text()[:20_000]
    assert train_bpe(text, 420, SPECIALS, pattern) == train_bpe_naive(text, 420, SPECIALS, pattern)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab c\n'é1", max_size=120), st.integers(256, 300))
def test_naive_and_incremental_trainers_agree_on_random_text(text, vocab_size):
    assert train_bpe(text, vocab_size) == train_bpe_naive(text, vocab_size)


def test_training_from_a_file_equals_training_from_the_string(tmp_path):
    text = training_text()[:30_000] + "\r\nend<|endoftext|>x\r\n"
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))  # keep \r\n as written
    assert train_bpe(path, 400, SPECIALS) == train_bpe(text, 400, SPECIALS)


# --- exact equality with tiktoken ----------------------------------------------------------------------

def test_tiktoken_gives_identical_ids_on_multilingual_text(trained):
    _, _, _, tokenizer = trained
    encoding = tiktoken_twin(tokenizer)
    text = MULTILINGUAL + "<|endoftext|>" + MULTILINGUAL.upper() + "<|end|>"
    assert tokenizer.encode(text) == encoding.encode(text, allowed_special="all")


def test_tiktoken_gives_identical_ids_on_shakespeare(trained):
    _, _, _, tokenizer = trained
    encoding = tiktoken_twin(tokenizer)
    try:
        text = data.shakespeare_path(download=False).read_text(encoding="utf-8")
    except data.CorpusUnavailableError:
        pytest.skip("Shakespeare corpus not available offline (set LLM_LAB_DATA)")
    ours = tokenizer.encode(text)
    assert ours == encoding.encode_ordinary(text)
    assert len(ours) < 0.7 * len(text.encode("utf-8"))  # the vocabulary really compresses


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",))
                    | st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000'sS1a"))))
def test_tiktoken_gives_identical_ids_on_arbitrary_unicode(trained, text):
    _, _, _, tokenizer = trained
    assert tokenizer.encode(text) == tiktoken_twin(tokenizer).encode_ordinary(text)


# --- round trips ---------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.text() | st.sampled_from(SPECIALS), max_size=6))
def test_decode_inverts_encode_for_any_unicode(trained, pieces):
    _, _, _, tokenizer = trained
    text = "".join(pieces)
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", ["", "a", " ", "\n", "🙂", "\r\n\r\n", MULTILINGUAL])
def test_round_trip_edge_cases(trained, text):
    _, _, _, tokenizer = trained
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_replaces_a_partial_utf8_sequence(trained):
    _, _, _, tokenizer = trained
    ids = tokenizer.encode("🙂")  # four bytes; drop the last one
    assert tokenizer.decode(ids[:-1] if len(ids) > 1 else [0xF0, 0x9F, 0x99]) == "\ufffd"


def test_cached_and_uncached_encoding_agree(trained):
    pattern, vocab, merges, tokenizer = trained
    uncached = Tokenizer(vocab, merges, SPECIALS, pattern=pattern, cache_size=0)
    text = training_text()[:5_000] * 2
    assert tokenizer.encode(text) == uncached.encode(text) == tokenizer.encode(text)


def test_save_load_round_trip(trained, tmp_path):
    pattern, vocab, merges, tokenizer = trained
    path = tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(path)
    assert loaded.vocab == tokenizer.vocab and loaded.merges == merges
    assert loaded.special_tokens == tokenizer.special_tokens and loaded.pattern == PATTERNS[pattern]
    text = MULTILINGUAL + "<|endoftext|>"
    assert loaded.encode(text) == tokenizer.encode(text)
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["format"] == "llm-lab-bpe/1" and len(document["merges"]) == len(merges)


# --- streaming -----------------------------------------------------------------------------------------

def test_encode_iterable_equals_encode_on_a_file_read_line_by_line(trained, tmp_path):
    _, _, _, tokenizer = trained
    text = (training_text() + "<|endoftext|>") * 3  # > 64k characters: several blocks
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode("utf-8"))
    with open(path, encoding="utf-8", newline="") as lines:
        streamed = list(tokenizer.encode_iterable(lines))
    assert streamed == tokenizer.encode(text)


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.text(alphabet="ab \n\r\t.1") | st.sampled_from(SPECIALS + ("\n", "<|end")), max_size=30),
       block_chars=st.integers(1, 12))
def test_safe_blocks_never_change_the_encoding(trained, pieces, block_chars):
    """Cutting the stream into small blocks at safe cuts gives exactly the ids of the whole text."""
    _, _, _, tokenizer = trained
    blocks = list(safe_blocks(pieces, SPECIALS, block_chars=block_chars))
    assert "".join(blocks) == "".join(pieces)
    assert [i for block in blocks for i in tokenizer.encode(block)] == tokenizer.encode("".join(pieces))


# --- special tokens ------------------------------------------------------------------------------------

def test_special_tokens_are_never_split_or_merged(trained):
    _, vocab, merges, tokenizer = trained
    eot = tokenizer.special_tokens["<|endoftext|>"]
    assert eot == 256 + len(merges) and vocab[eot] == b"<|endoftext|>"
    ids = tokenizer.encode("the end<|endoftext|>the start")
    assert ids == tokenizer.encode("the end") + [eot] + tokenizer.encode("the start")
    # Training never merges across a special token: cut out, they leave only "ab" words to merge.
    vocab2, merges2 = train_bpe("ab<|endoftext|>" * 50, 300, special_tokens=["<|endoftext|>"])
    assert merges2 == [(b"a", b"b")]


@pytest.mark.parametrize("order", [("<|end|>", "<|endoftext|>"), ("<|endoftext|>", "<|end|>")])
def test_special_tokens_do_not_shadow_each_other(trained, order):
    _, vocab, merges, _ = trained
    tokenizer = Tokenizer(vocab, merges, order)
    ids = tokenizer.encode("<|endoftext|><|end|>")
    assert ids == [tokenizer.special_tokens["<|endoftext|>"], tokenizer.special_tokens["<|end|>"]]


@pytest.mark.parametrize("order", [("<|eot|>", "<|eot|><|eot|>"), ("<|eot|><|eot|>", "<|eot|>")])
def test_overlapping_special_tokens_resolve_to_the_longest(trained, order):
    _, vocab, merges, _ = trained
    tokenizer = Tokenizer(vocab, merges, order)  # neither is in vocab: both get new ids at the end
    double, single = tokenizer.special_tokens["<|eot|><|eot|>"], tokenizer.special_tokens["<|eot|>"]
    assert min(double, single) == len(vocab)
    assert tokenizer.encode("<|eot|><|eot|><|eot|>") == [double, single]


# --- bad inputs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("trainer", [train_bpe, train_bpe_naive])
@pytest.mark.parametrize("vocab_size", [255, 257, 256.0, True, "300"])
def test_vocab_size_too_small_or_not_an_int_is_refused(trainer, vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        trainer("some text", vocab_size, special_tokens=["<a>", "<b>"])


@pytest.mark.parametrize("specials", [["<a>", "<a>"], ["<a>", ""], ["<a>", 3], "<a>"])
def test_bad_special_tokens_are_refused(specials):
    with pytest.raises(ValueError, match="special_tokens"):
        train_bpe("text", 300, special_tokens=specials)
    vocab, merges = train_bpe("text", 258)
    with pytest.raises(ValueError, match="special_tokens"):
        Tokenizer(vocab, merges, specials)


@pytest.mark.parametrize("pattern", ["gpt3", "cl100k", 42])
def test_unknown_pattern_name_is_refused(pattern):
    with pytest.raises(ValueError, match="pattern"):
        train_bpe("text", 300, pattern=pattern)
    with pytest.raises(ValueError, match="pattern"):
        Tokenizer({i: bytes([i]) for i in range(256)}, [], pattern=pattern)


def test_invalid_regex_is_refused_and_patterns_resolve():
    with pytest.raises(ValueError, match="pattern"):
        resolve_pattern("(unclosed")
    assert resolve_pattern("gpt2") == GPT2_PATTERN and resolve_pattern(GPT4_PATTERN) == GPT4_PATTERN


def test_text_of_the_wrong_type_is_refused():
    with pytest.raises(ValueError, match="text"):
        train_bpe(b"bytes are not text", 300)


@pytest.mark.parametrize("bad_ids", [[-1], [10_000], [0, 1, 700 + 5], ["a"], [1.5]])
def test_decode_out_of_range_ids_is_refused(trained, bad_ids):
    _, _, _, tokenizer = trained
    with pytest.raises(ValueError, match=r"ids must be token ids in \[0, "):
        tokenizer.decode(bad_ids)


def test_encode_refuses_a_lone_surrogate(trained):
    _, _, _, tokenizer = trained
    with pytest.raises(ValueError, match="text must be valid Unicode"):
        tokenizer.encode("abc\ud800")


def test_inconsistent_vocab_and_merges_are_refused():
    vocab, merges = train_bpe("aaabdaaabac", 259)
    with pytest.raises(ValueError, match="merges"):
        Tokenizer(vocab, list(reversed(merges)))
    broken = dict(vocab)
    broken[65] = b"Z"
    with pytest.raises(ValueError, match="vocab"):
        Tokenizer(broken, merges)


def test_load_refuses_a_foreign_file(tmp_path):
    path = Path(tmp_path / "other.json")
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="path"):
        Tokenizer.load(path)
