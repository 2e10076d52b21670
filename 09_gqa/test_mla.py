"""Tests of multi-head latent attention: logits equal Hugging Face's DeepseekV3ForCausalLM, absorbed path ==
naive path (values, gradients, greedy tokens with the cache), cached == full forward, cache bytes ==
(d_c + d_rope) * layers * bytes per element per token, the depth-scaled output init, bad arguments."""

import functools

import pytest
import torch

from gqa import held_bytes, mla_cache_bytes_per_token
from mla import LatentKVCache, MultiHeadLatentAttention, mla_factory, register_mla, use_absorbed_path
from mla_interop import miniformer_from_hf_deepseek_v3
from test_gqa import build as build_with_large_weights
from test_transformer import check_reorder
from testing import require
from transformer import ConcatKVCache, MiniFormer, TransformerConfig, unregister


@pytest.fixture
def mla():
    """register_mla(...) -> a TransformerConfig attention_module name; unregistered after the test."""
    names = []

    def make(*args, **kwargs):
        names.append(register_mla(*args, **kwargs))
        return names[-1]

    yield make
    for name in set(names):
        unregister("attention", name)


def tiny_config(attention_module, **overrides) -> TransformerConfig:
    settings = dict(vocab_size=37, context_length=24, num_layers=2, num_heads=4, embed_dim=32, position="rope",
                    attention_module=attention_module)
    settings.update(overrides)
    return TransformerConfig(**settings)


# Large random weights (attention far from uniform, so mistakes show); MLA's tests use a smaller std.
build = functools.partial(build_with_large_weights, std=0.2)


def random_ids(vocab_size, batch=2, length=16, seed=0):
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# settings: (kv_rank, rope_head_dim, query_rank, position)
VARIANTS = [(16, 8, None, "rope"), (8, 4, 12, "rope"), (12, 0, None, "learned"), (6, 2, 10, "rope")]


# ------------------------------------------------------------------------------------------------
# Hugging Face DeepseekV3ForCausalLM (dense MLPs, random weights, no download)
# ------------------------------------------------------------------------------------------------

def hf_deepseek(transformers, interleave, query_rank, layers=2, seed=0):
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(
        vocab_size=53, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=query_rank, qk_rope_head_dim=8, qk_nope_head_dim=12,
        v_head_dim=10, first_k_dense_replace=layers, max_position_embeddings=64, rope_interleave=interleave,
        initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # norm gains start at 1: randomise them so a misplaced gain would show
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("query_rank", [None, 24])
def test_logits_equal_hugging_face_deepseek_v3(interleave, query_rank):
    transformers = require("transformers")
    hf_model = hf_deepseek(transformers, interleave, query_rank)
    ours = miniformer_from_hf_deepseek_v3(hf_model)
    try:
        assert ours.config.rope_layout == ("interleaved" if interleave else "half")
        ids = random_ids(53, batch=3, length=21)
        with torch.no_grad():
            expected = hf_model(ids).logits
            torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-4)
            use_absorbed_path(ours)
            torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-4)
            ours.config.rope_layout = "half" if interleave else "interleaved"  # the other layout must not match
            for block in ours.blocks:
                block.attn.rope_layout = ours.config.rope_layout
            assert (ours(ids) - expected).abs().max() > 1e-3
    finally:
        unregister("attention", ours.config.attention_module)


def test_hugging_face_cache_and_ours_hold_the_same_latent_per_token():
    """HF's DynamicCache keeps MLA's compressed latent and RoPE key, as LatentKVCache does: same sizes."""
    transformers = require("transformers")
    hf_model = hf_deepseek(transformers, True, None)
    ours = miniformer_from_hf_deepseek_v3(hf_model)
    try:
        ids = random_ids(53, batch=1, length=9)
        cache = LatentKVCache()
        with torch.no_grad():
            hf_out = hf_model(ids, use_cache=True)
            ours(ids, kv_cache=cache)
        hf_bytes = sum(t.numel() * t.element_size() for layer in hf_out.cache.layers for t in (layer.keys, layer.values))
        assert held_bytes(cache) == hf_bytes == mla_cache_bytes_per_token(2, 16, 8, 4) * 9
    finally:
        unregister("attention", ours.config.attention_module)


