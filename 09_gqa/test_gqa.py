"""Tests of gqa.py and of 04's grouped-query attention: GQA == torch SDPA with enable_gqa and with repeated KV
heads, MHA and MQA as the two ends, MHA -> GQA conversion (mean-pooling exact when a group's heads are equal),
cache bytes measured == the formula, published configurations by hand, bad arguments."""

import pytest
import torch
import torch.nn.functional as F

from gqa import (PUBLISHED_CONFIGS, convert_to_gqa, held_bytes, kv_cache_bytes_per_token, kv_head_of_query_head,
                 mla_cache_bytes_per_token)
from positional_embeddings import apply_rope
from testing import require
from transformer import AttentionContext, ConcatKVCache, MiniFormer, TransformerConfig


def tiny_config(**overrides) -> TransformerConfig:
    settings = dict(vocab_size=37, context_length=24, num_layers=2, num_heads=4, embed_dim=32)
    settings.update(overrides)
    return TransformerConfig(**settings)


def build(config, seed=0, std=0.3):
    """A model with large random weights, so that attention is far from uniform and mistakes show."""
    torch.manual_seed(seed)
    model = MiniFormer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model


def random_ids(config, batch=2, length=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length or config.context_length), generator=generator)


# ------------------------------------------------------------------------------------------------
# GQA is SDPA with shared KV heads; MHA and MQA are its two ends
# ------------------------------------------------------------------------------------------------

