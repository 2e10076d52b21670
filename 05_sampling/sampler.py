"""Decoding strategies: how the next token is chosen from the model's logits z (B, V).

Sampling draws the next token from p = softmax(z / T) after a chain of filters, each of which sets the
logits of excluded tokens to -inf (so softmax gives them probability 0 and renormalises the rest):

    repetition penalty  z_i / r if z_i > 0 else z_i * r, for every token i already in the sequence (CTRL)
    temperature         z / T; T -> 0 is greedy (argmax), T = 1 the model's own distribution, T > 1 flatter
    top-k               keep the k largest logits (and every logit tied with the k-th)
    top-p (nucleus)     keep the smallest set of most likely tokens whose probability sums to >= p
    min-p               keep tokens with p_i >= min_p * max_j p_j

The order above is the one pipeline of this file, the order of Hugging Face's generate(), so our samples
and theirs come from the same distribution. Why this order: the penalty edits what the model said about the
history, before any knob of the sampler; temperature comes before the truncation filters because top-p and
min-p are defined on probabilities, so they must see the distribution that is actually sampled (T changes
which tokens make up a mass of p); top-k before top-p makes the nucleus a share of the top-k mass.
`min_tokens_to_keep` stops every truncation from keeping fewer tokens than that.

Measures: entropy H = -sum_i p_i log p_i (nats) and the effective vocabulary exp(H), the number of equally
likely tokens with the same entropy (1 for a certain choice, V for a uniform one).

Beam search keeps the num_beams most likely partial sequences instead of sampling one; a finished
hypothesis is ranked by sum(log p) / generated_length ** length_penalty (Hugging Face's convention).

Contents: argument checks; the filters (apply_repetition_penalty, apply_temperature, top_k_filter,
top_p_filter, min_p_filter); entropy and effective_vocabulary; SamplingConfig and PRESETS;
process_logits and next_token_probabilities (the pipeline); Sampler (the callable 04's generate takes);
beam_search and BeamSearchResult.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# A finite stand-in for -inf in beam scores: sums of log-probabilities stay finite (as in Hugging Face).
_NEVER = -1.0e9


# ---------------------------------------------------------------------------------------------------
# Argument checks: every bad value names its argument and the allowed range
# ---------------------------------------------------------------------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_temperature(temperature) -> None:
    if not (_is_number(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")


def _check_top_k(top_k) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k), got {top_k!r}")


def _check_top_p(top_p) -> None:
    if not (_is_number(top_p) and math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _check_min_p(min_p) -> None:
    if not (_is_number(min_p) and math.isfinite(min_p) and 0 <= min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")


def _check_penalty(penalty) -> None:
    if not (_is_number(penalty) and math.isfinite(penalty) and penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {penalty!r}")


def _check_min_tokens_to_keep(min_tokens_to_keep) -> None:
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep!r}")


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor (B, V), got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (B, V) with V >= 1, got {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")


def _check_tokens(tokens, logits) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a tensor of token ids (B, T), got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.shape[0] != logits.shape[0]:
        raise ValueError(f"tokens must have shape (B, T) with the B of logits ({logits.shape[0]}), "
                         f"got {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= logits.shape[-1]):
        raise ValueError(f"tokens must be ids in [0, {logits.shape[-1]}) (the V of logits), got ids in "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")


# ---------------------------------------------------------------------------------------------------
# The filters, in pipeline order. Each takes logits (B, V) and returns new logits (B, V), -inf = excluded.
# ---------------------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty for every token that occurs in `tokens` (B, T): a positive logit is divided by
    `penalty`, a negative one multiplied by it, so penalty > 1 always makes a seen token less likely
    (dividing a negative logit would make it more likely). Each token is penalised once, however often seen."""
    _check_logits(logits)
    _check_tokens(tokens, logits)
    _check_penalty(penalty)
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, tokens.long(), True)  # (B, V)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T for T > 0. T = 0 (greedy) has no distribution: the Sampler takes the argmax instead."""
    _check_logits(logits)
    _check_temperature(temperature)
    if temperature == 0:
        raise ValueError("temperature must be > 0 to scale logits; temperature 0 means greedy (argmax), "
                         "which Sampler and next_token_probabilities handle")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the max(top_k, min_tokens_to_keep) largest logits of each row, and every logit equal to the
    last of them (a tie at the boundary keeps all tied tokens)."""
    _check_logits(logits)
    _check_top_k(top_k)
    _check_min_tokens_to_keep(min_tokens_to_keep)
    k = min(max(top_k, min_tokens_to_keep), logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus: drop the least likely tokens as long as their total probability stays <= 1 - top_p; what is
    left is the smallest set of most likely tokens with probability >= top_p (at least min_tokens_to_keep)."""
    _check_logits(logits)
    _check_top_p(top_p)
    _check_min_tokens_to_keep(min_tokens_to_keep)
    ascending, order = torch.sort(logits, dim=-1, descending=False)  # (B, V), least likely first
    mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)  # (B, V): probability of this token and all below it
    drop_sorted = mass_up_to <= 1 - top_p
    drop_sorted[:, -min_tokens_to_keep:] = False  # the most likely tokens always stay
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the top token's: the cut scales with the
    model's confidence (a confident step keeps few tokens, an uncertain one many)."""
    _check_logits(logits)
    _check_min_p(min_p)
    _check_min_tokens_to_keep(min_tokens_to_keep)
    probs = logits.softmax(dim=-1)  # (B, V)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    most_likely = torch.topk(probs, min(min_tokens_to_keep, logits.shape[-1]), dim=-1).indices
    drop.scatter_(1, most_likely, False)
    return logits.masked_fill(drop, float("-inf"))


