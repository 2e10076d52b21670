"""The transformer block and the "mini-former": the decoder-only model every later topic reuses.

A block reads the residual stream x (B, T, E) and adds two updates to it. Pre-norm (GPT-2, Llama):

    x = x + Attention(Norm1(x))          every position mixes in information from earlier positions
    x = x + FeedForward(Norm2(x))        every position is transformed on its own
    logits = Head(FinalNorm(x))

Post-norm (the original 2017 Transformer) normalises after the addition instead:
x = Norm1(x + Attention(x)); x = Norm2(x + FeedForward(x)), with no final norm.

Attention, per head h with q, k, v = x W_q, x W_k, x W_v:  softmax(q k^T / sqrt(D) + causal) v.
Grouped-query attention lets H query heads share H_kv <= H key/value heads (H_kv = H is ordinary
multi-head attention, H_kv = 1 is multi-query attention), which shrinks the KV cache by H / H_kv.

Everything that later topics swap is a config field: norm (LayerNorm / RMSNorm / none / registered),
feed-forward (GELU MLP / SwiGLU / registered), position encoding (learned / sinusoidal / RoPE / ALiBi /
none, all from 02_positional_embeddings), attention kernel (torch SDPA / 03's from-scratch attention),
number of KV heads, weight tying, dropout, bias, pre/post norm, and residuals on/off (for the ablation).
An external KV cache plugs into `forward(idx, kv_cache=...)` (06_kv_cache provides a faster one).

Contents, in reading order: the config, the norm/FFN registries and the two feed-forwards, attention,
the block, MiniFormer (forward, logit lens, generation), ConcatKVCache, Hugging Face interop (GPT-2,
Llama), and the standard lab model with its character-level Shakespeare data.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import causal_mask, scaled_dot_product_attention
from data import CharVocab, load_corpus, random_batch, train_val_split
from positional_embeddings import LearnedPositionalEmbedding, alibi_bias, apply_rope, sinusoidal_encoding
from training import TrainConfig

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORM_PLACEMENTS = ("pre", "post")
ATTENTIONS = ("sdpa", "scratch")
ROPE_LAYOUTS = ("half", "interleaved")
GELU_APPROXIMATIONS = ("none", "tanh")

# Registries: name -> factory. Later topics (10_normalization) add their own from-scratch layers here.
_NORMS: dict = {}
_FFNS: dict = {}


def register_norm(name: str, factory) -> None:
    """Make `TransformerConfig(norm=name)` build `factory(dim, eps)` (an nn.Module keeping the shape)."""
    if not name or not callable(factory):
        raise ValueError(f"register_norm needs a non-empty name and a callable factory, got {name!r}, {factory!r}")
    _NORMS[name] = factory


def register_ffn(name: str, factory) -> None:
    """Make `TransformerConfig(ffn=name)` build `factory(config)` (an nn.Module (B, T, E) -> (B, T, E))."""
    if not name or not callable(factory):
        raise ValueError(f"register_ffn needs a non-empty name and a callable factory, got {name!r}, {factory!r}")
    _FFNS[name] = factory


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
    attention: str = "sdpa"  # "sdpa" = torch.nn.functional.scaled_dot_product_attention | "scratch" = 03's
    gelu_approximate: str = "none"  # "none" = exact erf GELU | "tanh" = GPT-2's gelu_new

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "num_layers", "num_heads", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_kv_heads must be >= 1 and divide num_heads ({self.num_heads}), "
                             f"got {self.num_kv_heads}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            raise ValueError(f"ffn_hidden_size must be >= 1 or None, got {self.ffn_hidden_size}")
        choices = {"norm": tuple(_NORMS), "ffn": tuple(_FFNS), "position": POSITIONS,
                   "norm_placement": NORM_PLACEMENTS, "attention": ATTENTIONS, "rope_layout": ROPE_LAYOUTS,
                   "gelu_approximate": GELU_APPROXIMATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.rope_base > 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
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
# Norms and feed-forwards (torch's norms; a small MLP and SwiGLU of our own)
# ---------------------------------------------------------------------------------------------------

class GeluMLP(nn.Module):
    """GPT-2's feed-forward: E -> hidden -> GELU -> E."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.resolved_ffn_hidden_size
        self.up = nn.Linear(config.embed_dim, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.embed_dim, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x):  # (B, T, E)
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """Llama's feed-forward: down(silu(gate(x)) * up(x)); the gate decides, per feature, how much of up passes."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.resolved_ffn_hidden_size
        self.gate = nn.Linear(config.embed_dim, hidden, bias=config.bias)
        self.up = nn.Linear(config.embed_dim, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.embed_dim, bias=config.bias)

    def forward(self, x):  # (B, T, E)
        return self.down(F.silu(self.gate(x)) * self.up(x))


register_norm("layernorm", lambda dim, eps: nn.LayerNorm(dim, eps=eps))
register_norm("rmsnorm", lambda dim, eps: nn.RMSNorm(dim, eps=eps))
register_norm("none", lambda dim, eps: nn.Identity())  # for the "no normalisation" ablation
register_ffn("gelu", GeluMLP)
register_ffn("swiglu", SwiGLU)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped KV heads, optional RoPE and an optional KV cache.

    One fused projection gives q (H heads) and k, v (H_kv heads each); each group of H / H_kv query heads
    reads the same key/value head. The cache stores the H_kv heads (that is the memory GQA saves).
    """

    def __init__(self, config: TransformerConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        self.qkv = nn.Linear(config.embed_dim, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                             bias=config.bias)
        self.out = nn.Linear(config.embed_dim, config.embed_dim, bias=config.bias)
        self.use_rope = config.position == "rope"
        self.rope_base, self.rope_layout = config.rope_base, config.rope_layout
        self.use_sdpa = config.attention == "sdpa"

    def forward(self, x, mask=None, offset: int = 0, kv_cache=None):
        """x (B, T, E); mask None means "plain causal" (no cache), else a bool (True = attend) or additive
        float tensor broadcastable to (B, H, T, T_keys); offset = position of x's first token."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                                     self.num_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if self.use_rope:  # keys are rotated before caching, so cached keys keep their absolute positions
            q = apply_rope(q, offset=offset, base=self.rope_base, layout=self.rope_layout)
            k = apply_rope(k, offset=offset, base=self.rope_base, layout=self.rope_layout)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, H_kv, T_keys, D)
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T_keys, D)
        is_causal = mask is None
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        else:
            y = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, E)
        return self.out(y)


# ---------------------------------------------------------------------------------------------------
# The block and the model
# ---------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """One transformer block: attention then feed-forward, each as a (normalised) residual update."""

    def __init__(self, config: TransformerConfig, layer_index: int):
        super().__init__()
        self.norm1 = _NORMS[config.norm](config.embed_dim, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_index)
        self.norm2 = _NORMS[config.norm](config.embed_dim, config.norm_eps)
        self.ffn = _FFNS[config.ffn](config)
        self.dropout = nn.Dropout(config.dropout)
        self.pre_norm = config.norm_placement == "pre"
        self.residual = config.residual

    def forward(self, x, mask=None, offset: int = 0, kv_cache=None):  # (B, T, E) -> (B, T, E)
        if self.pre_norm:
            x = self._combine(x, self.attn(self.norm1(x), mask, offset, kv_cache))
            return self._combine(x, self.ffn(self.norm2(x)))
        x = self.norm1(self._combine(x, self.attn(x, mask, offset, kv_cache)))
        return self.norm2(self._combine(x, self.ffn(x)))

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
        """GPT-2 initialisation: every weight N(0, 0.02), biases 0; the two projections that write into the
        residual stream (attention out, FFN down) get std 0.02 / sqrt(2 * num_layers).

        Why: each block adds 2 updates to the residual stream, so after L blocks it is a sum of 2L terms.
        Independent terms add their variances, so with std 0.02 each the stream's std would grow like
        sqrt(2L); scaling each writer by 1/sqrt(2L) keeps the stream's scale at init independent of depth.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for parameter in self.position_parameters():
            nn.init.normal_(parameter, mean=0.0, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for block in self.blocks:
            for name, parameter in block.named_parameters():
                if name in ("attn.out.weight", "ffn.down.weight"):
                    nn.init.normal_(parameter, mean=0.0, std=residual_std)

    def position_parameters(self) -> list:
        return list(self.position_embedding.parameters()) if self.config.position == "learned" else []

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once). exclude_embeddings drops the token and
        position tables, the count scaling laws use (with tied weights this also drops the shared head)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            total -= self.token_embedding.weight.numel() + sum(p.numel() for p in self.position_parameters())
        return total

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

    def _attention_mask(self, query_length: int, offset: int, device, dtype):
        """None for plain causal attention without a cache (the fast is_causal path); otherwise the explicit
        end-aligned mask: bool (True = attend), or for ALiBi the float bias with -inf on future keys."""
        key_length = offset + query_length
        if self.config.position == "alibi":
            bias = alibi_bias(self.config.num_heads, query_length, key_length, device=device)  # (H, T, T_keys)
            bias = bias.to(dtype)
            return bias.masked_fill(~causal_mask(query_length, key_length, device=device), float("-inf"))
        if offset == 0:
            return None
        return causal_mask(query_length, key_length, device=device)  # (T, T_keys)

    def _run_blocks(self, idx, kv_cache=None, keep_hidden: bool = False):
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        offset = kv_cache.offset if kv_cache is not None else 0
        x = self._embed(idx, offset)
        mask = self._attention_mask(idx.shape[1], offset, x.device, x.dtype)
        hidden = [x] if keep_hidden else None
        for block in self.blocks:
            x = block(x, mask, offset, kv_cache)
            if keep_hidden:
                hidden.append(x)
        if kv_cache is not None:
            kv_cache.advance(idx.shape[1])
        return x, hidden

    def final_norm_and_head(self, hidden):
        """Logits from a residual-stream state (B, T, E) -> (B, T, V). Applied to an intermediate layer's
        state, this is the logit lens: what the model would predict if it stopped there."""
        return self.head(self.final_norm(hidden))

    def forward(self, idx, kv_cache=None):
        """idx (B, T) token ids -> logits (B, T, V). With a kv_cache, idx are the tokens after those cached."""
        x, _ = self._run_blocks(idx, kv_cache)
        return self.final_norm_and_head(x)

    def forward_with_hidden(self, idx):
        """(logits, hidden_states): the residual stream after the embedding and after each block."""
        x, hidden = self._run_blocks(idx, keep_hidden=True)
        return self.final_norm_and_head(x), hidden

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True):
        """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 = greedy.

        The model sees at most context_length tokens. Without a cache each step re-reads the last
        context_length tokens; with a cache each step feeds one token, and when the cache is full it is
        refilled from the last context_length tokens (so both paths compute the same logits).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        context = self.config.context_length
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -context:])
            elif cache is None or cache.offset + 1 > context:
                cache = ConcatKVCache()
                logits = self(idx[:, -context:], kv_cache=cache)
            else:
                logits = self(idx[:, -1:], kv_cache=cache)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, generator)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
        return idx


def sample_next_token(logits, temperature: float = 1.0, top_k: int | None = None, generator=None):
    """One token id per row of logits (B, V) -> (B, 1): argmax at temperature 0, else a softmax sample."""
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
    which 06_kv_cache's preallocated cache avoids.)
    """

    def __init__(self):
        self.offset = 0
        self.keys: dict = {}
        self.values: dict = {}

    def update(self, layer_index: int, k, v):
        """Append k, v (B, H_kv, T_new, D); return all keys and values of that layer (B, H_kv, T_all, D)."""
        if layer_index in self.keys:
            k = torch.cat([self.keys[layer_index], k], dim=2)
            v = torch.cat([self.values[layer_index], v], dim=2)
        self.keys[layer_index], self.values[layer_index] = k, v
        return k, v

    def advance(self, num_new_tokens: int) -> None:
        self.offset += num_new_tokens