def test_interop_rejects_mixture_of_experts_layers():
    transformers = require("transformers")
    hf_model = hf_deepseek(transformers, True, None)
    hf_model.config.first_k_dense_replace = 1
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        miniformer_from_hf_deepseek_v3(hf_model)


# ------------------------------------------------------------------------------------------------
# Absorbed path == naive path
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_rank, rope_head_dim, query_rank, position", VARIANTS)
def test_absorbed_path_equals_naive_path(mla, kv_rank, rope_head_dim, query_rank, position):
    config = tiny_config(mla(kv_rank, rope_head_dim, query_rank), position=position)
    model = build(config)
    ids = random_ids(config.vocab_size)
    with torch.no_grad():
        naive = model(ids)
        absorbed = use_absorbed_path(model)(ids)
    assert naive.std() > 0.1  # large weights: logits far from zero, so a wrong fold would show
    torch.testing.assert_close(absorbed, naive, atol=1e-4, rtol=1e-4)


def test_absorbed_and_naive_gradients_are_equal(mla):
    config = tiny_config(mla(8, 4, 12))
    ids = random_ids(config.vocab_size)
    gradients = []
    for absorbed in (False, True):
        model = use_absorbed_path(build(config).train(), absorbed)
        model(ids).logsumexp(-1).mean().backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("kv_rank, rope_head_dim, query_rank, position", VARIANTS)
def test_greedy_tokens_with_the_latent_cache_are_the_same_on_both_paths(mla, kv_rank, rope_head_dim, query_rank,
                                                                         position):
    config = tiny_config(mla(kv_rank, rope_head_dim, query_rank), position=position, context_length=12)
    model = build(config, std=0.1)
    prompt = random_ids(config.vocab_size, batch=2, length=5)
    uncached = model.generate(prompt, 20, temperature=0, use_cache=False)  # 25 tokens: past the context, refills
    naive = model.generate(prompt, 20, temperature=0)  # the default cache is the module's: model.new_cache()
    absorbed = use_absorbed_path(model).generate(prompt, 20, temperature=0, cache_factory=LatentKVCache)
    assert torch.equal(naive, uncached) and torch.equal(absorbed, uncached)


@pytest.mark.parametrize("absorbed", [False, True])
def test_the_latent_cache_is_the_default_and_reorders_rows_for_beam_search(mla, absorbed):
    """model.new_cache() is the latent cache, not 04's ConcatKVCache, and its reorder() is exact."""
    model = use_absorbed_path(build(tiny_config(mla(8, 4, 12))), absorbed)
    assert isinstance(model.new_cache(), LatentKVCache)
    check_reorder(model, model.new_cache())