# ---------------------------------------------------------------------------------------------------
# Measures of a next-token distribution
# ---------------------------------------------------------------------------------------------------

def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_i p_i log p_i in nats for each row of logits (B, V) -> (B,); excluded (-inf) tokens add 0."""
    _check_logits(logits)
    log_probs = logits.float().log_softmax(dim=-1)
    terms = torch.where(log_probs > float("-inf"), log_probs.exp() * log_probs, torch.zeros_like(log_probs))
    return -terms.sum(dim=-1)


def effective_vocabulary(logits: torch.Tensor) -> torch.Tensor:
    """exp(H) (B,): how many equally likely tokens would have this entropy (1 = certain, V = uniform)."""
    return entropy(logits).exp()


# ---------------------------------------------------------------------------------------------------
# The pipeline and its settings
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingConfig:
    """One decoding setting. temperature 0 = greedy; None (or 1.0 / 0.0 where noted) switches a filter off."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0  # 1.0 keeps everything
    min_p: float = 0.0  # 0.0 keeps everything
    repetition_penalty: float = 1.0  # 1.0 = no penalty
    min_tokens_to_keep: int = 1

    def __post_init__(self):
        _check_temperature(self.temperature)
        if self.top_k is not None:
            _check_top_k(self.top_k)
        _check_top_p(self.top_p)
        _check_min_p(self.min_p)
        _check_penalty(self.repetition_penalty)
        _check_min_tokens_to_keep(self.min_tokens_to_keep)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# The presets of the curriculum: deterministic t = 0; focused t = 0.7, k = 10, p = 0.9; creative
# t = 1.5-2.0, k = 100, p = 0.99 (the lower end of the range here; the demo also measures 2.0).
PRESETS = {
    "deterministic": SamplingConfig(temperature=0.0),
    "focused": SamplingConfig(temperature=0.7, top_k=10, top_p=0.9),
    "creative": SamplingConfig(temperature=1.5, top_k=100, top_p=0.99),
}


def process_logits(logits: torch.Tensor, tokens: torch.Tensor | None, config: SamplingConfig) -> torch.Tensor:
    """The pipeline: repetition penalty -> temperature -> top-k -> top-p -> min-p on logits (B, V), given the
    tokens so far (B, T) (only the penalty reads them; None = no history). Returns float32 logits (B, V)
    with -inf on excluded tokens. Greedy (temperature 0) skips temperature and the filters: the argmax
    survives every one of them anyway."""
    _check_logits(logits)
    logits = logits.float()
    if config.repetition_penalty != 1.0 and tokens is not None:
        logits = apply_repetition_penalty(logits, tokens, config.repetition_penalty)
    if config.greedy:
        return logits
    if config.temperature != 1.0:
        logits = apply_temperature(logits, config.temperature)
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k, config.min_tokens_to_keep)
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p, config.min_tokens_to_keep)
    if config.min_p > 0.0:
        logits = min_p_filter(logits, config.min_p, config.min_tokens_to_keep)
    return logits


