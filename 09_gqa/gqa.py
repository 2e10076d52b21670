"""Grouped-query attention: fewer key/value heads, a smaller KV cache, and how to convert a trained model.

04's CausalSelfAttention already runs GQA: H query heads share H_kv key/value heads, query head h reads
KV head h // (H / H_kv) (H_kv = H is multi-head attention, H_kv = 1 multi-query attention). What a token
costs in the cache, per layer:

    MHA  2 * H * D        GQA  2 * H_kv * D        MQA  2 * D        MLA  d_c + d_rope   (numbers)
    bytes per token = that * num_layers * bytes per element

Converting a trained MHA checkpoint (Ainslie et al. 2023): the new KV head g of a group replaces the
heads g*G .. g*G + G - 1 (G = H / H_kv) by their mean ("mean"), by the first of them ("first"), or by a
fresh random initialisation ("random"); the paper's order of quality is mean > first > random, and a
short uptraining (~5% of the pre-training compute) recovers most of the rest.

Contents: kv_head_of_query_head; the cache formulas and PUBLISHED_CONFIGS (Llama-2-7B, Llama-3-8B,
Mistral-7B, DeepSeek-V2); held_bytes (what a cache object actually holds); convert_to_gqa.
"""

import copy
from dataclasses import dataclass, replace

import torch

from transformer import CausalSelfAttention, MiniFormer

CONVERSION_METHODS = ("mean", "first", "random")


