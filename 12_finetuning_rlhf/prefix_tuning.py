"""Prefix tuning (Li & Liang 2021): freeze the whole model and learn P key/value vectors per layer that every
token can attend to, as if P virtual tokens had been read before the input.

In layer l, attention reads the learned prefix in front of the real keys and values:

    K_l = [Pk_l ; x W_k],   V_l = [Pv_l ; x W_v],   Pk_l, Pv_l (H_kv, P, D)   y = softmax(q K_l^T / sqrt(D)) V_l

The prefix never passes through the model's weights, so it can move any layer's attention directly; the only
trained numbers are num_layers * 2 * H_kv * P * D. It enters through 04's KV-cache seam: PrefixKVCache is a
ConcatKVCache that already holds the prefix at positions 0 .. P-1 (offset P), so the real tokens sit at
positions P, P+1, ... (peft and Hugging Face's convention: the prefix is a past of length P). With learned
positions that leaves context_length - P positions for real tokens.

Contents: PrefixKVCache, keys_values_of, PrefixTunedModel (forward, generate).
"""

import math

import torch
import torch.nn as nn

from transformer import ConcatKVCache, MiniFormer


class PrefixKVCache(ConcatKVCache):
    """A ConcatKVCache that starts out holding a prefix (num_layers, 2, H_kv, P, D): each layer's keys and values
    at positions 0 .. P-1, expanded to the batch size at that layer's first update (gradients flow back)."""

    def __init__(self, prefix: torch.Tensor):
        super().__init__()
        if not isinstance(prefix, torch.Tensor) or prefix.dim() != 5 or prefix.shape[1] != 2:
            raise ValueError(f"prefix must be a tensor (num_layers, 2, H_kv, P, D), got "
                             f"{tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else type(prefix).__name__}")
        self.prefix = prefix
        self.prefix_length = prefix.shape[3]
        self.offset = self.prefix_length  # the first real token sits at position P

    def update(self, layer_index: int, k, v):
        """Append k, v (B, H_kv, T_new, D) behind the prefix; return (B, H_kv, P + T_all, D) each."""
        if layer_index not in self.keys:
            if not 0 <= layer_index < self.prefix.shape[0]:
                raise ValueError(f"layer_index must be in [0, {self.prefix.shape[0]}), got {layer_index}")
            batch = k.shape[0]
            self.keys[layer_index] = self.prefix[layer_index, 0].unsqueeze(0).expand(batch, -1, -1, -1)
            self.values[layer_index] = self.prefix[layer_index, 1].unsqueeze(0).expand(batch, -1, -1, -1)
        return super().update(layer_index, k, v)


@torch.no_grad()
def keys_values_of(model: MiniFormer, ids: torch.Tensor) -> torch.Tensor:
    """The keys and values `model` computes for the tokens ids (P,) at positions 0 .. P-1, stacked in the
    prefix layout (num_layers, 2, H_kv, P, D)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D tensor of token ids (P,), got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    cache = ConcatKVCache()
    model(ids[None], kv_cache=cache)
    return torch.stack([torch.stack([cache.keys[i][0], cache.values[i][0]])
                        for i in range(model.config.num_layers)])  # (L, 2, H_kv, P, D)


class PrefixTunedModel(nn.Module):
    """A frozen MiniFormer plus a trainable prefix (num_layers, 2, H_kv, P, D); only the prefix trains.

    Initialisation: from init_ids (P,) the prefix starts as the base model's own keys and values of those real
    tokens (Li & Liang found that real-word activations train more stably than random vectors, and such a
    prefix starts inside the distribution every layer has learned to read); without init_ids it starts as
    small random vectors N(0, init_std^2), which the softmax then barely notices.
    """

    def __init__(self, base: MiniFormer, prefix_length: int, init_ids: torch.Tensor | None = None,
                 init_std: float = 0.02):
        super().__init__()
        if not isinstance(base, MiniFormer):
            raise TypeError(f"base must be a MiniFormer (04), got {type(base).__name__}")
        if getattr(base.blocks[0].attn, "cache_factory", None) is not None:
            raise ValueError("base's attention caches something other than keys and values (e.g. 09's MLA latent); "
                             "prefix tuning needs the plain k, v cache")
        config = base.config
        if isinstance(prefix_length, bool) or not isinstance(prefix_length, int) or \
                not 1 <= prefix_length < config.context_length:
            raise ValueError(f"prefix_length must be an integer in [1, {config.context_length}) (it takes positions "
                             f"from the context of {config.context_length}), got {prefix_length!r}")
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or \
                not (math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be a finite number > 0, got {init_std!r}")
        self.base = base.requires_grad_(False)
        self.prefix_length = prefix_length
        weight = base.token_embedding.weight
        if init_ids is None:
            shape = (config.num_layers, 2, config.kv_heads, prefix_length, config.head_dim)
            prefix = torch.randn(shape, device=weight.device, dtype=weight.dtype) * init_std
        else:
            if not isinstance(init_ids, torch.Tensor) or init_ids.shape != (prefix_length,):
                raise ValueError(f"init_ids must be a tensor of {prefix_length} token ids (prefix_length,), got "
                                 f"{tuple(init_ids.shape) if isinstance(init_ids, torch.Tensor) else init_ids!r}")
            prefix = keys_values_of(base, init_ids.to(weight.device))
        self.prefix = nn.Parameter(prefix)  # (L, 2, H_kv, P, D)

    @property
    def usable_context(self) -> int:
        """How many real tokens one forward can read: the prefix takes P of the context_length positions."""
        return self.base.config.context_length - self.prefix_length

    def new_cache(self) -> PrefixKVCache:
        """An empty cache that holds only the prefix (a fresh one per sequence: it grows with the tokens)."""
        return PrefixKVCache(self.prefix)

    def forward(self, idx):
        """idx (B, T) -> logits (B, T, V) with the prefix in front; T must be <= context_length - P."""
        if isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.shape[1] > self.usable_context:
            raise ValueError(f"idx has {idx.shape[1]} tokens but a prefix of {self.prefix_length} leaves "
                             f"{self.usable_context} of context_length {self.base.config.context_length}")
        return self.base(idx, kv_cache=self.new_cache())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, **kwargs):
        """base.generate with the prefix cache (MiniFormer.generate's sampling arguments pass through). The
        whole sequence must fit: T + max_new_tokens - 1 <= context_length - P (refilling a full cache would
        start the window at position P again and shift every token's position)."""
        if kwargs.get("use_cache", True) is not True:
            raise ValueError("use_cache must be True: the prefix lives in the KV cache")
        if "cache_factory" in kwargs:
            raise ValueError("cache_factory is set by PrefixTunedModel (the prefix cache); do not pass one")
        if isinstance(idx, torch.Tensor) and idx.dim() == 2 and isinstance(max_new_tokens, int) \
                and max_new_tokens > 0 and idx.shape[1] + max_new_tokens - 1 > self.usable_context:
            raise ValueError(f"idx ({idx.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) - 1 exceeds the "
                             f"{self.usable_context} positions a prefix of {self.prefix_length} leaves of "
                             f"context_length {self.base.config.context_length}")
        return self.base.generate(idx, max_new_tokens, cache_factory=self.new_cache, **kwargs)
