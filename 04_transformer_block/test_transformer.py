"""Tests of the mini-former: Hugging Face logits equality, causality, KV cache == full forward,
sdpa == from-scratch attention, weight tying, a closed-form parameter count, and config errors."""

import dataclasses

import pytest
import torch

from hf_interop import miniformer_from_hf_gpt2, miniformer_from_hf_llama
from lab import lab_model_config
from testing import require
from transformer import (ConcatKVCache, MiniFormer, POSITIONS, TransformerConfig, register_ffn, register_norm,
                         unregister)


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
    transformers = require("transformers")
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
    transformers = require("transformers")
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
    transformers = require("transformers")
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
    try:
        model = build(tiny_config(norm="test_scaled", ffn="test_zero"))
        assert isinstance(model.blocks[0].norm1, ScaledNorm) and isinstance(model.blocks[1].ffn, ZeroFFN)
        assert model(random_ids(model.config)).shape == (2, 24, 37)
    finally:  # leave the global registries as the other tests expect them
        unregister("norm", "test_scaled")
        unregister("ffn", "test_zero")
    with pytest.raises(ValueError, match="norm"):
        tiny_config(norm="test_scaled")


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


# ------------------------------------------------------------------------------------------------
# Seams for later topics: attention registry, cache protocol, attention weights, residual marking,
# the one generation loop
# ------------------------------------------------------------------------------------------------