# ---------------------------------------------------------------------------------------------------
# Hugging Face interop: same weights, same logits
# ---------------------------------------------------------------------------------------------------

def miniformer_from_hf_gpt2(hf_model) -> MiniFormer:
    """A MiniFormer with the configuration and weights of a transformers GPT2LMHeadModel.

    GPT-2's Conv1D layers store weights as (in, out), the transpose of nn.Linear's (out, in); its MLP uses
    gelu_new (the tanh approximation of GELU); attention q, k, v are one fused c_attn, like our qkv.
    """
    hf = hf_model.config
    if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"activation_function must be gelu_new or gelu, got {hf.activation_function!r}")
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or getattr(hf, "reorder_and_upcast_attn", False):
        raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    if not getattr(hf, "scale_attn_weights", True):
        raise ValueError("scale_attn_weights=False is not supported (attention is always scaled by 1/sqrt(D))")
    config = TransformerConfig(
        vocab_size=hf.vocab_size, context_length=hf.n_positions, num_layers=hf.n_layer, num_heads=hf.n_head,
        embed_dim=hf.n_embd, ffn_hidden_size=hf.n_inner, norm="layernorm", ffn="gelu", position="learned",
        norm_eps=hf.layer_norm_epsilon, bias=True, tie_weights=getattr(hf, "tie_word_embeddings", True),
        gelu_approximate="none" if hf.activation_function == "gelu" else "tanh")
    model = _empty_like(config, hf_model)
    source = hf_model.state_dict()
    target = {"token_embedding.weight": source["transformer.wte.weight"],
              "final_norm.weight": source["transformer.ln_f.weight"],
              "final_norm.bias": source["transformer.ln_f.bias"],
              "head.weight": source["lm_head.weight"]}
    (position_name,) = [name for name, _ in model.named_parameters() if name.startswith("position_embedding.")]
    target[position_name] = source["transformer.wpe.weight"]  # the name inside 02's module, whatever it is
    conv_pairs = {"attn.qkv": "attn.c_attn", "attn.out": "attn.c_proj", "ffn.up": "mlp.c_fc", "ffn.down": "mlp.c_proj"}
    for i in range(config.num_layers):
        hf_prefix = f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            target[f"blocks.{i}.{ours}.weight"] = source[hf_prefix + theirs + ".weight"]
            target[f"blocks.{i}.{ours}.bias"] = source[hf_prefix + theirs + ".bias"]
        for ours, theirs in conv_pairs.items():
            target[f"blocks.{i}.{ours}.weight"] = source[hf_prefix + theirs + ".weight"].t()  # Conv1D is (in, out)
            target[f"blocks.{i}.{ours}.bias"] = source[hf_prefix + theirs + ".bias"]
    return _load(model, target)


