"""The transformer block and the "mini-former": the decoder-only model every later topic reuses.

A block reads the residual stream x (B, T, E) and adds two updates to it. Pre-norm (GPT-2, Llama):

    x = x + Attention(Norm1(x))          every position mixes in information from earlier positions
    x = x + FeedForward(Norm2(x))        every position is transformed on its own
    logits = Head(FinalNorm(x))

Post-norm (the original 2017 Transformer) normalises after the addition instead:
x = Norm1(x + Attention(x)); x = Norm2(x + FeedForward(x)), with no final norm.

Attention, per head h with q, k, v = x W_q, x W_k, x W_v:  softmax(q k^T / sqrt(D) + mask) v, where the
mask lets the query at absolute position i read the key at position j only when j <= i.
Grouped-query attention lets H query heads share H_kv <= H key/value heads (H_kv = H is ordinary
multi-head attention, H_kv = 1 is multi-query attention), which shrinks the KV cache by H / H_kv.

Everything that later topics swap is a config field backed by a registry or a seam:
  norm (register_norm), feed-forward (register_ffn), attention module (register_attention: 07's windowed
  attention, 09's MLA), position encoding (02), attention kernel (torch SDPA / 03's from-scratch
  attention), number of KV heads, and the KV cache, any object with the KVCache protocol below (06's
  caches). Modules that write into the residual stream call mark_residual_projection on their output
  layer so the depth-scaled initialisation finds them whatever they are called.

Contents, in reading order: the config; the registries and the two built-in feed-forwards; the KV-cache
protocol and the attention mask from positions; attention; the block; MiniFormer (forward, attention
weights, logit lens, the project's one generation loop); ConcatKVCache, the simplest cache.
Hugging Face interop lives in hf_interop.py, the standard lab model and its data in lab.py.
"""

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import scaled_dot_product_attention
from positional_embeddings import LearnedPositionalEmbedding, alibi_slopes, apply_rope, sinusoidal_encoding

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORM_PLACEMENTS = ("pre", "post")
ATTENTIONS = ("sdpa", "scratch")
ROPE_LAYOUTS = ("half", "interleaved")
GELU_APPROXIMATIONS = ("none", "tanh")

# Registries: name -> factory. Later topics add their own layers here (10: norms and FFNs, 07 and 09:
# attention modules, 08: a mixture-of-experts FFN); variant-only settings go into the factory.
_NORMS: dict = {}
_FFNS: dict = {}
_ATTENTIONS: dict = {}


def _register(registry: dict, kind: str, name: str, factory) -> None:
    if not isinstance(name, str) or not name or not callable(factory):
        raise ValueError(f"register_{kind} needs a non-empty name and a callable factory, got {name!r}, {factory!r}")
    registry[name] = factory


def register_norm(name: str, factory) -> None:
    """Make `TransformerConfig(norm=name)` build `factory(dim, eps)` (an nn.Module keeping the shape)."""
    _register(_NORMS, "norm", name, factory)


def register_ffn(name: str, factory) -> None:
    """Make `TransformerConfig(ffn=name)` build `factory(config)` (an nn.Module (B, T, E) -> (B, T, E))."""
    _register(_FFNS, "ffn", name, factory)


def register_attention(name: str, factory) -> None:
    """Make `TransformerConfig(attention_module=name)` build `factory(config, layer_index)`: an nn.Module
    with CausalSelfAttention's forward(x, context) -> (y, weights or None) (subclassing it is easiest)."""
    _register(_ATTENTIONS, "attention", name, factory)


def unregister(kind: str, name: str) -> None:
    """Remove a registered norm / ffn / attention (tests use it to leave the registries as they found them)."""
    registry = {"norm": _NORMS, "ffn": _FFNS, "attention": _ATTENTIONS}.get(kind)
    if registry is None or name not in registry:
        raise ValueError(f"no registered {kind!r} named {name!r}")
    del registry[name]


def mark_residual_projection(layer: nn.Linear) -> nn.Linear:
    """Tag a layer whose output is added to the residual stream: MiniFormer initialises its weight with the
    depth-scaled std 0.02 / sqrt(2 * num_layers) (see MiniFormer._init_weights). Returns the layer."""
    layer.writes_residual_stream = True
    return layer


