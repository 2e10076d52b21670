"""Tests of the metrics: perplexity and bits per byte against closed forms (a uniform model over V tokens
has loss ln V, perplexity V, and n * log2(V) / bytes bits per byte), with 01's BPE and a character
vocabulary; the total code length does not depend on the tokenizer; argument errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from bpe import train_bpe, Tokenizer
from data import CharVocab
from metrics import bits_per_byte, bits_per_token, perplexity, utf8_bytes

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 4


def uniform_loss(ids: list[int], vocab_size: int) -> float:
    """Cross-entropy of a model with equal logits for every token: ln(vocab_size), computed by torch."""
    logits = torch.zeros(len(ids), vocab_size, dtype=torch.float64)
    return F.cross_entropy(logits, torch.tensor(ids)).item()


def test_uniform_model_over_bytes_is_eight_bits_per_byte():
    ids = list(TEXT.encode("utf-8"))
    loss = uniform_loss(ids, 256)
    assert perplexity(loss) == pytest.approx(256)
    assert bits_per_token(loss) == pytest.approx(8)
    assert bits_per_byte(loss, len(ids), utf8_bytes(TEXT)) == pytest.approx(8)


@pytest.mark.parametrize("vocab_size", [260, 320])
def test_uniform_bpe_model_bits_per_byte_closed_form(vocab_size):
    tokenizer = Tokenizer(*train_bpe(TEXT, vocab_size))
    ids = tokenizer.encode(TEXT)
    assert len(ids) < utf8_bytes(TEXT)  # merges happened: fewer tokens than bytes
    loss = uniform_loss(ids, tokenizer.vocab_size)
    expected = len(ids) * math.log2(tokenizer.vocab_size) / utf8_bytes(TEXT)  # closed form
    assert bits_per_byte(loss, len(ids), utf8_bytes(TEXT)) == pytest.approx(expected, rel=1e-6)
    assert perplexity(loss) == pytest.approx(tokenizer.vocab_size, rel=1e-5)


def test_non_ascii_text_counts_bytes_not_characters():
    text = "naïve café — ünïcödé"
    vocab = CharVocab(text)
    ids = vocab.encode(text).tolist()
    loss = uniform_loss(ids, vocab.size)
    assert utf8_bytes(text) > len(text)
    assert bits_per_byte(loss, len(ids), utf8_bytes(text)) == pytest.approx(
        len(text) * math.log2(vocab.size) / len(text.encode("utf-8")))


def test_code_length_is_independent_of_the_tokenizer():
    """The same probabilities for the same text give the same bits per byte, however the text is cut: a model
    that gives each character probability q gives a token of k characters probability q^k."""
    tokenizer = Tokenizer(*train_bpe(TEXT, 300))
    ids = tokenizer.encode(TEXT)
    q = 1 / 40
    char_loss = -math.log(q)  # per character
    token_loss = sum(-len(tokenizer.decode([i])) * math.log(q) for i in ids) / len(ids)  # per BPE token
    assert token_loss > char_loss  # per token the BPE model looks worse ...
    assert bits_per_byte(token_loss, len(ids), utf8_bytes(TEXT)) == pytest.approx(
        bits_per_byte(char_loss, len(TEXT), utf8_bytes(TEXT)))  # ... per byte they are the same


@pytest.mark.parametrize("call, name", [
    (lambda: perplexity(-0.1), "loss"),
    (lambda: perplexity(float("inf")), "loss"),
    (lambda: bits_per_token(float("nan")), "loss"),
    (lambda: bits_per_byte(1.0, 0, 10), "num_tokens"),
    (lambda: bits_per_byte(1.0, 10, 0), "num_bytes"),
    (lambda: bits_per_byte(1.0, 10.5, 10), "num_tokens"),
])
def test_bad_arguments_raise_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_bytes_instead_of_text_is_a_type_error():
    with pytest.raises(TypeError, match="text"):
        utf8_bytes(b"bytes")