def kv_head_of_query_head(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """(H,) index of the KV head each query head reads: h // (H / H_kv), as 04's repeat_interleave does."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must be an integer >= 1 that divides num_heads ({num_heads}), got {num_kv_heads!r}")
    return torch.arange(num_heads) // (num_heads // num_kv_heads)


# ---------------------------------------------------------------------------------------------------
# Cache size per token: formulas and published configurations
# ---------------------------------------------------------------------------------------------------

def _check_positive(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_element: int) -> int:
    """MHA / GQA / MQA: keys and values, H_kv heads of head_dim each, in every layer: 2 L H_kv D b."""
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("bytes_per_element", bytes_per_element)):
        _check_positive(name, value)
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_element


def mla_cache_bytes_per_token(num_layers: int, kv_rank: int, rope_head_dim: int, bytes_per_element: int) -> int:
    """MLA: the latent and the shared RoPE key in every layer: (d_c + d_rope) L b."""
    for name, value, minimum in (("num_layers", num_layers, 1), ("kv_rank", kv_rank, 1),
                                 ("rope_head_dim", rope_head_dim, 0), ("bytes_per_element", bytes_per_element, 1)):
        _check_positive(name, value, minimum)
    return (kv_rank + rope_head_dim) * num_layers * bytes_per_element


@dataclass(frozen=True)
class PublishedConfig:
    """The attention shape of a released model (what sets its KV cache), with where the numbers come from."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int  # for MLA: the heads it would cache as MHA
    head_dim: int
    source: str
    kv_rank: int | None = None  # MLA only
    rope_head_dim: int | None = None  # MLA only: decoupled RoPE key
    query_rank: int | None = None  # MLA only: query compression

    @property
    def attention(self) -> str:
        if self.kv_rank is not None:
            return "MLA"
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else f"GQA-{self.num_kv_heads}"

    def cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Per token, all layers; 2 bytes = the bfloat16/float16 these models are served in."""
        if self.kv_rank is not None:
            return mla_cache_bytes_per_token(self.num_layers, self.kv_rank, self.rope_head_dim, bytes_per_element)
        return kv_cache_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, bytes_per_element)


PUBLISHED_CONFIGS = (
    PublishedConfig("Llama-2-7B", 32, 4096, 32, 32, 128,
                    "meta-llama/Llama-2-7b-hf config.json; Touvron et al. 2023, arXiv:2307.09288"),
    PublishedConfig("Llama-3-8B", 32, 4096, 32, 8, 128,
                    "meta-llama/Meta-Llama-3-8B config.json (num_key_value_heads 8); Meta, Llama 3 model card, 2024"),
    PublishedConfig("Mistral-7B", 32, 4096, 32, 8, 128,
                    "mistralai/Mistral-7B-v0.1 config.json; Jiang et al. 2023, arXiv:2310.06825, Table 1"),
    PublishedConfig("DeepSeek-V2", 60, 5120, 128, 128, 128,
                    "DeepSeek-AI 2024, arXiv:2405.04434, Sec. 3.1.2 (d_c 512, d'_c 1536, d_h^R 64, 128 heads of "
                    "128); deepseek-ai/DeepSeek-V2 config.json", kv_rank=512, rope_head_dim=64, query_rank=1536),
)


def held_bytes(cache) -> int:
    """Bytes of every tensor a cache object holds (ConcatKVCache's keys/values, LatentKVCache's latents and
    RoPE keys, any cache that keeps its tensors in dict attributes): the measured side of the formulas."""
    total = 0
    for value in vars(cache).values():
        if isinstance(value, dict):
            total += sum(t.numel() * t.element_size() for t in value.values() if isinstance(t, torch.Tensor))
    return total


# ---------------------------------------------------------------------------------------------------
# MHA -> GQA / MQA conversion of a trained model
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def _pool_heads(rows: torch.Tensor, num_heads: int, num_kv_heads: int, method: str, generator) -> torch.Tensor:
    """rows (H * D, ...) of a key or value projection -> (H_kv * D, ...): one new head per group of heads."""
    grouped = rows.view(num_kv_heads, num_heads // num_kv_heads, rows.shape[0] // num_heads, *rows.shape[1:])
    if method == "mean":
        pooled = grouped.mean(dim=1)
    elif method == "first":
        pooled = grouped[:, 0]
    else:  # a fresh initialisation like MiniFormer's: weights N(0, 0.02), biases 0
        pooled = torch.randn(grouped[:, 0].shape, generator=generator, dtype=rows.dtype).to(rows.device) * 0.02
        if rows.dim() == 1:
            pooled.zero_()
    return pooled.reshape(-1, *rows.shape[1:])


@torch.no_grad()
def convert_to_gqa(model: MiniFormer, num_kv_heads: int, method: str = "mean", seed: int = 0) -> MiniFormer:
    """A new MiniFormer with num_kv_heads KV heads whose key/value projections are built from the trained
    model's heads by `method` ("mean" | "first" | "random"); every other weight is copied unchanged.
    The model must use 04's CausalSelfAttention with more KV heads than num_kv_heads (a multiple of them)."""
    if not isinstance(model, MiniFormer):
        raise TypeError(f"model must be a MiniFormer, got {type(model).__name__}")
    if method not in CONVERSION_METHODS:
        raise ValueError(f"method must be one of {CONVERSION_METHODS}, got {method!r}")
    config = model.config
    if not all(type(block.attn) is CausalSelfAttention for block in model.blocks):
        raise ValueError(f"model must use 04's CausalSelfAttention (attention_module='causal'), got "
                         f"{config.attention_module!r}")
    old_kv = config.kv_heads
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 or old_kv % num_kv_heads:
        raise ValueError(f"num_kv_heads must be an integer >= 1 that divides the model's {old_kv} KV heads, "
                         f"got {num_kv_heads!r}")
    converted = MiniFormer(replace(config, num_kv_heads=num_kv_heads)).to(next(model.parameters()).device)
    state = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    q_size = config.num_heads * config.head_dim
    kv_size = old_kv * config.head_dim
    for index in range(config.num_layers):
        for name in ("weight", "bias"):
            key = f"blocks.{index}.attn.qkv.{name}"
            if key not in state:
                continue
            q, k, v = state[key].split([q_size, kv_size, kv_size], dim=0)
            state[key] = torch.cat([q] + [_pool_heads(t, old_kv, num_kv_heads, method, generator) for t in (k, v)])
    converted.load_state_dict(state, strict=True)
    return converted.train(model.training)