class ShuffledKVCache(ConcatKVCache):
    """Holds the same keys as ConcatKVCache but hands them to attention in a scrambled order, with their
    positions: attention must follow key_positions, not assume keys 0 .. T-1 in order."""

    def __init__(self, seed=0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.orders = {}

    def update(self, layer_index, k, v):
        k_all, v_all = super().update(layer_index, k, v)
        order = torch.randperm(k_all.shape[2], generator=self.generator)
        self.orders[layer_index] = order
        return k_all[:, :, order], v_all[:, :, order]

    def key_positions(self, layer_index):
        return super().key_positions(layer_index)[self.orders[layer_index]]


@pytest.mark.parametrize("position", POSITIONS)
def test_attention_follows_the_positions_the_cache_reports(position):
    config = tiny_config(position=position, num_kv_heads=2)
    model = build(config)
    ids = random_ids(config, length=18)
    cache = ShuffledKVCache()
    with torch.no_grad():
        full = model(ids)
        pieces = [model(ids[:, :6], kv_cache=cache), model(ids[:, 6:11], kv_cache=cache)]  # chunked prefill
        pieces += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(11, 18)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_concat_cache_rejects_an_offset_that_disagrees_with_what_it_holds():
    config = tiny_config()
    model = build(config)
    ids = random_ids(config, length=8)
    cache = ConcatKVCache()
    with torch.no_grad():
        model(ids[:, :4], kv_cache=cache)
        cache.offset = 0  # a "reset" that forgot the keys: attention would silently be wrong
        with pytest.raises(ValueError, match="offset"):
            model(ids[:, 4:5], kv_cache=cache)
        cache = ConcatKVCache()
        model(ids[:, :4], kv_cache=cache)
        with pytest.raises(ValueError, match="batch size"):
            model(ids[:1, 4:5], kv_cache=cache)


def check_reorder(model, cache, atol=1e-5):
    """After cache.reorder([2, 0, 2]) the next step's logits equal a forward over the reordered full
    sequences (beam search relies on it); bad indices raise. 06 and 09 run it on their caches too."""
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    parents = torch.tensor([2, 0, 2])
    with torch.no_grad():
        model(ids[:, :8], kv_cache=cache)
        cache.reorder(parents)
        stepped = model(ids[parents, 8:9], kv_cache=cache)[:, -1]
        full = model(ids[parents])[:, -1]
    torch.testing.assert_close(stepped, full, atol=atol, rtol=0 if atol > 1e-5 else 1e-5)
    for bad in (torch.tensor([0, 1]), torch.tensor([0, 1, 3]), torch.tensor([0.0, 1.0, 2.0])):
        with pytest.raises(ValueError, match="batch_indices"):
            cache.reorder(bad)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_reordered_cache_continues_each_row_from_its_parent(position):
    check_reorder(build(tiny_config(position=position, num_kv_heads=2)), ConcatKVCache())


def test_new_cache_is_the_kind_the_attention_module_names():
    from transformer import CausalSelfAttention, register_attention

    class RecordingCache(ConcatKVCache):
        made = 0

        def __init__(self):
            super().__init__()
            RecordingCache.made += 1

    class AttentionWithItsOwnCache(CausalSelfAttention):
        cache_factory = RecordingCache

    register_attention("test_own_cache", AttentionWithItsOwnCache)
    try:
        model = build(tiny_config(attention_module="test_own_cache"))
        assert isinstance(model.new_cache(), RecordingCache)
        ids = random_ids(model.config, batch=1, length=4)
        cached = model.generate(ids, 5, temperature=0)  # the default cache is the module's
        assert RecordingCache.made == 2
        torch.testing.assert_close(cached, model.generate(ids, 5, temperature=0, use_cache=False))
    finally:
        unregister("attention", "test_own_cache")
    assert type(build(tiny_config()).new_cache()) is ConcatKVCache


@pytest.mark.parametrize("position", ["learned", "alibi", "rope"])
def test_returned_attention_weights_are_causal_distributions_and_change_nothing(position):
    config = tiny_config(position=position, num_kv_heads=2)
    model = build(config)
    ids = random_ids(config, length=10)
    with torch.no_grad():
        logits, weights = model(ids, return_attention=True)
        torch.testing.assert_close(logits, model(ids), atol=1e-5, rtol=1e-5)
    assert len(weights) == config.num_layers
    for layer_weights in weights:
        assert layer_weights.shape == (2, config.num_heads, 10, 10)
        torch.testing.assert_close(layer_weights.sum(-1), torch.ones(2, config.num_heads, 10))
        assert torch.all(layer_weights.triu(diagonal=1) == 0)  # nothing flows from the future


def test_attention_weights_of_layer_zero_equal_softmax_of_scores_by_hand():
    config = tiny_config(position="none", num_layers=1)
    model = build(config)
    ids = random_ids(config, batch=1, length=6)
    with torch.no_grad():
        _, (weights,) = model(ids, return_attention=True)
        x = model.blocks[0].norm1(model.token_embedding(ids))
        q, k, _ = model.blocks[0].attn.qkv(x).split(config.embed_dim, dim=-1)
        q = q.view(1, 6, config.num_heads, config.head_dim).transpose(1, 2)
        k = k.view(1, 6, config.num_heads, config.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / config.head_dim ** 0.5
        scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(weights, scores.softmax(-1), atol=1e-6, rtol=1e-5)


def test_a_registered_attention_module_is_built_and_used():
    from transformer import CausalSelfAttention, register_attention

    class UniformAttention(CausalSelfAttention):
        """Every query reads the mean of the values it may see: scores all zero."""

        def attend(self, q, k, v, context):
            return super().attend(torch.zeros_like(q), k, v, context)

    register_attention("test_uniform", UniformAttention)
    try:
        model = build(tiny_config(attention_module="test_uniform", position="none", num_layers=1))
        ids = random_ids(model.config, length=5)
        with torch.no_grad():
            _, (weights,) = model(ids, return_attention=True)
        expected = torch.tril(torch.ones(5, 5)) / torch.arange(1, 6)[:, None]
        torch.testing.assert_close(weights[0, 0], expected)
    finally:
        unregister("attention", "test_uniform")


def test_depth_scaled_init_follows_the_mark_not_the_name():
    from transformer import mark_residual_projection

    class OddlyNamedFFN(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.expand = torch.nn.Linear(config.embed_dim, 4 * config.embed_dim)
            self.write_back = mark_residual_projection(torch.nn.Linear(4 * config.embed_dim, config.embed_dim))

        def forward(self, x):
            return self.write_back(torch.relu(self.expand(x)))

    register_ffn("test_oddly_named", OddlyNamedFFN)
    try:
        model = build(lab_model_config(65, num_layers=8, embed_dim=256, ffn="test_oddly_named"))
    finally:
        unregister("ffn", "test_oddly_named")
    expected = 0.02 / (2 * 8) ** 0.5
    assert abs(model.blocks[0].ffn.write_back.weight.std().item() - expected) < 0.1 * expected
    assert abs(model.blocks[0].ffn.expand.weight.std().item() - 0.02) < 0.002


def test_generate_uses_the_given_sampler_and_cache():
    config = tiny_config(context_length=12)
    model = build(config)
    prompt = random_ids(config, batch=2, length=3)
    seen_lengths, caches = [], []

    def always_token_7(logits, tokens):
        seen_lengths.append(tokens.shape[1])
        return torch.full((logits.shape[0], 1), 7)

    def counting_cache():
        caches.append(ConcatKVCache())
        return caches[-1]

    out = model.generate(prompt, 15, sampler=always_token_7, cache_factory=counting_cache)
    assert torch.all(out[:, 3:] == 7) and seen_lengths == list(range(3, 18))
    # one cache fills to the 12-token context (3 prompt + 9 decoded); after that the window slides, learned
    # positions shift, and each of the last 5 steps refills a new cache from the last 12 tokens
    assert len(caches) == 1 + 5
    greedy = model.generate(prompt, 15, sampler=lambda logits, tokens: logits.argmax(-1, keepdim=True))
    assert torch.equal(greedy, model.generate(prompt, 15, temperature=0, use_cache=False))


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[0, 1, 37]]), "allowed range"),  # vocab_size is 37
    (torch.tensor([[0, -1, 2]]), "allowed range"),
    (torch.tensor([[0.0, 1.0]]), "integer"),
    (torch.tensor([1, 2, 3]), "shape"),
    (torch.zeros(2, 0, dtype=torch.long), "shape"),
])
def test_bad_token_ids_raise_value_error_naming_idx(ids, message):
    model = build(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(ids)
    with pytest.raises(ValueError, match="idx"):
        model.generate(ids, 2)


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=2.5), "top_k"), (dict(max_new_tokens=1.5), "max_new_tokens"), (dict(sampler=3), "sampler"),
])
def test_non_finite_or_mistyped_generate_arguments_raise(kwargs, name):
    model = build(tiny_config())
    arguments = dict(max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=name):
        model.generate(random_ids(model.config, length=3), **arguments)


@pytest.mark.parametrize("overrides, field", [
    (dict(norm_eps=float("nan")), "norm_eps"), (dict(norm_eps=float("inf")), "norm_eps"),
    (dict(rope_base=float("inf")), "rope_base"), (dict(num_kv_heads=2.0), "num_kv_heads"),
    (dict(attention_module="windowed"), "attention_module"), (dict(dropout=float("nan")), "dropout"),
])
def test_non_finite_or_mistyped_config_values_raise(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)