def next_token_probabilities(logits: torch.Tensor, tokens: torch.Tensor | None, config: SamplingConfig) -> torch.Tensor:
    """The distribution the next token is drawn from (B, V); one-hot on the argmax when greedy."""
    processed = process_logits(logits, tokens, config)
    if config.greedy:
        return torch.zeros_like(processed).scatter_(1, processed.argmax(dim=-1, keepdim=True), 1.0)
    return processed.softmax(dim=-1)


class Sampler:
    """Picks the next token: Sampler(config, generator)(logits (B, V), tokens (B, T)) -> ids (B, 1).

    This is the `sampler` argument of 04's MiniFormer.generate. Batched (each row on its own), on whatever
    device the logits are (the generator must live there too), reproducible with a seeded torch.Generator.
    """

    def __init__(self, config: SamplingConfig = SamplingConfig(), generator: torch.Generator | None = None):
        if not isinstance(config, SamplingConfig):
            raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
        self.config = config
        self.generator = generator

    @classmethod
    def from_preset(cls, name: str, generator: torch.Generator | None = None) -> "Sampler":
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        return cls(PRESETS[name], generator)

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        processed = process_logits(logits, tokens, self.config)  # (B, V)
        if self.config.greedy:
            return processed.argmax(dim=-1, keepdim=True)
        return torch.multinomial(processed.softmax(dim=-1), 1, generator=self.generator)  # (B, 1)


# ---------------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------------

@dataclass
class BeamSearchResult:
    sequences: list  # per prompt, the best finished hypothesis: prompt + generated ids (LongTensor (T_b,))
    scores: torch.Tensor  # (B,) its sum of log-probabilities / generated_length ** length_penalty


