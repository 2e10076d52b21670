"""Attention from scratch: scaled dot-product, masks, multi-head, and a tiled (flash-style) version.

Every query asks every key "how relevant are you?" and takes the weighted average of their values:

    scores  = q k^T * scale                  scale = 1 / sqrt(d)  (d = head dimension)
    weights = softmax(scores + mask)          each row sums to 1 over the keys it may see
    output  = weights v

Without the 1/sqrt(d) the scores of random unit-variance vectors have variance d, so the softmax
saturates (one-hot rows, vanishing gradients) as d grows.

Multi-head attention projects the input into H heads of size E/H, attends in each head
separately, concatenates the heads and projects back:  MHA(x) = concat_h(attn(x Wq_h, x Wk_h, x Wv_h)) Wo.

The tiled attention never forms the (Tq, Tk) score matrix. It walks over blocks of keys and keeps
three running quantities per query row (the online-softmax recurrence of FlashAttention):

    m_new = max(m, rowmax(S_block))                      running maximum of the scores
    l_new = exp(m - m_new) l + rowsum(exp(S_block - m_new))   running softmax denominator
    acc   = exp(m - m_new) acc + exp(S_block - m_new) V_block  running un-normalised output
    output = acc / l                                      after the last block

Contents, in reading order: causal_mask, padding_mask, scaled_dot_product_attention,
attention_entropy, naive_score_memory_bytes, MultiHeadAttention, tiled_attention.
Mask convention everywhere: a bool mask is True where a query MAY attend (the opposite of
torch.nn.MultiheadAttention's attn_mask, the same as torch's scaled_dot_product_attention).
"""

import math

import torch
import torch.nn as nn


def causal_mask(query_length: int, key_length: int, device=None) -> torch.Tensor:
    """Bool mask (query_length, key_length), True where query i may see key j.

    Aligned to the END of the keys: query i sits at key position key_length - query_length + i,
    which is what a KV cache needs (the new queries are the last positions). torch's SDPA with
    is_causal=True aligns to the top-left instead; the two agree only when the lengths are equal.
    """
    if query_length < 1 or key_length < 1:
        raise ValueError(f"query_length and key_length must be >= 1, got {query_length}, {key_length}")
    if query_length > key_length:
        raise ValueError(f"query_length must be <= key_length for an end-aligned causal mask, "
                         f"got {query_length} > {key_length}")
    query_positions = torch.arange(query_length, device=device) + (key_length - query_length)  # (Tq,)
    key_positions = torch.arange(key_length, device=device)  # (Tk,)
    return key_positions[None, :] <= query_positions[:, None]  # (Tq, Tk)


