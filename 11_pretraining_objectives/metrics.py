"""Evaluation metrics of a language model: perplexity, bits per token, and bits per byte.

A model's loss is the mean negative log-likelihood in nats per token, L = -1/N * sum_i ln p(token_i).

    perplexity       = exp(L)                      "as unsure as a uniform choice among exp(L) tokens"
    bits per token   = L / ln 2
    bits per byte    = (N * L) / (ln 2 * bytes)    the same total information spread over the UTF-8 bytes

Perplexity and bits per token depend on what a token is: a BPE token holds several bytes, so a BPE model
has a higher loss per token than a character model of the same quality. The total code length of a text,
N * L nats, does not depend on how the text was cut; dividing it by the text's bytes gives bits per byte,
the one number that compares models with different tokenizers (or none).

Contents: perplexity, bits_per_token, bits_per_byte, utf8_bytes.
"""

import math


def _check_loss(loss) -> None:
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
        raise ValueError(f"loss must be a finite number of nats >= 0, got {loss!r}")


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def perplexity(loss: float) -> float:
    """exp(mean loss in nats per token)."""
    _check_loss(loss)
    return math.exp(loss)


def bits_per_token(loss: float) -> float:
    """Mean loss in nats per token -> bits per token (divide by ln 2)."""
    _check_loss(loss)
    return loss / math.log(2)


def bits_per_byte(loss: float, num_tokens: int, num_bytes: int) -> float:
    """Mean loss (nats per token) over num_tokens tokens that spell a text of num_bytes UTF-8 bytes ->
    bits per byte = loss * num_tokens / (num_bytes * ln 2)."""
    _check_loss(loss)
    _check_count("num_tokens", num_tokens)
    _check_count("num_bytes", num_bytes)
    return loss * num_tokens / (num_bytes * math.log(2))


def utf8_bytes(text: str) -> int:
    """Number of UTF-8 bytes of text (the denominator of bits per byte)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return len(text.encode("utf-8"))