def projections(attention, x, config, offset=0):
    """q (B, H, T, D) and k, v (B, H_kv, T, D) from an attention layer's own fused projection."""
    B, T, _ = x.shape
    D, H, H_kv = config.head_dim, config.num_heads, config.kv_heads
    q, k, v = attention.qkv(x).split([H * D, H_kv * D, H_kv * D], dim=-1)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    if config.position == "rope":
        q, k = apply_rope(q, offset=offset), apply_rope(k, offset=offset)
    return q, k, v


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_gqa_equals_torch_sdpa_with_enable_gqa_and_with_repeated_heads(num_kv_heads, position):
    config = tiny_config(num_kv_heads=num_kv_heads, position=position)
    attention = build(config).blocks[0].attn
    x = torch.randn(2, 11, config.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = attention(x, AttentionContext(offset=0))
        q, k, v = projections(attention, x, config)
        groups = config.num_heads // num_kv_heads
        built_in = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        repeated = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                                  is_causal=True)
    torch.testing.assert_close(built_in, repeated, atol=1e-6, rtol=1e-5)
    expected = attention.out(built_in.transpose(1, 2).reshape(2, 11, config.embed_dim))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_query_heads_read_their_groups_kv_head():
    assert kv_head_of_query_head(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert kv_head_of_query_head(4, 4).tolist() == [0, 1, 2, 3]  # MHA: every head its own
    assert kv_head_of_query_head(4, 1).tolist() == [0, 0, 0, 0]  # MQA: one head for all


def test_mha_and_mqa_are_the_two_ends():
    """H_kv = H has the parameter count and cache of plain MHA; H_kv = 1 caches one head, and its output is
    attention in which every query head reads the same keys and values."""
    mha, mqa = tiny_config(num_kv_heads=4), tiny_config(num_kv_heads=1)
    assert sum(p.numel() for p in build(mha).parameters()) == sum(p.numel() for p in build(tiny_config()).parameters())
    attention = build(mqa).blocks[0].attn
    assert attention.qkv.weight.shape == ((4 + 2) * mqa.head_dim, mqa.embed_dim)
    x = torch.randn(1, 9, mqa.embed_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        q, k, v = projections(attention, x, mqa)  # k, v: (1, 1, 9, D)
        scores = q @ k.transpose(-2, -1) / mqa.head_dim ** 0.5  # (1, H, 9, 9): k broadcast to every head
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
        by_hand = attention.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 9, -1))
        ours, _ = attention(x, AttentionContext(offset=0))
    torch.testing.assert_close(ours, by_hand, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Conversion of a trained MHA model
# ------------------------------------------------------------------------------------------------

def with_identical_heads_per_group(model, num_kv_heads):
    """Make the key and value rows of all heads in a group equal to the group's first head (in place)."""
    config = model.config
    D, H = config.head_dim, config.num_heads
    group = H // num_kv_heads
    with torch.no_grad():
        for block in model.blocks:
            for tensor in (block.attn.qkv.weight, block.attn.qkv.bias):
                for part in (1, 2):  # keys, values
                    rows = tensor[part * H * D:(part + 1) * H * D].view(num_kv_heads, group, D, *tensor.shape[1:])
                    rows.copy_(rows[:, :1].expand_as(rows).clone())
    return model


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_mean_pooling_is_exact_when_the_heads_of_a_group_are_identical(num_kv_heads):
    config = tiny_config(position="rope")
    model = with_identical_heads_per_group(build(config), num_kv_heads)
    ids = random_ids(config)
    with torch.no_grad():
        expected = model(ids)
        for method in ("mean", "first"):
            converted = convert_to_gqa(model, num_kv_heads, method)
            assert converted.config.kv_heads == num_kv_heads
            torch.testing.assert_close(converted(ids), expected, atol=1e-5, rtol=1e-5)
        assert (convert_to_gqa(model, num_kv_heads, "random")(ids) - expected).abs().max() > 1e-2


def test_mean_pooling_averages_the_group_and_keeps_everything_else():
    config = tiny_config()
    model = build(config)
    converted = convert_to_gqa(model, 2, "mean")
    D, E = config.head_dim, config.embed_dim
    old, new = model.blocks[1].attn.qkv.weight, converted.blocks[1].attn.qkv.weight  # (3E, E) -> (E + 2*2D, E)
    torch.testing.assert_close(new[:E], old[:E])  # queries unchanged
    keys = old[E:2 * E].view(4, D, E)
    torch.testing.assert_close(new[E:E + D], (keys[0] + keys[1]) / 2)  # KV head 0 = mean of heads 0, 1
    torch.testing.assert_close(new[E + D:E + 2 * D], (keys[2] + keys[3]) / 2)
    values = old[2 * E:].view(4, D, E)
    torch.testing.assert_close(new[E + 3 * D:], (values[2] + values[3]) / 2)
    old_state, new_state = model.state_dict(), converted.state_dict()
    for name, tensor in old_state.items():
        if "qkv" not in name:
            assert torch.equal(new_state[name], tensor), name
    assert model.config.kv_heads == 4  # the source model is untouched


def test_first_head_picks_the_first_head_of_each_group_and_random_is_seeded():
    config = tiny_config()
    model = build(config)
    D, E = config.head_dim, config.embed_dim
    first = convert_to_gqa(model, 2, "first").blocks[0].attn.qkv.weight
    keys = model.blocks[0].attn.qkv.weight[E:2 * E].view(4, D, E)
    torch.testing.assert_close(first[E:E + 2 * D].view(2, D, E), keys[[0, 2]])
    random_a = convert_to_gqa(model, 2, "random", seed=3).blocks[0].attn.qkv.weight
    random_b = convert_to_gqa(model, 2, "random", seed=3).blocks[0].attn.qkv.weight
    assert torch.equal(random_a, random_b)
    assert abs(random_a[E:].std().item() - 0.02) < 0.005  # MiniFormer's initialisation std


def test_converting_an_already_grouped_model_pools_its_kv_heads():
    config = tiny_config(num_kv_heads=2)
    model = with_identical_heads_per_group(build(tiny_config()), 1)
    grouped = convert_to_gqa(model, 2, "first")
    ids = random_ids(config)
    with torch.no_grad():
        torch.testing.assert_close(convert_to_gqa(grouped, 1, "mean")(ids), model(ids), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# KV-cache bytes: formula == what the cache holds; published configurations by hand
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cache_bytes_held_equal_the_formula(num_kv_heads, dtype):
    config = tiny_config(num_kv_heads=num_kv_heads, position="rope")
    model = build(config).to(dtype)
    cache = ConcatKVCache()
    with torch.no_grad():
        model(random_ids(config, batch=3, length=10), kv_cache=cache)
        model(random_ids(config, batch=3, length=1), kv_cache=cache)
    per_token = kv_cache_bytes_per_token(config.num_layers, num_kv_heads, config.head_dim, dtype.itemsize)
    assert held_bytes(cache) == per_token * 3 * 11


def test_published_cache_sizes_by_hand():
    sizes = {c.name: c.cache_bytes_per_token(2) for c in PUBLISHED_CONFIGS}
    assert sizes["Llama-2-7B"] == 2 * 32 * 32 * 128 * 2 == 512 * 1024  # MHA: 512 KiB per token
    assert sizes["Llama-3-8B"] == sizes["Mistral-7B"] == 2 * 32 * 8 * 128 * 2 == 128 * 1024  # GQA-8: 4x less
    assert sizes["DeepSeek-V2"] == (512 + 64) * 60 * 2 == 69_120
    deepseek = next(c for c in PUBLISHED_CONFIGS if c.name == "DeepSeek-V2")
    # DeepSeek-V2 paper, Table 1: MLA caches (d_c + d_h^R) l = 4.5 d_h l elements, "GQA with 2.25 groups"
    assert deepseek.kv_rank + deepseek.rope_head_dim == 4.5 * deepseek.head_dim == 2 * 2.25 * deepseek.head_dim
    assert [c.attention for c in PUBLISHED_CONFIGS] == ["MHA", "GQA-8", "GQA-8", "MLA"]
    assert mla_cache_bytes_per_token(1, 4, 0, 4) == 16


def test_llama_and_mistral_constants_match_transformers_defaults():
    """transformers' LlamaConfig and MistralConfig default to Llama-2-7B and Mistral-7B: an independent copy."""
    transformers = require("transformers")
    for name, hf in (("Llama-2-7B", transformers.LlamaConfig()), ("Mistral-7B", transformers.MistralConfig())):
        ours = next(c for c in PUBLISHED_CONFIGS if c.name == name)
        kv_heads = hf.num_key_value_heads or hf.num_attention_heads
        assert (ours.num_layers, ours.hidden_size, ours.num_heads, ours.num_kv_heads, ours.head_dim) == \
            (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, kv_heads,
             hf.hidden_size // hf.num_attention_heads), name


# ------------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, name", [
    (lambda: kv_cache_bytes_per_token(0, 1, 8, 2), "num_layers"),
    (lambda: kv_cache_bytes_per_token(2, 1.5, 8, 2), "num_kv_heads"),
    (lambda: kv_cache_bytes_per_token(2, 1, 8, True), "bytes_per_element"),
    (lambda: mla_cache_bytes_per_token(2, 0, 8, 2), "kv_rank"),
    (lambda: mla_cache_bytes_per_token(2, 8, -2, 2), "rope_head_dim"),
    (lambda: kv_head_of_query_head(4, 3), "num_kv_heads"),
    (lambda: kv_head_of_query_head(0, 1), "num_heads"),
])
def test_bad_sizes_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_bad_conversions_raise():
    model = build(tiny_config(num_kv_heads=2))
    with pytest.raises(ValueError, match="num_kv_heads"):
        convert_to_gqa(model, 4)  # more KV heads than the model has
    with pytest.raises(ValueError, match="num_kv_heads"):
        convert_to_gqa(build(tiny_config(num_heads=8, embed_dim=48, num_kv_heads=4)), 3)
    with pytest.raises(ValueError, match="method"):
        convert_to_gqa(model, 1, "median")
    with pytest.raises(TypeError, match="model"):
        convert_to_gqa(torch.nn.Linear(2, 2), 1)
