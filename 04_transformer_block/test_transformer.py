"""Tests of the mini-former: Hugging Face logits equality, causality, KV cache == full forward,
sdpa == from-scratch attention, weight tying, a closed-form parameter count, and config errors."""

import dataclasses

import pytest
import torch

from transformer import (ConcatKVCache, MiniFormer, POSITIONS, TransformerConfig, char_shakespeare_batches,
                         lab_model_config, miniformer_from_hf_gpt2, miniformer_from_hf_llama, register_ffn,
                         register_norm)


def tiny_config(**overrides) -> TransformerConfig:
    settings = dict(vocab_size=37, context_length=24, num_layers=2, num_heads=4, embed_dim=32)
    settings.update(overrides)
    return TransformerConfig(**settings)


def random_ids(config, batch=2, length=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length or config.context_length), generator=generator)


def build(config, seed=0):
    torch.manual_seed(seed)
    return MiniFormer(config).eval()


# ------------------------------------------------------------------------------------------------
# Hugging Face interop: random weights from a config, no download
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layer, n_head, n_embd, n_positions, vocab, length", [
    (1, 1, 16, 8, 11, 8),
    (2, 4, 32, 32, 50, 17),
    (3, 6, 48, 20, 97, 20),
])
def test_gpt2_logits_equal_hugging_face(n_layer, n_head, n_embd, n_positions, vocab, length):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf_config = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # HF zero-initialises biases and sets LayerNorm to (1, 0): randomise them all
        for parameter in hf_model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    ours = miniformer_from_hf_gpt2(hf_model)
    ids = torch.randint(0, vocab, (3, length))
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = ours(ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert ours.config.gelu_approximate == "tanh" and ours.config.tie_weights
    assert ours.head.weight.data_ptr() == ours.token_embedding.weight.data_ptr()


@pytest.mark.parametrize("layers, heads, kv_heads, hidden, intermediate, tie, theta, eps", [
    (1, 4, 4, 32, 64, False, 10000.0, 1e-6),  # plain multi-head attention
    (2, 4, 2, 32, 80, False, 500000.0, 1e-5),  # grouped KV heads, Llama-3's rope_theta
    (2, 8, 1, 64, 96, True, 10000.0, 1e-6),  # multi-query attention, tied head
])
def test_llama_logits_equal_hugging_face(layers, heads, kv_heads, hidden, intermediate, tie, theta, eps):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    hf_config = transformers.LlamaConfig(
        vocab_size=71, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64, rms_norm_eps=eps,
        tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": theta})
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # RMSNorm gains start at 1: randomise them so a misplaced gain would show
        for name, parameter in hf_model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    ours = miniformer_from_hf_llama(hf_model)
    assert (ours.config.kv_heads, ours.config.rope_base, ours.config.norm_eps) == (kv_heads, theta, eps)
    ids = torch.randint(0, 71, (2, 19))
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = ours(ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_llama_interop_rejects_rope_scaling():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type"):
        miniformer_from_hf_llama(transformers.LlamaForCausalLM(hf_config))


# ------------------------------------------------------------------------------------------------
# Properties: causality, cache == no cache, sdpa == scratch
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("norm_placement", ["pre", "post"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(position, norm_placement):
    config = tiny_config(position=position, norm_placement=norm_placement)
    model = build(config)
    ids = random_ids(config, length=16)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % config.vocab_size
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :10], before[:, :10], atol=1e-6, rtol=0)
    assert (after[:, 10:] - before[:, 10:]).abs().max() > 1e-4  # the change is seen from position 10 on


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
def test_forwarding_token_by_token_with_a_cache_equals_the_full_forward(position, num_kv_heads):
    config = tiny_config(position=position, num_kv_heads=num_kv_heads, ffn="swiglu", norm="rmsnorm")
    model = build(config)
    ids = random_ids(config, length=20)
    cache = ConcatKVCache()
    with torch.no_grad():
        full = model(ids)
        pieces = [model(ids[:, :5], kv_cache=cache)]  # a prompt, then one token at a time
        pieces += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(5, 20)]
    assert cache.offset == 20
    assert cache.keys[0].shape == (2, config.kv_heads, 20, config.head_dim)  # the cache holds H_kv heads only
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_generation_with_and_without_cache_is_identical(position):
    config = tiny_config(position=position, num_kv_heads=2, context_length=12)
    model = build(config)
    prompt = random_ids(config, batch=2, length=4)
    # 20 new tokens > context_length: the cached path must also slide its window like the uncached one
    with_cache = model.generate(prompt, 20, temperature=0, use_cache=True)
    without_cache = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 24)
    assert torch.equal(with_cache, without_cache)


def test_sampling_is_reproducible_with_a_generator():
    config = tiny_config()
    model = build(config)
    prompt = random_ids(config, batch=1, length=3)
    first = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    second = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


@pytest.mark.parametrize("position", ["learned", "alibi", "rope"])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_sdpa_and_from_scratch_attention_give_the_same_logits(position, num_kv_heads):
    config = tiny_config(position=position, num_kv_heads=num_kv_heads)
    sdpa_model = build(config)
    scratch_model = MiniFormer(dataclasses.replace(config, attention="scratch")).eval()
    scratch_model.load_state_dict(sdpa_model.state_dict())
    ids = random_ids(config)
    with torch.no_grad():
        torch.testing.assert_close(scratch_model(ids), sdpa_model(ids), atol=1e-5, rtol=1e-5)
        cache = ConcatKVCache()  # the explicit-mask path (with a cache) too
        scratch_model(ids[:, :10], kv_cache=cache)
        torch.testing.assert_close(scratch_model(ids[:, 10:], kv_cache=cache), sdpa_model(ids)[:, 10:],
                                   atol=1e-5, rtol=1e-5)


def test_forward_with_hidden_and_logit_lens():
    config = tiny_config(num_layers=3)
    model = build(config)
    ids = random_ids(config)
    with torch.no_grad():
        logits, hidden = model.forward_with_hidden(ids)
        assert len(hidden) == config.num_layers + 1
        assert all(h.shape == (2, config.context_length, config.embed_dim) for h in hidden)
        torch.testing.assert_close(model.final_norm_and_head(hidden[-1]), logits)
        torch.testing.assert_close(logits, model(ids))


def test_residual_ablation_changes_the_function():
    config = tiny_config()
    with_residual, without_residual = build(config), MiniFormer(dataclasses.replace(config, residual=False)).eval()
    without_residual.load_state_dict(with_residual.state_dict())
    ids = random_ids(config)
    with torch.no_grad():
        assert (with_residual(ids) - without_residual(ids)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Structure: tying, parameter count, initialisation, seams
# ------------------------------------------------------------------------------------------------

def test_weight_tying_shares_storage_and_untying_does_not():
    tied = build(tiny_config(tie_weights=True))
    untied = build(tiny_config(tie_weights=False))
    assert tied.head.weight.data_ptr() == tied.token_embedding.weight.data_ptr()
    assert untied.head.weight.data_ptr() != untied.token_embedding.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == 37 * 32


def test_parameter_count_equals_the_closed_form():
    V, C, L, E, F = 65, 64, 4, 128, 512  # the lab model: GELU MLP, LayerNorm, learned positions, biases, tied
    per_block = (2 * E) + (E * 3 * E + 3 * E) + (E * E + E) + (2 * E) + (E * F + F) + (F * E + E)
    expected = V * E + C * E + L * per_block + 2 * E
    model = MiniFormer(lab_model_config(V))
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - V * E - C * E


def test_parameter_count_with_grouped_kv_heads_swiglu_and_rope():
    V, C, L, E, H, H_kv = 50, 16, 2, 64, 8, 2
    D, F = E // H, int(2 * 4 * E / 3)  # the 2/3 rule
    config = TransformerConfig(vocab_size=V, context_length=C, num_layers=L, num_heads=H, embed_dim=E,
                               num_kv_heads=H_kv, ffn="swiglu", norm="rmsnorm", position="rope", bias=False,
                               tie_weights=False)
    per_block = E + E * (H + 2 * H_kv) * D + E * E + E + 3 * E * F
    assert MiniFormer(config).num_parameters() == V * E + L * per_block + E + E * V


def test_initialisation_scales_residual_projections_by_depth():
    config = lab_model_config(65, num_layers=8, embed_dim=256, num_heads=4)
    model = build(config)
    expected_residual_std = 0.02 / (2 * 8) ** 0.5
    block = model.blocks[0]
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(block.attn.out.weight.std().item() - expected_residual_std) < 0.1 * expected_residual_std
    assert abs(block.ffn.down.weight.std().item() - expected_residual_std) < 0.1 * expected_residual_std


def test_registered_norm_and_ffn_are_used():
    class ScaledNorm(torch.nn.Module):
        def __init__(self, dim, eps):
            super().__init__()
            self.inner = torch.nn.LayerNorm(dim, eps=eps)

        def forward(self, x):
            return 2.0 * self.inner(x)

    class ZeroFFN(torch.nn.Module):
        def __init__(self, config):
            super().__init__()

        def forward(self, x):
            return torch.zeros_like(x)

    register_norm("test_scaled", ScaledNorm)
    register_ffn("test_zero", ZeroFFN)
    model = build(tiny_config(norm="test_scaled", ffn="test_zero"))
    assert isinstance(model.blocks[0].norm1, ScaledNorm) and isinstance(model.blocks[1].ffn, ZeroFFN)
    assert model(random_ids(model.config)).shape == (2, 24, 37)


def test_lab_model_config_is_the_nanogpt_reference_size():
    config = lab_model_config(65, dropout=0.1)
    assert (config.num_layers, config.num_heads, config.embed_dim, config.context_length) == (4, 4, 128, 64)
    assert (config.norm_placement, config.norm, config.ffn, config.position) == ("pre", "layernorm", "gelu", "learned")
    assert config.tie_weights and config.dropout == 0.1


def test_char_shakespeare_batches_shapes_and_targets():
    batch_fn, vocab, _ = char_shakespeare_batches(context_length=16, batch_size=3, device="cpu",
                                                  generator=torch.Generator().manual_seed(0))
    for split in ("train", "val"):
        x, y = batch_fn(split)
        assert x.shape == y.shape == (3, 16)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        assert int(x.max()) < vocab.size
    with pytest.raises(ValueError, match="split"):
        batch_fn("test")


# ------------------------------------------------------------------------------------------------
# Errors name the field
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(context_length=0), "context_length"),
    (dict(num_layers=0), "num_layers"),
    (dict(num_heads=0), "num_heads"),
    (dict(embed_dim=30), "embed_dim"),  # not divisible by 4 heads
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(ffn_hidden_size=0), "ffn_hidden_size"),
    (dict(norm="batchnorm"), "norm"),
    (dict(ffn="relu"), "ffn"),
    (dict(position="absolute"), "position"),
    (dict(norm_placement="sandwich"), "norm_placement"),
    (dict(attention="flash"), "attention"),
    (dict(rope_layout="pairs"), "rope_layout"),
    (dict(gelu_approximate="sigmoid"), "gelu_approximate"),
    (dict(dropout=1.0), "dropout"),
    (dict(rope_base=1.0), "rope_base"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(embed_dim=36, num_heads=12, position="rope"), "head_dim"),  # head_dim 3 is odd
])
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_bad_generate_arguments_raise():
    model = build(tiny_config())
    prompt = random_ids(model.config, length=3)
    for kwargs, name in ((dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.5), "temperature"),
                         (dict(top_k=0), "top_k")):
        arguments = dict(max_new_tokens=2) | kwargs
        with pytest.raises(ValueError, match=name):
            model.generate(prompt, **arguments)


def test_learned_positions_beyond_the_context_raise():
    model = build(tiny_config(position="learned"))
    with pytest.raises(ValueError, match="max_positions"):
        model(random_ids(model.config, length=25))