def miniformer_from_hf_llama(hf_model) -> MiniFormer:
    """A MiniFormer with the configuration and weights of a transformers LlamaForCausalLM.

    Llama: RMSNorm (eps from the config), RoPE with rope_theta in the "half" layout (feature i pairs with
    i + D/2), SwiGLU with the config's intermediate_size, grouped KV heads, no biases, tied or untied head.
    """
    hf = hf_model.config
    rope = getattr(hf, "rope_parameters", None) or {}  # transformers >= 5 keeps rope_theta here
    rope_theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", (getattr(hf, "rope_scaling", None) or {}).get("rope_type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type must be 'default' (no RoPE scaling), got {rope_type!r}")
    if hf.hidden_act != "silu":
        raise ValueError(f"hidden_act must be 'silu' for SwiGLU, got {hf.hidden_act!r}")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise ValueError(f"head_dim * num_attention_heads must equal hidden_size, got {head_dim} * "
                         f"{hf.num_attention_heads} != {hf.hidden_size}")
    attention_bias, mlp_bias = getattr(hf, "attention_bias", False), getattr(hf, "mlp_bias", False)
    if attention_bias != mlp_bias:
        raise ValueError(f"attention_bias and mlp_bias must be equal, got {attention_bias} and {mlp_bias}")
    config = TransformerConfig(
        vocab_size=hf.vocab_size, context_length=hf.max_position_embeddings, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, embed_dim=hf.hidden_size, num_kv_heads=hf.num_key_value_heads,
        ffn_hidden_size=hf.intermediate_size, norm="rmsnorm", ffn="swiglu", position="rope",
        rope_base=float(rope_theta), rope_layout="half", norm_eps=hf.rms_norm_eps, bias=attention_bias,
        tie_weights=bool(getattr(hf, "tie_word_embeddings", False)))
    model = _empty_like(config, hf_model)
    source = hf_model.state_dict()
    target = {"token_embedding.weight": source["model.embed_tokens.weight"],
              "final_norm.weight": source["model.norm.weight"],
              "head.weight": source.get("lm_head.weight", source["model.embed_tokens.weight"])}
    for i in range(config.num_layers):
        hf_prefix = f"model.layers.{i}."
        names = ["weight", "bias"] if config.bias else ["weight"]
        target[f"blocks.{i}.norm1.weight"] = source[hf_prefix + "input_layernorm.weight"]
        target[f"blocks.{i}.norm2.weight"] = source[hf_prefix + "post_attention_layernorm.weight"]
        for name in names:
            target[f"blocks.{i}.attn.qkv.{name}"] = torch.cat(
                [source[hf_prefix + f"self_attn.{p}_proj.{name}"] for p in "qkv"], dim=0)
            target[f"blocks.{i}.attn.out.{name}"] = source[hf_prefix + f"self_attn.o_proj.{name}"]
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                target[f"blocks.{i}.ffn.{ours}.{name}"] = source[hf_prefix + f"mlp.{theirs}.{name}"]
    return _load(model, target)


