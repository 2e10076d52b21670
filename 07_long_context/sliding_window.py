"""Sliding-window attention and attention sinks: attention whose cost stops growing with the length.

Full causal attention lets the query at position i read every key j <= i: O(T^2) time, and a KV cache
that grows without bound. Sliding-window attention (Longformer, Mistral) keeps only the last W keys,

    query i may read key j   <=>   i - W < j <= i                       (W keys, the query's own included)

so each layer costs O(T W), the cache holds W positions forever, and L layers still pass information
across L (W - 1) positions. Attention sinks (StreamingLLM, Xiao et al. 2023) also keep the first S tokens,

    query i may read key j   <=>   j <= i  and  (i - W < j  or  j < S)

because trained models park attention mass on the first tokens; evicting them wrecks the softmax. As in
StreamingLLM, positions are counted inside the cache: a sink is seen from position min(i, S + W - 1), so no
query ever meets a RoPE or ALiBi distance larger than S + W - 1 (the window's keys keep their true distance).

Two ways to compute the window, equal to float rounding (tested):
    mask    the (T, T) mask above, handed to SDPA: simple, but O(T^2) time and mask memory
    banded  queries in blocks of W; block b reads only key blocks b - 1 and b: scores (T, 2W), O(T W)

Contents, in reading order:
  sliding_window_mask        the rule above as a (Tq, Tk) bool mask, from absolute positions
  seen_distance              i - j, or min(i, S + W - 1) - j for a sink (positions counted in the cache)
  banded_attention           the window computed block by block (no (T, T) tensor anywhere)
  SlidingWindowAttention     04's CausalSelfAttention with a window and sinks, compute "mask" | "banded"
  register_sliding_window    the config choice: TransformerConfig(attention_module=<returned name>)
  with_sliding_window        the same weights in a model with windowed attention
  SinkKVCache                S sink positions + 06's ring buffer of the last W (04's KVCache protocol)
  attention_score_bytes      the formula: bytes of the score matrix, full vs banded
"""

import math

import torch
import torch.nn.functional as F

from attention import scaled_dot_product_attention
from cache import SlidingWindowKVCache, check_new_entries
from positional_embeddings import apply_rope
from transformer import AttentionContext, CausalSelfAttention, MiniFormer, register_attention

COMPUTES = ("mask", "banded")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def sliding_window_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int,
                        num_sinks: int = 0) -> torch.Tensor:
    """(Tq,) and (Tk,) absolute positions -> (Tq, Tk) bool, True where j <= i and (i - j < W or j < S)."""
    _check_int("window", window, 1)
    _check_int("num_sinks", num_sinks, 0)
    distance = query_positions[:, None] - key_positions[None, :]  # (Tq, Tk)
    return (distance >= 0) & ((distance < window) | (key_positions[None, :] < num_sinks))


def seen_distance(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int,
                  num_sinks: int = 0) -> torch.Tensor:
    """(Tq, Tk) distance the position encoding sees: i - j, except a sink (j < S) is seen from the query's
    position in the cache, min(i, S + W - 1), so its distance never exceeds S + W - 1."""
    queries = query_positions[:, None]
    capped = queries.clamp(max=num_sinks + window - 1)
    sink = key_positions[None, :] < num_sinks
    return torch.where(sink, capped, queries) - key_positions[None, :]


def banded_attention(q, k, v, window: int, scale: float | None = None, alibi: torch.Tensor | None = None,
                     use_sdpa: bool = True):
    """Sliding-window causal attention of q, k, v (B, H, T, D) computed band by band: O(T W), not O(T^2).

    Queries are cut into n = ceil(T / W) blocks of W; block b (positions bW .. bW + W - 1) can only see keys
    bW - W + 1 .. bW + W - 1, which lie in key blocks b - 1 and b. So each block scores W queries against 2W
    keys: scores (B, H, n, W, 2W) instead of (B, H, T, T). alibi: slopes (H,) for ALiBi's -m (i - j) bias.
    """
    _check_int("window", window, 1)
    B, H, T, D = q.shape
    n = math.ceil(T / window)
    pad = n * window - T  # pad the end; padded queries are dropped, padded keys are in no real query's past

    def blocks(t):  # (B, H, T, D) -> (B, H, n, W, D)
        return F.pad(t, (0, 0, 0, pad)).view(B, t.shape[1], n, window, t.shape[-1])

    def with_previous(t):  # (B, H, n, W, D) -> (B, H, n, 2W, D): key block b - 1 (zeros before 0), then b
        previous = F.pad(t, (0, 0, 0, 0, 1, 0))[:, :, :-1]
        return torch.cat([previous, t], dim=3)

    q_blocks, k_bands, v_bands = blocks(q), with_previous(blocks(k)), with_previous(blocks(v))
    query_positions = torch.arange(n * window, device=q.device).view(n, window)  # (n, W)
    key_positions = torch.cat([query_positions - window, query_positions], dim=1)  # (n, 2W)
    distance = query_positions[:, :, None] - key_positions[:, None, :]  # (n, W, 2W)
    allowed = (distance >= 0) & (distance < window) & (key_positions[:, None, :] >= 0)
    mask = allowed
    if alibi is not None:  # (H, 1, 1, 1) * (n, W, 2W) -> (H, n, W, 2W)
        bias = -alibi.to(q.dtype)[:, None, None, None] * distance.to(q.dtype)
        mask = bias.masked_fill(~allowed, float("-inf"))
    if use_sdpa:
        out = F.scaled_dot_product_attention(q_blocks, k_bands, v_bands, attn_mask=mask, scale=scale)
    else:
        out = scaled_dot_product_attention(q_blocks, k_bands, v_bands, mask=mask, scale=scale)
    return out.reshape(B, H, n * window, D)[:, :, :T]  # (B, H, T, D)