def padding_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """Bool mask (B, 1, 1, max_length), True for the first lengths[b] (real) tokens of sequence b.

    It broadcasts over heads and queries: no query may attend to a padding key.
    """
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be a 1-D tensor (B,), got shape {tuple(lengths.shape)}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if lengths.numel() and (lengths.min() < 0 or lengths.max() > max_length):
        raise ValueError(f"lengths must be in [0, max_length={max_length}], got min {int(lengths.min())} "
                         f"max {int(lengths.max())}")
    positions = torch.arange(max_length, device=lengths.device)  # (T,)
    return (positions[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes (..., Tq, D), (..., Tk, D), (..., Tk, Dv) with broadcastable leading dims, else ValueError."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., T, D), got shape {tuple(tensor.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last dim (head size), got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    if q.shape[-1] == 0:  # 1/sqrt(0): nothing to compare
        raise ValueError(f"the head dim D of q and k must be >= 1, got q {tuple(q.shape)}")
    # Zero queries is refused like zero keys (as causal_mask does), rather than returning an empty tensor.
    if q.shape[-2] == 0:
        raise ValueError(f"q must hold at least one query (Tq >= 1), got shape {tuple(q.shape)}")
    if k.shape[-2] == 0:  # a softmax over no keys has no value
        raise ValueError(f"k must hold at least one key (Tk >= 1), got shape {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length (dim -2), got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError as error:
        raise ValueError(f"the leading (batch, head) dims of q {tuple(q.shape)}, k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)} do not broadcast") from error


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not (scale > 0 and math.isfinite(scale)):  # inf turns every score into inf or nan
        raise ValueError(f"scale must be a finite number > 0 (or None for 1/sqrt(head_dim)), got {scale}")
    return float(scale)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                                 is_causal: bool = False, scale: float | None = None, return_weights: bool = False):
    """softmax(q k^T * scale + mask) v, written out (the "naive" attention that forms all scores).

    q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv); any leading dims that broadcast work. Tq, Tk
    and D must be >= 1: zero queries, zero keys or D = 0 raise ValueError (never an empty or zero result).
    mask: bool (True = may attend) or additive float, broadcastable to (B, H, Tq, Tk).
    is_causal: also apply causal_mask(Tq, Tk) (end-aligned; see causal_mask).
    Returns output (B, H, Tq, Dv), or (output, weights (B, H, Tq, Tk)) when return_weights.
    A query row whose every key is masked gets all-zero weights and a zero output, never NaN.
    """
    _check_qkv(q, k, v)
    query_length, key_length = q.shape[-2], k.shape[-2]
    scale = _resolve_scale(scale, q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        try:
            torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError as error:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the scores "
                             f"(..., Tq={query_length}, Tk={key_length}) {tuple(scores.shape)}") from error
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask.is_floating_point():
            scores = scores + mask
        else:
            raise ValueError(f"mask must be bool (True = attend) or a float additive mask, got dtype {mask.dtype}")
    if is_causal:
        scores = scores.masked_fill(~causal_mask(query_length, key_length, device=scores.device), float("-inf"))
    # Softmax written out so that fully masked rows give zeros (torch.softmax would give NaN there).
    row_max = scores.amax(dim=-1, keepdim=True)  # (B, H, Tq, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    unnormalised = torch.exp(scores - row_max)  # subtracting the max keeps exp() from overflowing
    denominator = unnormalised.sum(dim=-1, keepdim=True)
    safe_denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    weights = unnormalised / safe_denominator  # (B, H, Tq, Tk)
    output = weights @ v  # (B, H, Tq, Dv)
    return (output, weights) if return_weights else output


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each attention row: (..., Tq, Tk) -> (..., Tq). 0 = one-hot, log(Tk) = uniform."""
    return -(weights * torch.log(weights.clamp_min(1e-30))).sum(dim=-1)


def naive_score_memory_bytes(batch_size: int, num_heads: int, query_length: int, key_length: int | None = None,
                             bytes_per_element: int = 4) -> int:
    """Closed-form size of the score matrix the naive attention materialises: B * H * Tq * Tk * bytes."""
    key_length = query_length if key_length is None else key_length
    return batch_size * num_heads * query_length * key_length * bytes_per_element


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (B, T, E) -> (B, T, E).

    The weights are laid out like torch.nn.MultiheadAttention(batch_first=True): its in_proj_weight
    (3E, E) is [Wq; Wk; Wv] and out_proj is out_proj; see copy_from_torch.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        if embed_dim < 1 or num_heads < 1:
            raise ValueError(f"embed_dim and num_heads must be >= 1, got {embed_dim}, {num_heads}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, E) -> (B, H, T, E/H)."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False, return_weights: bool = False):
        """query (B, Tq, E), key and value (B, Tk, E) -> (B, Tq, E) [and weights (B, H, Tq, Tk)].

        mask: bool (True = may attend) or additive float, broadcastable to (B, H, Tq, Tk).
        """
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            if tensor.dim() != 3 or tensor.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} must have shape (B, T, embed_dim={self.embed_dim}), "
                                 f"got {tuple(tensor.shape)}")
        if key.shape[:2] != value.shape[:2] or query.shape[0] != key.shape[0]:
            raise ValueError(f"query, key and value must share the batch size and key/value the length, got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        q = self.split_heads(self.q_proj(query))  # (B, H, Tq, D)
        k = self.split_heads(self.k_proj(key))  # (B, H, Tk, D)
        v = self.split_heads(self.v_proj(value))  # (B, H, Tk, D)
        heads, weights = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, return_weights=True)
        batch, _, query_length, _ = heads.shape
        merged = heads.transpose(1, 2).reshape(batch, query_length, self.embed_dim)  # (B, Tq, E)
        output = self.out_proj(merged)
        return (output, weights) if return_weights else output

    @torch.no_grad()
    def copy_from_torch(self, reference: nn.MultiheadAttention) -> "MultiHeadAttention":
        """Copy the weights of a torch.nn.MultiheadAttention of the same size (same q/k/v dims)."""
        if reference.embed_dim != self.embed_dim or reference.num_heads != self.num_heads:
            raise ValueError(f"reference must have embed_dim={self.embed_dim} and num_heads={self.num_heads}, "
                             f"got {reference.embed_dim} and {reference.num_heads}")
        if reference.in_proj_weight is None:
            raise ValueError("reference must use a packed in_proj_weight (kdim == vdim == embed_dim)")
        for projection, weight in zip((self.q_proj, self.k_proj, self.v_proj), reference.in_proj_weight.chunk(3)):
            projection.weight.copy_(weight)
        self.out_proj.weight.copy_(reference.out_proj.weight)
        if self.q_proj.bias is not None:
            for projection, bias in zip((self.q_proj, self.k_proj, self.v_proj), reference.in_proj_bias.chunk(3)):
                projection.bias.copy_(bias)
            self.out_proj.bias.copy_(reference.out_proj.bias)
        return self


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, block_size: int = 64,
                    scale: float | None = None) -> torch.Tensor:
    """The same result as scaled_dot_product_attention, block by block, never forming the (Tq, Tk) matrix.

    Queries and keys are cut into blocks of block_size; only a (block, block) tile of scores exists
    at a time, combined with the online-softmax recurrence in the module docstring. With is_causal,
    key blocks entirely in a query block's future are skipped (the work saving of FlashAttention).
    The statistics are kept in float32 for half-precision inputs. Autograd works through the loop but
    stores every tile for the backward pass; FlashAttention instead recomputes them. Shapes and bad
    arguments as in scaled_dot_product_attention (zero queries or keys raise ValueError).
    """
    _check_qkv(q, k, v)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    query_length, key_length = q.shape[-2], k.shape[-2]
    if is_causal and query_length > key_length:
        raise ValueError(f"query_length must be <= key_length with is_causal, got {query_length} > {key_length}")
    scale = _resolve_scale(scale, q.shape[-1])
    work_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    leading = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    shift = key_length - query_length  # query i sits at key position shift + i (end-aligned, as causal_mask)
    output_blocks = []
    for q_start in range(0, query_length, block_size):
        q_block = q[..., q_start:q_start + block_size, :].to(work_dtype)  # (B, H, bq, D)
        rows = q_block.shape[-2]
        running_max = torch.full((*leading, rows, 1), float("-inf"), dtype=work_dtype, device=q.device)
        running_sum = torch.zeros((*leading, rows, 1), dtype=work_dtype, device=q.device)
        accumulator = torch.zeros((*leading, rows, v.shape[-1]), dtype=work_dtype, device=q.device)
        last_visible_key = shift + q_start + rows - 1  # the block's last query sees keys up to here
        key_stop = min(key_length, last_visible_key + 1) if is_causal else key_length
        for k_start in range(0, key_stop, block_size):
            k_block = k[..., k_start:k_start + block_size, :].to(work_dtype)  # (B, H, bk, D)
            v_block = v[..., k_start:k_start + block_size, :].to(work_dtype)  # (B, H, bk, Dv)
            scores = (q_block @ k_block.transpose(-2, -1)) * scale  # (B, H, bq, bk): the only scores alive
            if is_causal and k_start + k_block.shape[-2] - 1 > shift + q_start:  # tile crosses the diagonal
                query_positions = torch.arange(rows, device=q.device) + shift + q_start
                key_positions = torch.arange(k_block.shape[-2], device=q.device) + k_start
                scores = scores.masked_fill(key_positions[None, :] > query_positions[:, None], float("-inf"))
            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))  # (B, H, bq, 1)
            safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            correction = torch.exp(running_max - safe_max)  # rescales what was summed under the old max
            probabilities = torch.exp(scores - safe_max)  # (B, H, bq, bk), un-normalised
            running_sum = correction * running_sum + probabilities.sum(dim=-1, keepdim=True)
            accumulator = correction * accumulator + probabilities @ v_block
            running_max = new_max
        safe_sum = torch.where(running_sum > 0, running_sum, torch.ones_like(running_sum))
        output_blocks.append(accumulator / safe_sum)  # (B, H, bq, Dv)
    return torch.cat(output_blocks, dim=-2).to(q.dtype)  # (B, H, Tq, Dv)