@dataclass
class TransformerConfig:
    vocab_size: int
    context_length: int
    num_layers: int
    num_heads: int
    embed_dim: int
    num_kv_heads: int | None = None  # None = num_heads (plain multi-head attention)
    ffn_hidden_size: int | None = None  # None = 4 * embed_dim for "gelu", the 2/3 rule for "swiglu"
    norm: str = "layernorm"  # "layernorm" | "rmsnorm" | "none" | any name given to register_norm
    ffn: str = "gelu"  # "gelu" | "swiglu" | any name given to register_ffn
    position: str = "learned"  # one of POSITIONS
    norm_placement: str = "pre"  # "pre" | "post"
    residual: bool = True  # False only for the ablation that removes the skip connections
    dropout: float = 0.0  # on the embedding and on each residual update (not on attention weights)
    bias: bool = True  # biases of the linear layers (LayerNorm keeps its own shift)
    tie_weights: bool = True  # output head shares the token embedding matrix
    rope_base: float = 10000.0
    rope_layout: str = "half"  # "half" (Llama / Hugging Face) | "interleaved" (RoFormer)
    norm_eps: float = 1e-5
    attention: str = "sdpa"  # kernel: "sdpa" = torch.nn.functional.scaled_dot_product_attention | "scratch" = 03's
    attention_module: str = "causal"  # "causal" = CausalSelfAttention | any name given to register_attention
    gelu_approximate: str = "none"  # "none" = exact erf GELU | "tanh" = GPT-2's gelu_new

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "num_layers", "num_heads", "embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_kv_heads is not None and (isinstance(self.num_kv_heads, bool) or not isinstance(self.num_kv_heads, int)
                                              or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_kv_heads must be an integer >= 1 that divides num_heads ({self.num_heads}), "
                             f"got {self.num_kv_heads!r}")
        if self.ffn_hidden_size is not None and (not isinstance(self.ffn_hidden_size, int) or self.ffn_hidden_size < 1):
            raise ValueError(f"ffn_hidden_size must be an integer >= 1 or None, got {self.ffn_hidden_size!r}")
        choices = {"norm": tuple(_NORMS), "ffn": tuple(_FFNS), "position": POSITIONS,
                   "norm_placement": NORM_PLACEMENTS, "attention": ATTENTIONS, "rope_layout": ROPE_LAYOUTS,
                   "gelu_approximate": GELU_APPROXIMATIONS, "attention_module": tuple(_ATTENTIONS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:  # NaN fails this comparison too
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.rope_base) and self.rope_base > 1):
            raise ValueError(f"rope_base must be a finite number > 1, got {self.rope_base}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be a finite number > 0, got {self.norm_eps}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' needs an even head_dim (embed_dim / num_heads), got {self.head_dim}")
        if self.position == "sinusoidal" and self.embed_dim % 2:
            raise ValueError(f"position='sinusoidal' needs an even embed_dim, got {self.embed_dim}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def resolved_ffn_hidden_size(self) -> int:
        """ffn_hidden_size, or its default: the 2/3 rule for SwiGLU (three matrices with the parameters of a
        4x MLP's two), 4 * embed_dim otherwise."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return int(2 * 4 * self.embed_dim / 3) if self.ffn == "swiglu" else 4 * self.embed_dim


# ---------------------------------------------------------------------------------------------------
# Norms and feed-forwards built from torch's own layers (10_normalization writes them from scratch)
# ---------------------------------------------------------------------------------------------------

class TorchGeluMLP(nn.Module):
    """GPT-2's feed-forward from torch's F.gelu: E -> hidden -> GELU -> E."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.resolved_ffn_hidden_size
        self.up = nn.Linear(config.embed_dim, hidden, bias=config.bias)
        self.down = mark_residual_projection(nn.Linear(hidden, config.embed_dim, bias=config.bias))
        self.approximate = config.gelu_approximate

    def forward(self, x):  # (B, T, E)
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class TorchSwiGLU(nn.Module):
    """Llama's feed-forward from torch's F.silu: down(silu(gate(x)) * up(x)); the gate decides, per feature,
    how much of up passes."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.resolved_ffn_hidden_size
        self.gate = nn.Linear(config.embed_dim, hidden, bias=config.bias)
        self.up = nn.Linear(config.embed_dim, hidden, bias=config.bias)
        self.down = mark_residual_projection(nn.Linear(hidden, config.embed_dim, bias=config.bias))

    def forward(self, x):  # (B, T, E)
        return self.down(F.silu(self.gate(x)) * self.up(x))


register_norm("layernorm", lambda dim, eps: nn.LayerNorm(dim, eps=eps))
register_norm("rmsnorm", lambda dim, eps: nn.RMSNorm(dim, eps=eps))
register_norm("none", lambda dim, eps: nn.Identity())  # for the "no normalisation" ablation
register_ffn("gelu", TorchGeluMLP)
register_ffn("swiglu", TorchSwiGLU)


# ---------------------------------------------------------------------------------------------------
# The KV-cache protocol and the mask built from positions
# ---------------------------------------------------------------------------------------------------

class KVCache(Protocol):
    """What MiniFormer needs from a KV cache (ConcatKVCache below; 06 and 09 add others).

    offset        number of tokens processed so far = absolute position of the next token.
    update        called once per layer per forward with this step's tensors, e.g. k, v (B, H_kv, T_new, D)
                  (MLA's latent cache takes c_kv and the RoPE key instead); returns what attention reads:
                  every held entry of that layer, along dim 2.
    key_positions absolute positions (T_held,) of what update() just returned, in the same order: a
                  ring buffer or a heavy-hitter cache holds keys that do not start at 0.
    advance       called once after the forward with the number of new tokens.
    Optional: `evicts = True` (the cache drops old keys itself, so generation never refills it),
    `observe_attention(layer_index, weights)` (the cache sees each step's attention weights (B, H, T, T_held))
    and `reorder(batch_indices)` (row b continues from row batch_indices[b]: beam search, 05).
    An attention module whose cache holds something else than k and v names its cache class in a
    `cache_factory` attribute; MiniFormer.new_cache() builds that kind by default.
    """

    offset: int

    def update(self, layer_index: int, *tensors: torch.Tensor) -> tuple: ...

    def key_positions(self, layer_index: int) -> torch.Tensor: ...

    def advance(self, num_new_tokens: int) -> None: ...


def check_batch_indices(batch_indices, batch_size: int) -> torch.Tensor:
    """A cache's reorder() argument: a LongTensor (batch_size,) of rows in 0 .. batch_size - 1."""
    if not isinstance(batch_indices, torch.Tensor) or batch_indices.dtype != torch.long or \
            batch_indices.shape != (batch_size,):
        raise ValueError(f"batch_indices must be a LongTensor of shape ({batch_size},), got {batch_indices!r}")
    if batch_size and not (0 <= int(batch_indices.min()) and int(batch_indices.max()) < batch_size):
        raise ValueError(f"batch_indices must lie in 0 .. {batch_size - 1}, got {batch_indices.tolist()}")
    return batch_indices


def position_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, alibi: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The attention mask from absolute positions: (Tq,) and (Tk,) -> (Tq, Tk) bool (True = may attend,
    i.e. key position <= query position), or with ALiBi slopes (H,) the float bias -m_h * (i - j) with -inf
    on future keys, shape (H, Tq, Tk)."""
    allowed = key_positions[None, :] <= query_positions[:, None]  # (Tq, Tk)
    if alibi is None:
        return allowed
    distance = (key_positions[None, :] - query_positions[:, None]).to(dtype)  # (Tq, Tk), <= 0 in the past
    bias = alibi.to(dtype)[:, None, None] * distance  # (H, Tq, Tk)
    return bias.masked_fill(~allowed, float("-inf"))


@dataclass
class AttentionContext:
    """What the model hands every attention module besides x (the same for every layer of one forward)."""

    offset: int  # absolute position of x's first token
    kv_cache: object | None = None  # an object with the KVCache protocol, or None
    alibi_slopes: torch.Tensor | None = None  # (H,) when position == "alibi"
    need_weights: bool = False  # also return the attention weights (B, H, T, T_keys)

    def query_positions(self, length: int, device) -> torch.Tensor:
        return torch.arange(self.offset, self.offset + length, device=device)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped KV heads, optional RoPE and an optional KV cache.

    One fused projection gives q (H heads) and k, v (H_kv heads each); each group of H / H_kv query heads
    reads the same key/value head. The cache stores the H_kv heads (that is the memory GQA saves).
    `scale` None means 1/sqrt(D); 03's demo sets another value to break the model on purpose.
    """

    def __init__(self, config: TransformerConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        self.qkv = nn.Linear(config.embed_dim, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                             bias=config.bias)
        self.out = mark_residual_projection(nn.Linear(config.embed_dim, config.embed_dim, bias=config.bias))
        self.use_rope = config.position == "rope"
        self.rope_base, self.rope_layout = config.rope_base, config.rope_layout
        self.use_sdpa = config.attention == "sdpa"
        self.scale: float | None = None

    def forward(self, x, context: AttentionContext):
        """x (B, T, E) -> (y (B, T, E), weights (B, H, T, T_keys) or None)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                                     self.num_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if self.use_rope:  # keys are rotated before caching, so cached keys keep their absolute positions
            q = apply_rope(q, offset=context.offset, base=self.rope_base, layout=self.rope_layout)
            k = apply_rope(k, offset=context.offset, base=self.rope_base, layout=self.rope_layout)
        cache = context.kv_cache
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, H_kv, T_keys, D)
        y, weights = self.attend(q, k, v, context)
        return self.out(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)), weights

    def attend(self, q, k, v, context: AttentionContext):
        """softmax(q k^T * scale + mask) v for q (B, H, T, D) and k, v (B, H_kv, T_keys, D)."""
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T_keys, D)
        mask = self.mask(q.shape[2], context, q.device, q.dtype)
        is_causal = mask is None and context.kv_cache is None and q.shape[2] > 1  # the fast path of a plain forward
        cache = context.kv_cache
        observe = cache is not None and hasattr(cache, "observe_attention")
        if context.need_weights or observe:
            y, weights = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=self.scale,
                                                      return_weights=True)
            if observe:
                cache.observe_attention(self.layer_index, weights)
            return y, weights if context.need_weights else None
        if self.use_sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale), None
        return scaled_dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=self.scale), None

    def mask(self, query_length: int, context: AttentionContext, device, dtype):
        """None when causality alone is the rule and SDPA can apply it (no cache: is_causal; one new token
        with a cache: every held key is in the past). Otherwise position_mask over the held key positions.
        07's windowed attention overrides this to add its window."""
        cache = context.kv_cache
        if context.alibi_slopes is None and (cache is None or query_length == 1):
            return None
        queries = context.query_positions(query_length, device)
        keys = queries if cache is None else cache.key_positions(self.layer_index).to(device)
        return position_mask(queries, keys, context.alibi_slopes, dtype)


register_attention("causal", CausalSelfAttention)


# ---------------------------------------------------------------------------------------------------
# The block and the model
# ---------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """One transformer block: attention then feed-forward, each as a (normalised) residual update."""

    def __init__(self, config: TransformerConfig, layer_index: int):
        super().__init__()
        self.norm1 = _NORMS[config.norm](config.embed_dim, config.norm_eps)
        self.attn = _ATTENTIONS[config.attention_module](config, layer_index)
        self.norm2 = _NORMS[config.norm](config.embed_dim, config.norm_eps)
        self.ffn = _FFNS[config.ffn](config)
        self.dropout = nn.Dropout(config.dropout)
        self.pre_norm = config.norm_placement == "pre"
        self.residual = config.residual

    def forward(self, x, context: AttentionContext):
        """(B, T, E) -> ((B, T, E), attention weights or None)."""
        if self.pre_norm:
            update, weights = self.attn(self.norm1(x), context)
            x = self._combine(x, update)
            return self._combine(x, self.ffn(self.norm2(x))), weights
        update, weights = self.attn(x, context)
        x = self.norm1(self._combine(x, update))
        return self.norm2(self._combine(x, self.ffn(x))), weights

    def _combine(self, x, update):
        """The residual connection x + update; without it (the ablation) the update replaces x."""
        update = self.dropout(update)
        return x + update if self.residual else update


class MiniFormer(nn.Module):
    """Decoder-only transformer: embeddings -> num_layers blocks -> final norm -> output head."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        E = config.embed_dim
        self.token_embedding = nn.Embedding(config.vocab_size, E)
        if config.position == "learned":
            self.position_embedding = LearnedPositionalEmbedding(config.context_length, E)
        if config.position == "sinusoidal":  # fixed table, a buffer (not a parameter, not saved)
            self.register_buffer("sinusoidal_table", sinusoidal_encoding(config.context_length, E), persistent=False)
        if config.position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.num_heads), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        # Post-norm blocks already end with a norm; pre-norm leaves the stream unnormalised, so add one.
        self.final_norm = _NORMS[config.norm](E, config.norm_eps) if config.norm_placement == "pre" else nn.Identity()
        self.head = nn.Linear(E, config.vocab_size, bias=False)
        if config.tie_weights:
            # One matrix both reads tokens in and scores them out: saves V*E parameters, and a token's
            # input vector is trained by every position where it is a candidate output.
            self.head.weight = self.token_embedding.weight
        self._init_weights()

    def _init_weights(self):
        """GPT-2 initialisation: every weight N(0, 0.02), biases 0; the layers that write into the residual
        stream (those marked by mark_residual_projection: attention out, FFN down, and whatever a registered
        module marks) get std 0.02 / sqrt(2 * num_layers).

        Why: each block adds 2 updates to the residual stream, so after L blocks it is a sum of 2L terms.
        Independent terms add their variances, so with std 0.02 each the stream's std would grow like
        sqrt(2L); scaling each writer by 1/sqrt(2L) keeps the stream's scale at init independent of depth.
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if getattr(module, "writes_residual_stream", False) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for parameter in self.position_parameters():
            nn.init.normal_(parameter, mean=0.0, std=0.02)

    def position_parameters(self) -> list:
        return list(self.position_embedding.parameters()) if self.config.position == "learned" else []

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once). exclude_embeddings drops the token and
        position tables, the count scaling laws use (with tied weights this also drops the shared head)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            total -= self.token_embedding.weight.numel() + sum(p.numel() for p in self.position_parameters())
        return total

    def _check_ids(self, idx) -> None:
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a tensor of token ids (B, T), got {type(idx).__name__}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must have shape (B, T) with T >= 1, got {tuple(idx.shape)}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"idx of shape {tuple(idx.shape)} holds ids in [{low}, {high}]; allowed range is "
                             f"[0, {self.config.vocab_size}) (vocab_size = {self.config.vocab_size})")

    def _embed(self, idx, offset: int):
        """Token embeddings plus additive position information: (B, T) -> (B, T, E)."""
        T = idx.shape[1]
        x = self.token_embedding(idx)  # (B, T, E)
        if self.config.position == "learned":
            x = x + self.position_embedding(T, offset=offset)
        elif self.config.position == "sinusoidal":
            if offset + T <= self.sinusoidal_table.shape[0]:
                table = self.sinusoidal_table[offset:offset + T]
            else:  # beyond the precomputed length: the formula extends to any position
                table = sinusoidal_encoding(T, self.config.embed_dim, offset=offset, device=x.device)
            x = x + table.to(x.dtype)
        return self.dropout(x)

    def _run_blocks(self, idx, kv_cache=None, keep_hidden: bool = False, need_weights: bool = False):
        """-> (final residual stream, [stream after embedding and each block] or None, [weights per layer] or None)."""
        self._check_ids(idx)
        offset = kv_cache.offset if kv_cache is not None else 0
        x = self._embed(idx, offset)
        context = AttentionContext(offset, kv_cache, getattr(self, "alibi_slopes", None), need_weights)
        hidden = [x] if keep_hidden else None
        weights = [] if need_weights else None
        for block in self.blocks:
            x, layer_weights = block(x, context)
            if keep_hidden:
                hidden.append(x)
            if need_weights:
                weights.append(layer_weights)
        if kv_cache is not None:
            kv_cache.advance(idx.shape[1])
        return x, hidden, weights

    def final_norm_and_head(self, hidden):
        """Logits from a residual-stream state (B, T, E) -> (B, T, V). Applied to an intermediate layer's
        state, this is the logit lens: what the model would predict if it stopped there."""
        return self.head(self.final_norm(hidden))

    def forward(self, idx, kv_cache=None, return_attention: bool = False):
        """idx (B, T) token ids -> logits (B, T, V). With a kv_cache, idx are the tokens after those cached.
        return_attention=True -> (logits, [attention weights (B, H, T, T_keys) per layer]), computed with
        03's explicit attention (the same function SDPA is tested against)."""
        x, _, weights = self._run_blocks(idx, kv_cache, need_weights=return_attention)
        logits = self.final_norm_and_head(x)
        return (logits, weights) if return_attention else logits

    def forward_with_hidden(self, idx):
        """(logits, hidden_states): the residual stream after the embedding and after each block."""
        x, hidden, _ = self._run_blocks(idx, keep_hidden=True)
        return self.final_norm_and_head(x), hidden

    def new_cache(self):
        """An empty KV cache of the kind this model's attention reads: its `cache_factory` attribute (09's
        MLA caches a latent, not k and v), else ConcatKVCache."""
        return getattr(self.blocks[0].attn, "cache_factory", ConcatKVCache)()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, sampler: Callable | None = None, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
                 cache_factory: Callable | None = None):
        """Append max_new_tokens tokens to idx (B, T): the project's one generation loop.

        sampler(logits (B, V), tokens so far (B, T')) -> next ids (B, 1) picks each token (05's samplers);
        without one, sample_next_token(temperature, top_k, generator) does (temperature 0 = greedy).
        cache_factory() returns an empty KV cache (default new_cache(); 06's caches plug in here).
        The model sees at most context_length tokens. Without a cache each step re-reads the last
        context_length tokens; with one each step feeds one token, and when the cache reaches
        context_length it is refilled from the last context_length tokens, so both paths compute the same
        logits; a cache with `evicts = True` (a ring buffer) manages its length itself and is never refilled.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if sampler is None:
            _check_sampling_arguments(temperature, top_k)

            def sampler(logits, _tokens):
                return sample_next_token(logits, temperature, top_k, generator)
        elif not callable(sampler):
            raise ValueError(f"sampler must be callable (logits, tokens) -> ids, got {sampler!r}")
        self._check_ids(idx)
        context = self.config.context_length
        cache_factory = cache_factory or self.new_cache
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -context:])
            elif cache is None or (cache.offset + 1 > context and not getattr(cache, "evicts", False)):
                cache = cache_factory()
                logits = self(idx[:, -context:], kv_cache=cache)
            else:
                logits = self(idx[:, -1:], kv_cache=cache)
            next_token = sampler(logits[:, -1, :], idx)  # (B, 1)
            idx = torch.cat([idx, next_token.to(idx.dtype)], dim=1)
        return idx


def _check_sampling_arguments(temperature: float, top_k: int | None) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")


def sample_next_token(logits, temperature: float = 1.0, top_k: int | None = None, generator=None):
    """One token id per row of logits (B, V) -> (B, 1): argmax at temperature 0, else a softmax sample
    (05_sampling has the full set of strategies; this is the minimal default)."""
    _check_sampling_arguments(temperature, top_k)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


class ConcatKVCache:
    """The simplest KV cache: per layer, keys and values so far, grown with torch.cat at every step.

    offset = number of positions cached before the current forward; the model calls update() once per
    layer, then advance(T_new) once. (torch.cat copies the whole cache each step: O(T^2) memory traffic,
    which 06_kv_cache's preallocated cache avoids.) It checks what it is given: a layer's cached length
    must equal offset, and batch size, head count and head dim must not change between steps.
    """

    def __init__(self):
        self.offset = 0
        self.keys: dict = {}
        self.values: dict = {}

    def update(self, layer_index: int, k, v):
        """Append k, v (B, H_kv, T_new, D); return all keys and values of that layer (B, H_kv, T_all, D)."""
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape (B, H_kv, T_new, D), got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        if layer_index in self.keys:
            held = self.keys[layer_index]
            if held.shape[2] != self.offset:
                raise ValueError(f"cache offset ({self.offset}) disagrees with the {held.shape[2]} positions held "
                                 f"for layer {layer_index}: reset the cache with a new ConcatKVCache()")
            if (held.shape[0], held.shape[1], held.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
                raise ValueError(f"new keys of shape {tuple(k.shape)} do not continue the cached "
                                 f"{tuple(held.shape)}: batch size, KV heads and head dim must stay the same")
            k = torch.cat([held, k], dim=2)
            v = torch.cat([self.values[layer_index], v], dim=2)
        elif self.offset != 0:
            raise ValueError(f"layer {layer_index} has nothing cached but the cache offset is {self.offset}")
        self.keys[layer_index], self.values[layer_index] = k, v
        return k, v

    def key_positions(self, layer_index: int) -> torch.Tensor:
        """Keys 0 .. T_all - 1: this cache never drops one."""
        return torch.arange(self.keys[layer_index].shape[2])

    def advance(self, num_new_tokens: int) -> None:
        self.offset += num_new_tokens

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Row b of every layer becomes the old row batch_indices[b] (B,): beam search continues each
        surviving beam from its parent's keys."""
        if not self.keys:
            return
        check_batch_indices(batch_indices, next(iter(self.keys.values())).shape[0])
        for store in (self.keys, self.values):
            for layer_index, held in store.items():
                store[layer_index] = held.index_select(0, batch_indices)