def _empty_like(config: TransformerConfig, hf_model) -> MiniFormer:
    """MiniFormer(config) on the Hugging Face model's device and in its dtype."""
    reference = next(hf_model.parameters())
    return MiniFormer(config).to(device=reference.device, dtype=reference.dtype)


def _load(model: MiniFormer, state: dict) -> MiniFormer:
    """Load every tensor strictly (a missing or unexpected name is an error) and switch to eval mode."""
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# The standard lab model and its data
# ---------------------------------------------------------------------------------------------------

def lab_model_config(vocab_size: int, **overrides) -> TransformerConfig:
    """nanoGPT's CPU reference size: 4 layers, 4 heads, 128 dims, context 64, pre-norm LayerNorm, GELU,
    learned positions, dropout 0, tied weights (~0.8 M parameters besides the embeddings)."""
    settings = dict(vocab_size=vocab_size, context_length=64, num_layers=4, num_heads=4, embed_dim=128,
                    norm="layernorm", ffn="gelu", position="learned", norm_placement="pre", dropout=0.0,
                    tie_weights=True)
    settings.update(overrides)
    return TransformerConfig(**settings)


def lab_train_config(**overrides) -> TrainConfig:
    """nanoGPT's character-Shakespeare CPU schedule: 2000 steps, lr 1e-3 with 100 warmup steps then cosine to
    1e-4, AdamW betas (0.9, 0.99) (beta2 0.99 because each step sees few tokens), weight decay 0.1, clip 1.0,
    evaluation every 250 steps on 20 batches. Batch 12 x context 64 is set by the batches."""
    settings = dict(steps=2000, learning_rate=1e-3, min_lr_fraction=0.1, warmup_steps=100, weight_decay=0.1,
                    betas=(0.9, 0.99), grad_clip=1.0, eval_interval=250, eval_batches=20)
    settings.update(overrides)
    return TrainConfig(**settings)


def char_shakespeare_batches(context_length: int, batch_size: int, device, generator: torch.Generator | None = None):
    """(batch_fn, vocab, corpus_name): character-level batches of load_corpus("auto") split 90/10.

    batch_fn("train") / batch_fn("val") return (x, y) of shape (batch_size, context_length) on `device`.
    """
    if batch_size < 1 or context_length < 1:
        raise ValueError(f"batch_size and context_length must be >= 1, got {batch_size}, {context_length}")
    text, corpus_name = load_corpus("auto")
    vocab = CharVocab(text)
    train_data, val_data = train_val_split(vocab.encode(text), val_fraction=0.1)
    splits = {"train": train_data, "val": val_data}

    def batch_fn(split: str):
        if split not in splits:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return random_batch(splits[split], batch_size, context_length, generator=generator, device=device)

    return batch_fn, vocab, corpus_name
