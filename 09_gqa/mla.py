"""Multi-head latent attention (DeepSeek-V2): cache one small latent per token instead of H keys and values.

For a token with residual input x (E), H heads, latent rank d_c and RoPE head dim d_rope:

    c_kv   = RMSNorm(W_dkv x)                         (d_c)     the latent                       -> cached
    k_rope = RoPE(W_kr x)                             (d_rope)  one RoPE key shared by all heads -> cached
    k_h    = [W_uk,h c_kv ; k_rope]    v_h = W_uv,h c_kv        keys (d_nope + d_rope), values (d_v) of head h
    q_h    = [W_q,h x ; RoPE(W_qr,h x)]                         (with query compression x -> RMSNorm(W_dq x))
    o_h    = softmax(q_h . k_h / sqrt(d_nope + d_rope)) v_h,    y = W_o [o_1 ... o_H]

so a token costs d_c + d_rope cached numbers per layer, against 2 H D for multi-head attention.

Absorbed path. q_h^nope . (W_uk,h c) = (W_uk,h^T q_h^nope) . c, and W_o,h (W_uv,h o) = (W_o,h W_uv,h) o, so
with the query weights folded to W_uk,h^T W_q,h and the output weights to W_o,h W_uv,h, every head attends
with keys [c_kv ; k_rope] and values c_kv themselves: multi-query attention over the cached latent, one
SDPA call, and nothing is ever up-projected. Why the RoPE part is separate: a position-dependent rotation
between W_q and W_uk (q^T R(m)^T R(n) W_uk c) would stop W_uk from folding into the query; only the d_rope
extra dimensions are rotated, and their key is shared by all heads so it is cached once.

Contents, in reading order: LatentKVCache (the cache that holds c_kv and k_rope); MultiHeadLatentAttention
(naive and absorbed paths, plugged into 04 through register_attention); mla_factory / register_mla (the
factory with the variant settings); use_absorbed_path (switch every MLA layer of a model).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import scaled_dot_product_attention
from positional_embeddings import apply_rope
from transformer import (AttentionContext, check_batch_indices, mark_residual_projection, position_mask,
                         register_attention)

LATENT_NORM_EPS = 1e-6  # DeepSeek's RMSNorm default for the latent norms (q_a_layernorm, kv_a_layernorm)


class LatentKVCache:
    """The KV cache of MLA (04's KVCache protocol): per layer the latent c_kv (B, 1, T, d_c) and the shared
    RoPE key k_rope (B, 1, T, d_rope), grown with torch.cat. 04's ConcatKVCache cannot hold them: it needs
    keys and values of one shape, and d_c != d_rope (d_rope may even be 0)."""

    def __init__(self):
        self.offset = 0
        self.latents: dict = {}
        self.rope_keys: dict = {}

    def update(self, layer_index: int, latent, rope_key):
        """Append c_kv (B, 1, T_new, d_c) and k_rope (B, 1, T_new, d_rope); return the layer's whole history."""
        if latent.dim() != 4 or rope_key.dim() != 4 or latent.shape[:3] != rope_key.shape[:3]:
            raise ValueError(f"latent and rope_key must be (B, 1, T_new, d) with equal B, 1, T_new, got "
                             f"{tuple(latent.shape)} and {tuple(rope_key.shape)}")
        if layer_index in self.latents:
            held = self.latents[layer_index]
            if held.shape[2] != self.offset:
                raise ValueError(f"cache offset ({self.offset}) disagrees with the {held.shape[2]} positions held "
                                 f"for layer {layer_index}: start a new LatentKVCache()")
            if (held.shape[0], held.shape[3], self.rope_keys[layer_index].shape[3]) != \
                    (latent.shape[0], latent.shape[3], rope_key.shape[3]):
                raise ValueError(f"new entries {tuple(latent.shape)}, {tuple(rope_key.shape)} do not continue the "
                                 f"cached {tuple(held.shape)}, {tuple(self.rope_keys[layer_index].shape)}")
            latent = torch.cat([held, latent], dim=2)
            rope_key = torch.cat([self.rope_keys[layer_index], rope_key], dim=2)
        elif self.offset != 0:
            raise ValueError(f"layer {layer_index} has nothing cached but the cache offset is {self.offset}")
        self.latents[layer_index], self.rope_keys[layer_index] = latent, rope_key
        return latent, rope_key

    def key_positions(self, layer_index: int) -> torch.Tensor:
        return torch.arange(self.latents[layer_index].shape[2])

    def advance(self, num_new_tokens: int) -> None:
        self.offset += num_new_tokens

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Row b becomes the old row batch_indices[b] (B,) in every layer (beam search, 05)."""
        if not self.latents:
            return
        check_batch_indices(batch_indices, next(iter(self.latents.values())).shape[0])
        for store in (self.latents, self.rope_keys):
            for layer_index, held in store.items():
                store[layer_index] = held.index_select(0, batch_indices)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2 attention: a low-rank latent KV, a decoupled RoPE key, optional query compression.

    Parameter names follow Hugging Face's DeepseekV3Attention one to one (query or query_down/query_norm/
    query_up = q_proj or q_a_proj/q_a_layernorm/q_b_proj; kv_down = kv_a_proj_with_mqa; kv_norm =
    kv_a_layernorm; kv_up = kv_b_proj; out = o_proj), with the same per-head layouts: query rows per head
    [nope ; rope], kv_up rows per head [k_nope ; v], kv_down rows [c_kv ; k_rope].
    RoPE is used exactly when config.position == "rope" (then rope_head_dim must be > 0, else 0).
    """

    cache_factory = LatentKVCache  # MiniFormer.new_cache() builds this kind: c_kv and k_rope, not k and v

    def __init__(self, config, layer_index: int, kv_rank: int, rope_head_dim: int, query_rank: int | None = None,
                 nope_head_dim: int | None = None, value_head_dim: int | None = None, absorbed: bool = False):
        super().__init__()
        if config.position == "alibi":
            raise ValueError("position='alibi' is not supported by MLA (use 'rope', 'learned', 'sinusoidal' or 'none')")
        if config.position == "rope" and rope_head_dim == 0:
            raise ValueError("rope_head_dim must be > 0 with position='rope' (the decoupled RoPE key), got 0")
        if config.position != "rope" and rope_head_dim != 0:
            raise ValueError(f"rope_head_dim must be 0 unless position='rope' (got {rope_head_dim} with "
                             f"position={config.position!r})")
        self.layer_index = layer_index
        self.num_heads = H = config.num_heads
        self.kv_rank, self.rope_head_dim, self.query_rank = kv_rank, rope_head_dim, query_rank
        self.nope_head_dim = nope_head_dim or config.head_dim
        self.value_head_dim = value_head_dim or config.head_dim
        self.query_head_dim = self.nope_head_dim + rope_head_dim
        E = config.embed_dim
        if query_rank is None:
            self.query = nn.Linear(E, H * self.query_head_dim, bias=False)
        else:
            self.query_down = nn.Linear(E, query_rank, bias=config.bias)
            self.query_norm = nn.RMSNorm(query_rank, eps=LATENT_NORM_EPS)
            self.query_up = nn.Linear(query_rank, H * self.query_head_dim, bias=False)
        self.kv_down = nn.Linear(E, kv_rank + rope_head_dim, bias=config.bias)
        self.kv_norm = nn.RMSNorm(kv_rank, eps=LATENT_NORM_EPS)
        self.kv_up = nn.Linear(kv_rank, H * (self.nope_head_dim + self.value_head_dim), bias=False)
        self.out = mark_residual_projection(nn.Linear(H * self.value_head_dim, E, bias=config.bias))
        self.rope_base, self.rope_layout = config.rope_base, config.rope_layout
        self.scale = 1.0 / math.sqrt(self.query_head_dim)  # of the true q . k, in both paths
        self.absorbed = absorbed
        self._folded, self._folded_key = None, None

    # ---- shared by both paths --------------------------------------------------------------------------
    def query_input(self, x):
        """What the query projection reads: x (B, T, E), or the normalised query latent (B, T, d_q)."""
        return x if self.query_rank is None else self.query_norm(self.query_down(x))

    def query_weight(self):
        return self.query.weight if self.query_rank is None else self.query_up.weight

    def forward(self, x, context: AttentionContext):
        """x (B, T, E) -> (y (B, T, E), weights (B, H, T, T_keys) or None)."""
        B, T, _ = x.shape
        latent, rope_key = self.kv_down(x).split([self.kv_rank, self.rope_head_dim], dim=-1)
        latent = self.kv_norm(latent).unsqueeze(1)  # (B, 1, T, d_c)
        rope_key = rope_key.unsqueeze(1)  # (B, 1, T, d_rope)
        if self.rope_head_dim:
            rope_key = apply_rope(rope_key, offset=context.offset, base=self.rope_base, layout=self.rope_layout)
        if context.kv_cache is not None:
            latent, rope_key = context.kv_cache.update(self.layer_index, latent, rope_key)  # (B, 1, T_keys, .)
        attend = self.attend_absorbed if self.absorbed else self.attend_naive
        return attend(x, latent, rope_key, context)

    def rotate_query(self, q_rope, context: AttentionContext):
        if not self.rope_head_dim:
            return q_rope
        return apply_rope(q_rope, offset=context.offset, base=self.rope_base, layout=self.rope_layout)

    def attention(self, q, k, v, context: AttentionContext):
        """softmax(q k^T * scale + mask) v; k, v may have 1 head (multi-query). -> (out, weights or None)."""
        mask = self.mask(q.shape[2], context, q.device)
        cache = context.kv_cache
        observe = cache is not None and hasattr(cache, "observe_attention")
        if context.need_weights or observe:
            out, weights = scaled_dot_product_attention(q, k.expand(-1, q.shape[1], -1, -1),
                                                        v.expand(-1, q.shape[1], -1, -1), mask=mask,
                                                        is_causal=mask is None and cache is None and q.shape[2] > 1,
                                                        scale=self.scale, return_weights=True)
            if observe:
                cache.observe_attention(self.layer_index, weights)
            return out, weights if context.need_weights else None
        if k.shape[1] == q.shape[1]:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                  is_causal=mask is None and cache is None and q.shape[2] > 1), None
        # Multi-query: one key/value head for all H query heads, so the heads can become query rows of a
        # single-head attention, (B, H, T, .) -> (B, 1, H*T, .), row h*T + t = query t of head h. (Faster on
        # CPU than SDPA's enable_gqa, which expands the keys to H heads.)
        B, H, T, _ = q.shape
        if mask is None and T > 1:  # no cache: the causal rule must be spelled out per row
            mask = position_mask(torch.arange(T, device=q.device), torch.arange(T, device=q.device))
        if mask is not None:
            mask = mask.repeat(H, 1)  # (H*T, T_keys)
        out = F.scaled_dot_product_attention(q.reshape(B, 1, H * T, -1), k, v, attn_mask=mask, scale=self.scale)
        return out.view(B, H, T, -1), None

    def mask(self, query_length: int, context: AttentionContext, device):
        """None when SDPA's is_causal (no cache) or nothing (one new token) is the rule, else from positions."""
        cache = context.kv_cache
        if cache is None or query_length == 1:
            return None
        queries = context.query_positions(query_length, device)
        return position_mask(queries, cache.key_positions(self.layer_index).to(device))

    # ---- naive path: up-project every cached latent to per-head keys and values ------------------------
    def attend_naive(self, x, latent, rope_key, context: AttentionContext):
        B, T, _ = x.shape
        H, d_nope, d_v = self.num_heads, self.nope_head_dim, self.value_head_dim
        q = F.linear(self.query_input(x), self.query_weight()).view(B, T, H, self.query_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([d_nope, self.rope_head_dim], dim=-1)  # (B, H, T, d_nope), (B, H, T, d_rope)
        q = torch.cat([q_nope, self.rotate_query(q_rope, context)], dim=-1)  # (B, H, T, d_nope + d_rope)
        T_keys = latent.shape[2]
        kv = self.kv_up(latent[:, 0]).view(B, T_keys, H, d_nope + d_v).transpose(1, 2)  # (B, H, T_keys, .)
        k_nope, v = kv.split([d_nope, d_v], dim=-1)
        k = torch.cat([k_nope, rope_key.expand(-1, H, -1, -1)], dim=-1)  # (B, H, T_keys, d_nope + d_rope)
        out, weights = self.attention(q, k, v, context)  # (B, H, T, d_v)
        return self.out(out.transpose(1, 2).reshape(B, T, H * d_v)), weights

    # ---- absorbed path: attend over the latent itself ----------------------------------------------------
    def folded_weights(self):
        """(query weight (H * (d_c + d_rope), d_in) with W_uk folded in, output weight (E, H * d_c) with W_uv
        folded in). Recomputed when any source weight changes (in place or moved), kept otherwise."""
        sources = (self.query_weight(), self.kv_up.weight, self.out.weight)
        key = tuple((p.data_ptr(), p._version) for p in sources)
        if self._folded is not None and key == self._folded_key and not torch.is_grad_enabled():
            return self._folded
        H, d_nope, d_v, d_c = self.num_heads, self.nope_head_dim, self.value_head_dim, self.kv_rank
        query_weight, up_weight, out_weight = sources
        w_q = query_weight.view(H, self.query_head_dim, -1)  # (H, d_nope + d_rope, d_in)
        w_q_nope, w_q_rope = w_q.split([d_nope, self.rope_head_dim], dim=1)
        w_uk, w_uv = up_weight.view(H, d_nope + d_v, d_c).split([d_nope, d_v], dim=1)  # (H, d_nope | d_v, d_c)
        w_q_latent = torch.einsum("hnc,hni->hci", w_uk, w_q_nope)  # (H, d_c, d_in): W_uk,h^T W_q,h
        folded_query = torch.cat([w_q_latent, w_q_rope], dim=1).reshape(H * (d_c + self.rope_head_dim), -1)
        folded_out = torch.einsum("ehv,hvc->ehc", out_weight.view(-1, H, d_v), w_uv).reshape(-1, H * d_c)
        folded = (folded_query, folded_out)
        if not torch.is_grad_enabled():
            self._folded, self._folded_key = folded, key
        return folded

    def attend_absorbed(self, x, latent, rope_key, context: AttentionContext):
        B, T, _ = x.shape
        H, d_c = self.num_heads, self.kv_rank
        folded_query, folded_out = self.folded_weights()
        q = F.linear(self.query_input(x), folded_query).view(B, T, H, d_c + self.rope_head_dim).transpose(1, 2)
        q_latent, q_rope = q.split([d_c, self.rope_head_dim], dim=-1)  # (B, H, T, d_c), (B, H, T, d_rope)
        q = torch.cat([q_latent, self.rotate_query(q_rope, context)], dim=-1)  # (B, H, T, d_c + d_rope)
        k = torch.cat([latent, rope_key], dim=-1)  # (B, 1, T_keys, d_c + d_rope): one key head for all heads
        out, weights = self.attention(q, k, latent, context)  # values = the latent: (B, H, T, d_c)
        return F.linear(out.transpose(1, 2).reshape(B, T, H * d_c), folded_out, self.out.bias), weights


def _check_size(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def mla_factory(kv_rank: int, rope_head_dim: int, query_rank: int | None = None, nope_head_dim: int | None = None,
                value_head_dim: int | None = None, absorbed: bool = False):
    """A factory(config, layer_index) for 04's register_attention that builds MLA with these settings.
    nope_head_dim and value_head_dim default to the config's head_dim (embed_dim / num_heads)."""
    _check_size("kv_rank", kv_rank, 1)
    _check_size("rope_head_dim", rope_head_dim, 0)
    if rope_head_dim % 2:
        raise ValueError(f"rope_head_dim must be even (RoPE rotates pairs), got {rope_head_dim}")
    for name, value in (("query_rank", query_rank), ("nope_head_dim", nope_head_dim),
                        ("value_head_dim", value_head_dim)):
        if value is not None:
            _check_size(name, value, 1)

    def factory(config, layer_index: int):
        return MultiHeadLatentAttention(config, layer_index, kv_rank, rope_head_dim, query_rank, nope_head_dim,
                                        value_head_dim, absorbed)

    return factory


def register_mla(kv_rank: int, rope_head_dim: int, query_rank: int | None = None, nope_head_dim: int | None = None,
                 value_head_dim: int | None = None) -> str:
    """Register MLA with these settings under a name derived from them and return that name, for
    TransformerConfig(attention_module=name). Registering the same settings twice is harmless."""
    factory = mla_factory(kv_rank, rope_head_dim, query_rank, nope_head_dim, value_head_dim)
    name = f"mla-c{kv_rank}-r{rope_head_dim}-q{query_rank or 0}-n{nope_head_dim or 0}-v{value_head_dim or 0}"
    register_attention(name, factory)
    return name


def use_absorbed_path(model: nn.Module, absorbed: bool = True) -> nn.Module:
    """Switch every MLA layer of `model` to the absorbed (True) or naive (False) path; returns the model."""
    if not isinstance(absorbed, bool):
        raise ValueError(f"absorbed must be True or False, got {absorbed!r}")
    layers = [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)]
    if not layers:
        raise ValueError("model has no MultiHeadLatentAttention layer")
    for layer in layers:
        layer.absorbed = absorbed
    return model