class SlidingWindowAttention(CausalSelfAttention):
    """04's attention restricted to the last `window` keys plus the first `num_sinks` (see the docstring).

    compute="mask" hands SDPA the (Tq, Tk) mask; compute="banded" runs banded_attention on a plain forward
    (no cache, no weights requested) and the mask otherwise (a cache step has few queries anyway).
    Keys are checked by their absolute positions (key_positions of the cache), so any cache works: a
    ConcatKVCache (keeps everything, attends to the window), 06's ring buffer, or SinkKVCache.
    """

    def __init__(self, config, layer_index: int, window: int, num_sinks: int = 0, compute: str = "mask"):
        super().__init__(config, layer_index)
        _check_int("window", window, 1)
        _check_int("num_sinks", num_sinks, 0)
        if compute not in COMPUTES:
            raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
        if compute == "banded" and num_sinks:
            raise ValueError(f"compute='banded' computes the window only: num_sinks must be 0, got {num_sinks}")
        self.window, self.num_sinks, self.compute = window, num_sinks, compute

    def attend(self, q, k, v, context: AttentionContext):
        cache = context.kv_cache
        plain = cache is None and not context.need_weights
        if self.compute == "banded" and plain:
            k, v = self._expand_kv_heads(k, v)
            return banded_attention(q, k, v, self.window, self.scale, context.alibi_slopes, self.use_sdpa), None
        if self.num_sinks and self.use_rope:
            return self._attend_with_rotated_sinks(q, k, v, context)
        return super().attend(q, k, v, context)

    def _expand_kv_heads(self, k, v):
        """(B, H_kv, Tk, D) -> (B, H, Tk, D): each group of H / H_kv query heads reads its KV head."""
        if self.num_kv_heads == self.num_heads:
            return k, v
        groups = self.num_heads // self.num_kv_heads
        return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def _key_and_query_positions(self, query_length: int, context: AttentionContext, device):
        queries = context.query_positions(query_length, device)
        cache = context.kv_cache
        keys = queries if cache is None else cache.key_positions(self.layer_index).to(device)
        return queries, keys

    def mask(self, query_length: int, context: AttentionContext, device, dtype):
        """The window-and-sinks mask (bool), or with ALiBi the bias -m * seen_distance with -inf outside it."""
        queries, keys = self._key_and_query_positions(query_length, context, device)
        allowed = sliding_window_mask(queries, keys, self.window, self.num_sinks)
        if context.alibi_slopes is None:
            return allowed
        distance = seen_distance(queries, keys, self.window, self.num_sinks).to(dtype)  # (Tq, Tk)
        bias = -context.alibi_slopes.to(dtype)[:, None, None] * distance  # (H, Tq, Tk): ALiBi's -m (i - j)
        return bias.masked_fill(~allowed, float("-inf"))

    def _attend_with_rotated_sinks(self, q, k, v, context: AttentionContext):
        """RoPE with sinks: q was rotated to its position i; a sink's score uses q rotated to min(i, S + W - 1)
        instead (a rotation by the difference, since RoPE rotations compose). Scores are written out."""
        k, v = self._expand_kv_heads(k, v)
        queries, keys = self._key_and_query_positions(q.shape[2], context, q.device)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
        sink = keys < self.num_sinks
        shift = queries.clamp(max=self.num_sinks + self.window - 1) - queries  # (Tq,) <= 0
        q_for_sinks = apply_rope(q, base=self.rope_base, layout=self.rope_layout, positions=shift)
        scores[..., sink] = (q_for_sinks @ k[:, :, sink].transpose(-2, -1)) * scale
        allowed = sliding_window_mask(queries, keys, self.window, self.num_sinks)
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # each row holds its own key
        if context.kv_cache is not None and hasattr(context.kv_cache, "observe_attention"):
            context.kv_cache.observe_attention(self.layer_index, weights)
        return weights @ v, (weights if context.need_weights else None)


