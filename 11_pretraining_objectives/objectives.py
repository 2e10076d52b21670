"""Pretraining objectives: what the model reads, what it must predict, and which positions may see which.

One window of tokens x_0 .. x_T (random_batch's x = x_0..x_{T-1}, y = x_1..x_T) becomes, per objective:

    causal LM   inputs x_0..x_{T-1}, position t reads positions <= t and predicts x_{t+1}, loss everywhere:
                    L = -1/T * sum_t log p(x_{t+1} | x_0..x_t)
    masked LM   pick positions M (rate r: single tokens, or spans), corrupt them (BERT: 80% -> [MASK],
                10% -> a random token, 10% unchanged); every position reads every position; loss on M only:
                    L = -1/|M| * sum_{t in M} log p(x_t | corrupted x)
    prefix LM   the first P inputs are a prefix read bidirectionally, the rest causally; position t predicts
                x_{t+1}, with loss only where x_{t+1} is invisible to it, i.e. t >= P - 1:
                    L = -1/(T - P + 1) * sum_{t >= P-1} log p(x_{t+1} | x_0..x_max(t, P-1))

Visibility: a bool matrix (B, T, T), True where query i may read key j. Causal: j <= i. Bidirectional: all.
Prefix: j <= i or j < P. 04's MiniFormer applies any of them through the attention seam below
(VisibilityAttention, registered as attention_module="visibility"), which is plain causal attention until a
matrix is set with `with attention_visibility(model, visibility): ...`.

Contents, in reading order:
    causal_visibility, bidirectional_visibility, prefix_visibility     the three attention masks
    VisibilityAttention, attention_visibility                          04's attention, told which mask to use
    select_tokens, select_spans                                        which positions a masked LM hides
    corrupt                                                            BERT's 80/10/10 replacement
    ObjectiveBatch, objective_loss                                     inputs, targets (-100 = no loss), mask
    CausalLM, MaskedLM, PrefixLM                                       the objectives: make_batch and loss
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transformer import CausalSelfAttention, register_attention

IGNORE_INDEX = -100  # target value that F.cross_entropy skips (the value Hugging Face uses too)
STRATEGIES = ("token", "span")


# ---------------------------------------------------------------------------------------------------
# Who may read whom
# ---------------------------------------------------------------------------------------------------

def _check_length(length) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an integer >= 1, got {length!r}")


def causal_visibility(length: int, device=None) -> torch.Tensor:
    """(T, T) bool, True where key j <= query i: each position reads itself and the past."""
    _check_length(length)
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def bidirectional_visibility(length: int, device=None) -> torch.Tensor:
    """(T, T) bool, all True: every position reads every position (BERT's encoder)."""
    _check_length(length)
    return torch.ones(length, length, dtype=torch.bool, device=device)


def prefix_visibility(prefix_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T, T) bool for prefix lengths P (B,): query i reads key j when j <= i (causal) or j < P (the prefix
    is visible to everyone, so the prefix reads itself in both directions)."""
    _check_length(length)
    if not isinstance(prefix_lengths, torch.Tensor) or prefix_lengths.dim() != 1:
        raise ValueError(f"prefix_lengths must be a 1-D tensor (B,), got {prefix_lengths!r}")
    if len(prefix_lengths) and (prefix_lengths.min() < 0 or prefix_lengths.max() > length):
        raise ValueError(f"prefix_lengths must be in [0, {length}], got values in "
                         f"[{int(prefix_lengths.min())}, {int(prefix_lengths.max())}]")
    positions = torch.arange(length, device=prefix_lengths.device)
    in_prefix = positions[None, :] < prefix_lengths[:, None]  # (B, T): key j is in the prefix
    return causal_visibility(length, prefix_lengths.device)[None] | in_prefix[:, None, :]  # (B, T, T)


class VisibilityAttention(CausalSelfAttention):
    """04's causal attention whose mask can be replaced by any visibility matrix (B, T, T) or (T, T).

    With no matrix set it is exactly CausalSelfAttention (generation, KV caches and all). A matrix applies
    to a plain forward only: a KV cache or ALiBi slopes alongside one raise ValueError.
    """

    def __init__(self, config, layer_index: int):
        super().__init__(config, layer_index)
        self.visibility: torch.Tensor | None = None

    def mask(self, query_length: int, context, device, dtype):
        if self.visibility is None:
            return super().mask(query_length, context, device, dtype)
        if context.kv_cache is not None or context.alibi_slopes is not None:
            raise ValueError("a visibility matrix applies to a forward without KV cache and without ALiBi")
        if tuple(self.visibility.shape[-2:]) != (query_length, query_length):
            raise ValueError(f"visibility must end in (T, T) = ({query_length}, {query_length}), got "
                             f"{tuple(self.visibility.shape)}")
        # (B, T, T) -> (B, 1, T, T): one matrix per sequence, shared by the heads.
        return self.visibility.to(device)[:, None] if self.visibility.dim() == 3 else self.visibility.to(device)


register_attention("visibility", VisibilityAttention)


@contextmanager
def attention_visibility(model, visibility: torch.Tensor | None):
    """Within the block, every VisibilityAttention of `model` uses `visibility` ((B, T, T) or (T, T) bool;
    None = causal). The model must be built with attention_module="visibility"."""
    layers = [module for module in model.modules() if isinstance(module, VisibilityAttention)]
    if not layers:
        raise ValueError("model has no VisibilityAttention: build it with attention_module='visibility'")
    if visibility is not None and (not isinstance(visibility, torch.Tensor) or visibility.dtype != torch.bool
                                   or visibility.dim() not in (2, 3)):
        raise ValueError(f"visibility must be a bool tensor (T, T) or (B, T, T), got {visibility!r}")
    for layer in layers:
        layer.visibility = visibility
    try:
        yield model
    finally:
        for layer in layers:
            layer.visibility = None


# ---------------------------------------------------------------------------------------------------
# What a masked LM hides, and how
# ---------------------------------------------------------------------------------------------------

def _check_rate(name: str, value, low_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not ((0 < value if low_open else 0 <= value) and value <= 1):
        raise ValueError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got {value!r}")


def select_tokens(shape: tuple, rate: float, generator: torch.Generator | None = None,
                  protected: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: each position chosen independently with probability `rate` (BERT, Hugging Face's
    collator); `protected` positions (padding, special tokens) are never chosen."""
    _check_rate("rate", rate)
    chosen = torch.rand(shape, generator=generator) < rate
    return chosen & ~protected.cpu() if protected is not None else chosen


def select_spans(shape: tuple, rate: float, span_length: int, generator: torch.Generator | None = None,
                 protected: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: spans of `span_length` consecutive positions (SpanBERT, T5 hide spans, not single tokens).

    Spans start independently with probability q at every start that covers a position, including starts
    before position 0, so each position has exactly span_length candidate starts and is chosen with
    probability 1 - (1 - q)^span_length. Choosing q = 1 - (1 - rate)^(1 / span_length) makes that `rate`.
    """
    _check_rate("rate", rate)
    if isinstance(span_length, bool) or not isinstance(span_length, int) or span_length < 1:
        raise ValueError(f"span_length must be an integer >= 1, got {span_length!r}")
    B, T = shape
    start_rate = 1.0 - (1.0 - rate) ** (1.0 / span_length)
    starts = (torch.rand(B, T + span_length - 1, generator=generator) < start_rate).float()  # start s - (L-1)
    # Position t is covered when a span starts at any of t - L + 1 .. t: a sliding sum of width L.
    covered = F.conv1d(starts[:, None], torch.ones(1, 1, span_length))[:, 0] > 0  # (B, T)
    return covered & ~protected.cpu() if protected is not None else covered


def _check_fractions(mask_fraction: float, random_fraction: float) -> None:
    _check_rate("mask_fraction", mask_fraction, low_open=False)
    _check_rate("random_fraction", random_fraction, low_open=False)
    if mask_fraction + random_fraction > 1 + 1e-12:
        raise ValueError(f"mask_fraction + random_fraction must be <= 1, got {mask_fraction} + {random_fraction}")


def corrupt(tokens: torch.Tensor, selected: torch.Tensor, mask_id: int, vocab_size: int,
            generator: torch.Generator | None = None, mask_fraction: float = 0.8,
            random_fraction: float = 0.1) -> torch.Tensor:
    """BERT's corruption of the selected positions: mask_fraction of them -> mask_id, random_fraction -> a
    token uniform in [0, vocab_size), the rest unchanged (so the model cannot trust an unmasked input blindly,
    and sees real tokens at the positions it must predict). Drawn per position, as Hugging Face does."""
    _check_fractions(mask_fraction, random_fraction)
    draw = torch.rand(tokens.shape, generator=generator)  # one uniform per position splits it three ways
    to_mask = selected & (draw < mask_fraction)
    to_random = selected & (draw >= mask_fraction) & (draw < mask_fraction + random_fraction)
    random_tokens = torch.randint(vocab_size, tokens.shape, generator=generator)
    corrupted = tokens.cpu().clone()
    corrupted[to_mask] = mask_id
    corrupted[to_random] = random_tokens[to_random]
    return corrupted.to(tokens.device)


# ---------------------------------------------------------------------------------------------------
# The objectives
# ---------------------------------------------------------------------------------------------------

@dataclass
class ObjectiveBatch:
    inputs: torch.Tensor  # (B, T) token ids fed to the model
    targets: torch.Tensor  # (B, T) the token each position must predict, IGNORE_INDEX where no loss is taken
    visibility: torch.Tensor | None  # (B, T, T) or (T, T) bool, None = causal


def objective_loss(model, batch: ObjectiveBatch) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not IGNORE_INDEX."""
    with attention_visibility(model, batch.visibility):
        logits = model(batch.inputs)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.targets.reshape(-1), ignore_index=IGNORE_INDEX)


class Objective:
    """make_batch(x, y) -> ObjectiveBatch from random_batch's (x, y); loss(model, x, y) is the loss_fn that
    00_utils' train() and evaluate() call. Random choices come from the objective's own seeded generator."""

    name = "objective"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def make_batch(self, x: torch.Tensor, y: torch.Tensor) -> ObjectiveBatch:
        raise NotImplementedError

    def loss(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return objective_loss(model, self.make_batch(x, y))


class CausalLM(Objective):
    """GPT: predict the next token everywhere, reading only the past."""

    name = "causal"

    def make_batch(self, x, y):
        return ObjectiveBatch(x, y, None)


class MaskedLM(Objective):
    """BERT: hide a fraction `rate` of the positions (strategy "token" or "span"), read everything, predict
    the hidden tokens. mask_id is the [MASK] token (the model's vocabulary must include it); random
    replacements are drawn from [0, vocab_size)."""

    name = "masked"

    def __init__(self, mask_id: int, vocab_size: int, rate: float = 0.15, strategy: str = "token",
                 span_length: int = 3, mask_fraction: float = 0.8, random_fraction: float = 0.1, seed: int = 0):
        super().__init__(seed)
        _check_rate("rate", rate)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0:
            raise ValueError(f"mask_id must be an integer >= 0, got {mask_id!r}")
        if isinstance(span_length, bool) or not isinstance(span_length, int) or span_length < 1:
            raise ValueError(f"span_length must be an integer >= 1, got {span_length!r}")
        _check_fractions(mask_fraction, random_fraction)
        self.mask_id, self.vocab_size, self.rate, self.strategy = mask_id, vocab_size, rate, strategy
        self.span_length, self.mask_fraction, self.random_fraction = span_length, mask_fraction, random_fraction

    def select(self, shape: tuple, protected: torch.Tensor | None = None) -> torch.Tensor:
        if self.strategy == "token":
            return select_tokens(shape, self.rate, self.generator, protected)
        return select_spans(shape, self.rate, self.span_length, self.generator, protected)

    def make_batch(self, x, y=None, protected: torch.Tensor | None = None):
        selected = self.select(tuple(x.shape), protected).to(x.device)  # (B, T)
        inputs = corrupt(x, selected.cpu(), self.mask_id, self.vocab_size, self.generator, self.mask_fraction,
                         self.random_fraction)
        targets = x.masked_fill(~selected, IGNORE_INDEX)
        return ObjectiveBatch(inputs, targets, bidirectional_visibility(x.shape[1], x.device))


class PrefixLM(Objective):
    """T5 / UniLM's prefix LM: a prefix of random length P (uniform between the two fractions of T, at least 1)
    is read bidirectionally, and the tokens after it are predicted causally."""

    name = "prefix"

    def __init__(self, min_prefix_fraction: float = 0.25, max_prefix_fraction: float = 0.75, seed: int = 0):
        super().__init__(seed)
        for name, value in (("min_prefix_fraction", min_prefix_fraction), ("max_prefix_fraction", max_prefix_fraction)):
            _check_rate(name, value, low_open=False)
        if min_prefix_fraction > max_prefix_fraction:
            raise ValueError(f"min_prefix_fraction ({min_prefix_fraction}) must be <= max_prefix_fraction "
                             f"({max_prefix_fraction})")
        self.min_prefix_fraction, self.max_prefix_fraction = min_prefix_fraction, max_prefix_fraction

    def prefix_lengths(self, batch_size: int, length: int) -> torch.Tensor:
        low = max(1, round(self.min_prefix_fraction * length))
        high = max(low, round(self.max_prefix_fraction * length))
        return torch.randint(low, high + 1, (batch_size,), generator=self.generator)  # (B,)

    def make_batch(self, x, y, prefix_lengths: torch.Tensor | None = None):
        B, T = x.shape
        prefix = self.prefix_lengths(B, T) if prefix_lengths is None else prefix_lengths.cpu()
        prefix = prefix.to(x.device)
        # Position t predicts y_t = x_{t+1}; for t < P - 1 that token is in the visible prefix: no loss there.
        no_loss = torch.arange(T, device=x.device)[None, :] < (prefix[:, None] - 1)  # (B, T)
        return ObjectiveBatch(x, y.masked_fill(no_loss, IGNORE_INDEX), prefix_visibility(prefix, T))