@pytest.mark.parametrize("absorbed", [False, True])
def test_token_by_token_with_the_cache_equals_the_full_forward(mla, absorbed):
    config = tiny_config(mla(8, 4, 12))
    model = use_absorbed_path(build(config), absorbed)
    ids = random_ids(config.vocab_size, length=14)
    cache = LatentKVCache()
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :6], kv_cache=cache)]  # a prefill, then chunks of 1 and 3 tokens
        for start, stop in ((6, 7), (7, 10), (10, 14)):
            steps.append(model(ids[:, start:stop], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_folded_weights_follow_weights_changed_in_place(mla):
    config = tiny_config(mla(8, 4))
    model = use_absorbed_path(build(config))
    ids = random_ids(config.vocab_size)
    with torch.no_grad():
        model(ids)  # folds and keeps the folded weights
        for block in model.blocks:
            block.attn.kv_up.weight.mul_(1.5)
        absorbed = model(ids)
        naive = use_absorbed_path(model, False)(ids)
    torch.testing.assert_close(absorbed, naive, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("absorbed", [False, True])
def test_attention_weights_are_causal_distributions_and_change_nothing(mla, absorbed):
    config = tiny_config(mla(8, 4))
    model = use_absorbed_path(build(config), absorbed)
    ids = random_ids(config.vocab_size, length=10)
    with torch.no_grad():
        logits, weights = model(ids, return_attention=True)
        torch.testing.assert_close(logits, model(ids), atol=1e-5, rtol=1e-5)
    for layer in weights:
        assert layer.shape == (2, 4, 10, 10)
        torch.testing.assert_close(layer.sum(-1), torch.ones(2, 4, 10))
        assert layer.triu(1).abs().max() == 0


def test_changing_a_future_token_leaves_earlier_logits_unchanged(mla):
    config = tiny_config(mla(8, 4, 12))
    model = use_absorbed_path(build(config))
    ids = random_ids(config.vocab_size, batch=1, length=12)
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % config.vocab_size
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert (before[:, 8:] - after[:, 8:]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# The cache: what it holds, what 04's ConcatKVCache cannot hold
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_rank, rope_head_dim, query_rank, position", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_equal_latent_plus_rope_key_per_layer_per_token(mla, kv_rank, rope_head_dim, query_rank, position,
                                                                      dtype):
    config = tiny_config(mla(kv_rank, rope_head_dim, query_rank), position=position, num_layers=3)
    model = build(config).to(dtype)
    cache = LatentKVCache()
    with torch.no_grad():
        model(random_ids(config.vocab_size, batch=2, length=7), kv_cache=cache)
        model(random_ids(config.vocab_size, batch=2, length=1), kv_cache=cache)
    per_token = (kv_rank + rope_head_dim) * config.num_layers * dtype.itemsize
    assert per_token == mla_cache_bytes_per_token(config.num_layers, kv_rank, rope_head_dim, dtype.itemsize)
    assert held_bytes(cache) == per_token * 2 * 8
    assert cache.latents[0].shape == (2, 1, 8, kv_rank) and cache.rope_keys[0].shape == (2, 1, 8, rope_head_dim)


def test_concat_kv_cache_cannot_hold_the_latent_and_the_rope_key(mla):
    """04's ConcatKVCache wants keys and values of one shape; MLA's two tensors differ (d_c vs d_rope)."""
    model = build(tiny_config(mla(8, 4)))
    with pytest.raises(ValueError, match="same shape"):
        model(random_ids(37), kv_cache=ConcatKVCache())


def test_latent_cache_rejects_inconsistent_updates():
    cache = LatentKVCache()
    with pytest.raises(ValueError, match="latent and rope_key"):
        cache.update(0, torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 2, 4))
    cache.update(0, torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="offset"):
        cache.update(0, torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 4))  # advance() was not called
    cache.advance(3)
    with pytest.raises(ValueError, match="continue"):
        cache.update(0, torch.zeros(1, 1, 1, 6), torch.zeros(1, 1, 1, 4))
    with pytest.raises(ValueError, match="nothing cached"):
        cache.update(1, torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 4))


# ------------------------------------------------------------------------------------------------
# Initialisation and bad arguments
# ------------------------------------------------------------------------------------------------

def test_output_projection_gets_the_depth_scaled_init(mla):
    config = tiny_config(mla(16, 8), num_layers=8, embed_dim=128, num_heads=4)
    torch.manual_seed(0)
    attention = MiniFormer(config).blocks[0].attn
    assert isinstance(attention, MultiHeadLatentAttention)
    assert abs(attention.out.weight.std().item() - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert abs(attention.kv_up.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("kwargs, name", [
    (dict(kv_rank=0, rope_head_dim=4), "kv_rank"),
    (dict(kv_rank=8.0, rope_head_dim=4), "kv_rank"),
    (dict(kv_rank=8, rope_head_dim=3), "rope_head_dim"),
    (dict(kv_rank=8, rope_head_dim=-2), "rope_head_dim"),
    (dict(kv_rank=8, rope_head_dim=4, query_rank=0), "query_rank"),
    (dict(kv_rank=8, rope_head_dim=4, value_head_dim=True), "value_head_dim"),
])
def test_bad_factory_settings_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mla_factory(**kwargs)


@pytest.mark.parametrize("rope_head_dim, position", [(4, "learned"), (0, "rope"), (4, "alibi")])
def test_rope_head_dim_must_agree_with_the_position_encoding(mla, rope_head_dim, position):
    name = mla(8, rope_head_dim)
    with pytest.raises(ValueError, match="rope_head_dim|alibi"):
        MiniFormer(tiny_config(name, position=position))


def test_use_absorbed_path_needs_an_mla_model_and_a_bool(mla):
    with pytest.raises(ValueError, match="MultiHeadLatentAttention"):
        use_absorbed_path(MiniFormer(tiny_config("causal")))
    with pytest.raises(ValueError, match="absorbed"):
        use_absorbed_path(build(tiny_config(mla(8, 4))), "yes")