def register_sliding_window(window: int, num_sinks: int = 0, compute: str = "mask") -> str:
    """Register SlidingWindowAttention with these settings; return the name for TransformerConfig's
    attention_module. Registering the same settings twice is harmless (same name, same factory)."""
    _check_int("window", window, 1)
    _check_int("num_sinks", num_sinks, 0)
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
    name = f"window{window}-sinks{num_sinks}-{compute}"
    register_attention(name, lambda config, layer_index: SlidingWindowAttention(config, layer_index, window,
                                                                                 num_sinks, compute))
    return name


def with_sliding_window(model: MiniFormer, window: int, num_sinks: int = 0, compute: str = "mask") -> MiniFormer:
    """A new MiniFormer with `model`'s weights whose attention keeps the window (and sinks); same device,
    dtype and train/eval mode. The weights are copied, so training one does not change the other."""
    name = register_sliding_window(window, num_sinks, compute)
    config = model.config.__class__(**{**model.config.__dict__, "attention_module": name})
    reference = next(model.parameters())
    windowed = MiniFormer(config).to(device=reference.device, dtype=reference.dtype)
    windowed.load_state_dict(model.state_dict(), strict=True)
    return windowed.train(model.training)


class SinkKVCache:
    """The first `num_sinks` positions kept forever, plus 06's ring buffer of the last `window` positions.

    Memory is O(num_sinks + window) however long generation runs (`evicts = True`: generate never refills
    it). update() returns the sinks, then what the ring returns; key_positions gives their absolute
    positions in the same order, so SlidingWindowAttention masks a multi-token chunk exactly. Follows 04's
    KVCache protocol; the ring checks shapes and offsets as 06 does.
    """

    evicts = True

    def __init__(self, num_sinks: int, window: int, dtype: torch.dtype | None = None, device=None):
        _check_int("num_sinks", num_sinks, 0)
        _check_int("window", window, 1)
        self.num_sinks, self.window = num_sinks, window
        self.ring = SlidingWindowKVCache(window, dtype=dtype, device=device)  # positions >= num_sinks
        self.sinks: dict[int, tuple] = {}  # layer -> tensors (B, heads, <= num_sinks, features)
        self.offset = 0

    def update(self, layer_index: int, *tensors: torch.Tensor) -> tuple:
        new = check_new_entries(tensors)
        to_sinks = min(new, max(0, self.num_sinks - self.offset))  # the leading new positions that are sinks
        if to_sinks:
            head = tuple(t[:, :, :to_sinks] for t in tensors)
            held = self.sinks.get(layer_index)
            self.sinks[layer_index] = head if held is None else tuple(
                torch.cat([h, t], dim=2) for h, t in zip(held, head))
        sinks = self.sinks.get(layer_index)
        if to_sinks == new:
            return sinks
        recent = self.ring.update(layer_index, *(t[:, :, to_sinks:] for t in tensors))
        if sinks is None:
            return recent
        return tuple(torch.cat([s.to(r.dtype), r], dim=2) for s, r in zip(sinks, recent))

    def key_positions(self, layer_index: int) -> torch.Tensor:
        sinks = self.sinks.get(layer_index)
        held_sinks = torch.arange(0 if sinks is None else sinks[0].shape[2])
        if layer_index not in self.ring.lengths:
            return held_sinks
        return torch.cat([held_sinks, self.ring.key_positions(layer_index) + self.num_sinks])

    def advance(self, num_new_tokens: int) -> None:
        _check_int("num_new_tokens", num_new_tokens, 0)
        to_ring = num_new_tokens - min(num_new_tokens, max(0, self.num_sinks - self.offset))
        if to_ring:
            self.ring.advance(to_ring)
        self.offset += num_new_tokens

    @property
    def nbytes(self) -> int:
        """Bytes held: the ring's buffers plus the sink tensors."""
        sink_bytes = sum(t.numel() * t.element_size() for held in self.sinks.values() for t in held)
        return self.ring.nbytes + sink_bytes


def attention_score_bytes(batch_size: int, num_heads: int, length: int, window: int | None = None,
                          bytes_per_score: int = 4) -> int:
    """Bytes of the score matrix of one attention layer: B H T^2 for full attention (window None),
    B H n W 2W with n = ceil(T / W) blocks for banded sliding-window attention."""
    _check_int("length", length, 1)
    if window is None:
        return batch_size * num_heads * length * length * bytes_per_score
    _check_int("window", window, 1)
    return batch_size * num_heads * math.ceil(length / window) * window * 2 * window * bytes_per_score