def _check_beam_arguments(prompt, num_beams, max_new_tokens, length_penalty, eos_token_id, early_stopping,
                          cache_factory):
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a tensor of token ids (B, T) with T >= 1, got "
                         f"{tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__}")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (_is_number(length_penalty) and math.isfinite(length_penalty)):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or eos_token_id < 0):
        raise ValueError(f"eos_token_id must be an integer >= 0 or None, got {eos_token_id!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if cache_factory is not None and not callable(cache_factory):
        raise ValueError(f"cache_factory must be None or a callable returning an empty KV cache, got {cache_factory!r}")


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor (B, N, ...) indexed along dim 1 by indices (B, M) -> (B, M, ...)."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


@torch.no_grad()
def beam_search(model: Callable, prompt: torch.Tensor, num_beams: int, max_new_tokens: int, *,
                length_penalty: float = 1.0, eos_token_id: int | None = None, early_stopping: bool | str = False,
                context_length: int | None = None, cache_factory: Callable | None = None) -> BeamSearchResult:
    """Beam search with Hugging Face's semantics (generate(num_beams=..., do_sample=False)).

    model(ids (N, T)) -> logits (N, T, V) (a MiniFormer, or any such callable); it sees at most
    context_length tokens (default: model.config.context_length when it has one). Without cache_factory
    every step recomputes the whole context. With one (e.g. model.new_cache) the model is called as
    model(ids, kv_cache=cache) and each step feeds only the new tokens: the cache's reorder() moves every
    surviving beam's keys to its row, and at context_length the cache is refilled as in 04's generate.

    Each step extends every running beam by every token and keeps the 2 * num_beams best continuations by
    total log-probability. A continuation that ends (eos, or max_new_tokens reached) and ranks among the
    num_beams best becomes a finished hypothesis with score sum(log p) / generated_length ** length_penalty
    (the generated length counts the eos); the num_beams best finished ones are kept. The num_beams best
    continuations that did not end keep running. It stops when no running beam can beat the worst kept
    hypothesis (early_stopping=False: judged at the current length; "never": at the longest possible length
    when length_penalty > 0), when num_beams hypotheses are finished (early_stopping=True), or when every
    continuation ended.
    """
    _check_beam_arguments(prompt, num_beams, max_new_tokens, length_penalty, eos_token_id, early_stopping,
                          cache_factory)
    if context_length is None:
        context_length = getattr(getattr(model, "config", None), "context_length", None)
    B, prompt_length = prompt.shape
    K, device = num_beams, prompt.device
    max_length = prompt_length + max_new_tokens
    keep = 2 * K  # with one eos, 2K continuations always leave K that have not ended

    running = prompt[:, None, :].expand(B, K, prompt_length)  # (B, K, T)
    running_scores = torch.full((B, K), _NEVER, device=device)  # only beam 0 is live at first: identical
    running_scores[:, 0] = 0.0  # beams would otherwise propose the same continuations K times
    fill = eos_token_id if eos_token_id is not None else 0
    finished = torch.full((B, K, max_length), fill, dtype=prompt.dtype, device=device)  # (B, K, T_max)
    finished_lengths = torch.zeros((B, K), dtype=torch.long, device=device)
    finished_scores = torch.full((B, K), _NEVER, device=device)
    is_finished = torch.zeros((B, K), dtype=torch.bool, device=device)
    can_improve = torch.ones(B, dtype=torch.bool, device=device)  # can a running beam still beat the worst kept?
    among_best = torch.arange(keep, device=device) < K  # (2K,): only the K best continuations may finish

    cache = None
    for length in range(prompt_length, max_length):
        ids = running.reshape(B * K, length)
        if context_length is not None:
            ids = ids[:, -context_length:]
        if cache_factory is None:
            logits = model(ids)
        elif cache is None or (context_length is not None and cache.offset + 1 > context_length
                               and not getattr(cache, "evicts", False)):
            cache = cache_factory()
            logits = model(ids, kv_cache=cache)  # (re)fill with the whole context
        else:
            logits = model(ids[:, -1:], kv_cache=cache)  # only the token each beam just gained
        log_probs = logits[:, -1, :].float().log_softmax(dim=-1)  # (B*K, V)
        V = log_probs.shape[-1]
        totals = log_probs.view(B, K, V) + running_scores[:, :, None]  # (B, K, V)
        candidate_scores, flat = totals.view(B, K * V).topk(keep, dim=-1)  # (B, 2K), best first
        parents, new_tokens = flat // V, flat % V
        candidates = torch.cat([_gather_beams(running, parents), new_tokens[:, :, None]], dim=2)  # (B, 2K, T+1)
        ended = torch.full_like(new_tokens, length + 1 >= max_length, dtype=torch.bool)  # (B, 2K)
        if eos_token_id is not None:
            ended |= new_tokens == eos_token_id

        # The K best continuations that did not end run on.
        still_running = candidate_scores + ended.float() * _NEVER
        best = still_running.topk(K, dim=-1).indices  # (B, K)
        running, running_scores = _gather_beams(candidates, best), _gather_beams(still_running, best)
        if cache is not None:  # running beam k of row b continues from the cache row of its parent beam
            rows = torch.arange(B, device=device)[:, None] * K + _gather_beams(parents, best)  # (B, K)
            cache.reorder(rows.reshape(B * K))

        # Those that ended among the K best join the finished hypotheses, unless the search is over for them.
        generated = length + 1 - prompt_length
        may_join = ended & among_best[None, :] & can_improve[:, None]
        if early_stopping is True:
            may_join &= ~is_finished.all(dim=1, keepdim=True)
        new_scores = torch.where(may_join, candidate_scores / generated ** length_penalty,
                                 torch.full_like(candidate_scores, _NEVER))
        padded = torch.full((B, keep, max_length), fill, dtype=prompt.dtype, device=device)
        padded[:, :, :length + 1] = candidates
        merged_scores = torch.cat([finished_scores, new_scores], dim=1)  # (B, 3K)
        top = merged_scores.topk(K, dim=-1).indices  # (B, K): the K best hypotheses so far
        finished = _gather_beams(torch.cat([finished, padded], dim=1), top)
        finished_scores = _gather_beams(merged_scores, top)
        finished_lengths = _gather_beams(torch.cat([finished_lengths, torch.full_like(new_tokens, length + 1)], 1), top)
        is_finished = _gather_beams(torch.cat([is_finished, may_join], dim=1), top)

        # Can the best running beam still beat the worst finished hypothesis? (never, once it could not)
        if early_stopping == "never" and length_penalty > 0:
            best_length = max_new_tokens  # a positive penalty favours the longest possible hypothesis
        else:
            best_length = length + 1 - prompt_length
        best_possible = running_scores[:, 0] / best_length ** length_penalty
        worst_finished = finished_scores.min(dim=1).values
        can_improve &= ~is_finished.all(dim=1) | (best_possible > worst_finished)
        if not can_improve.any() or bool(ended.all()):
            break
        if early_stopping is True and bool(is_finished.all()):
            break

    sequences = [finished[b, 0, :finished_lengths[b, 0]] for b in range(B)]
    return BeamSearchResult(sequences, finished_scores[:, 0])
