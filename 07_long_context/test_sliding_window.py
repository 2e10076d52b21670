"""Tests of sliding-window attention and attention sinks: windowed logits == Hugging Face Mistral's with
sliding_window < sequence length, banded == masked compute, the mask by hand, the sink cache == full
attention over (sinks + window) positions, generation past the context length, clear errors."""

import pytest
import torch
import torch.nn.functional as F

from cache import SlidingWindowKVCache, kv_cache_bytes
from hf_interop import miniformer_from_hf_llama
from positional_embeddings import apply_rope
from sliding_window import (SinkKVCache, SlidingWindowAttention, attention_score_bytes, banded_attention,
                            register_sliding_window, seen_distance, sliding_window_mask, with_sliding_window)
from testing import require
from transformer import AttentionContext, ConcatKVCache, MiniFormer, TransformerConfig, unregister

EXACT = dict(atol=1e-5, rtol=1e-5)  # float32: the same sums taken in another order


def tiny_config(**overrides) -> TransformerConfig:
    settings = dict(vocab_size=37, context_length=32, num_layers=2, num_heads=4, embed_dim=32, position="rope")
    settings.update(overrides)
    return TransformerConfig(**settings)


def build(config, seed=0):
    torch.manual_seed(seed)
    return MiniFormer(config).eval()


def random_ids(vocab_size, batch=2, length=32, seed=0):
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def forward_in_pieces(model, ids, cache, prefill):
    """Logits of ids fed through `cache`: a prefill chunk, then one token at a time."""
    outputs = [model(ids[:, :prefill], kv_cache=cache)]
    outputs += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(outputs, dim=1)


@pytest.fixture(autouse=True)
def clean_registry():
    """Every test leaves 04's attention registry as it found it."""
    from transformer import _ATTENTIONS
    before = set(_ATTENTIONS)
    yield
    for name in set(_ATTENTIONS) - before:
        unregister("attention", name)


# ------------------------------------------------------------------------------------------------
# The mask by hand
# ------------------------------------------------------------------------------------------------

def test_mask_by_hand():
    positions = torch.arange(6)
    # window 3: query i reads i-2, i-1, i
    expected_window = torch.tensor([[1, 0, 0, 0, 0, 0],
                                    [1, 1, 0, 0, 0, 0],
                                    [1, 1, 1, 0, 0, 0],
                                    [0, 1, 1, 1, 0, 0],
                                    [0, 0, 1, 1, 1, 0],
                                    [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(sliding_window_mask(positions, positions, 3), expected_window)
    # window 2 and one sink: key 0 stays visible to every query
    expected_sink = torch.tensor([[1, 0, 0, 0, 0, 0],
                                  [1, 1, 0, 0, 0, 0],
                                  [1, 1, 1, 0, 0, 0],
                                  [1, 0, 1, 1, 0, 0],
                                  [1, 0, 0, 1, 1, 0],
                                  [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(sliding_window_mask(positions, positions, 2, num_sinks=1), expected_sink)
    # a window as long as the sequence is plain causal attention
    assert torch.equal(sliding_window_mask(positions, positions, 6), torch.ones(6, 6, dtype=torch.bool).tril())


def test_sinks_are_seen_from_inside_the_cache():
    distance = seen_distance(torch.tensor([2, 10]), torch.arange(11), window=3, num_sinks=2)
    assert distance[0, :3].tolist() == [2, 1, 0]  # cache not full yet: true distances
    assert distance[1, :2].tolist() == [4, 3]  # query 10 sees the sinks from cache position S + W - 1 = 4
    assert distance[1, 8:].tolist() == [2, 1, 0]  # the window keeps true distances


# ------------------------------------------------------------------------------------------------
# Hugging Face Mistral: windowed logits on the same weights
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compute", ["mask", "banded"])
@pytest.mark.parametrize("window, kv_heads, length", [(5, 2, 23), (8, 4, 40), (1, 1, 9)])
def test_windowed_logits_equal_hugging_face_mistral(compute, window, kv_heads, length):
    transformers = require("transformers")
    torch.manual_seed(3)
    hf_config = transformers.MistralConfig(
        vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, sliding_window=window)
    hf_model = transformers.MistralForCausalLM(hf_config).eval()
    full = miniformer_from_hf_llama(hf_model)  # Mistral is Llama-shaped: same names, RoPE, RMSNorm, SwiGLU
    windowed = with_sliding_window(full, window, compute=compute)
    ids = random_ids(53, length=length)
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = windowed(ids)
        unwindowed = full(ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(unwindowed[:, window:], expected[:, window:], atol=1e-3)  # the window mattered


# ------------------------------------------------------------------------------------------------
# Banded compute == masked compute
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [1, 3, 7, 16, 50])
@pytest.mark.parametrize("length", [1, 16, 29])
def test_banded_attention_equals_masked_attention(window, length):
    q, k, v = torch.randn(3, 2, 4, length, 8).unbind(0)
    positions = torch.arange(length)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(positions, positions, window))
    torch.testing.assert_close(banded_attention(q, k, v, window), expected, **EXACT)
    torch.testing.assert_close(banded_attention(q, k, v, window, use_sdpa=False), expected, **EXACT)


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "none"])
def test_banded_model_equals_masked_model_and_gradients_agree(position):
    config = tiny_config(position=position, num_kv_heads=2)
    model = build(config)
    masked, banded = with_sliding_window(model, 6), with_sliding_window(model, 6, compute="banded")
    ids = random_ids(config.vocab_size, length=27)
    torch.testing.assert_close(banded(ids), masked(ids), **EXACT)
    for m in (masked, banded):
        F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
    for (name, a), (_, b) in zip(masked.named_parameters(), banded.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_window_at_least_the_length_is_full_attention():
    config = tiny_config()
    model = build(config)
    ids = random_ids(config.vocab_size)
    with torch.no_grad():
        for compute in ("mask", "banded"):
            torch.testing.assert_close(with_sliding_window(model, 32, compute=compute)(ids), model(ids), **EXACT)


def test_score_bytes_formula():
    assert attention_score_bytes(1, 4, 1024) == 4 * 1024 * 1024 * 4
    assert attention_score_bytes(1, 4, 1000, window=100) == 4 * 10 * 100 * 200 * 4


# ------------------------------------------------------------------------------------------------
# Caches: windowed cache steps == the windowed full forward
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_ring_buffer_and_concat_cache_equal_the_windowed_forward(position):
    config = tiny_config(position=position, num_kv_heads=2)
    windowed = with_sliding_window(build(config), 5)
    ids = random_ids(config.vocab_size, length=30)
    with torch.no_grad():
        expected = windowed(ids)
    for cache in (ConcatKVCache(), SlidingWindowKVCache(5)):
        torch.testing.assert_close(forward_in_pieces(windowed, ids, cache, prefill=12), expected, **EXACT)


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "none"])
@pytest.mark.parametrize("prefill", [1, 3, 11])
def test_sink_cache_equals_the_sink_window_forward(position, prefill):
    config = tiny_config(position=position, num_kv_heads=2)
    sinks, window = 3, 5
    model = with_sliding_window(build(config), window, num_sinks=sinks)
    ids = random_ids(config.vocab_size, length=30)
    with torch.no_grad():
        expected = model(ids)
    cache = SinkKVCache(sinks, window)
    torch.testing.assert_close(forward_in_pieces(model, ids, cache, prefill), expected, **EXACT)
    assert cache.key_positions(0).tolist() == [0, 1, 2] + sorted(range(25, 30), key=lambda p: (p - sinks) % window)
    assert cache.offset == 30
    assert cache.nbytes == kv_cache_bytes(config, sinks + window, batch_size=2)  # memory stays at S + W


@pytest.mark.parametrize("sinks, window", [(2, 4), (1, 7), (0, 6)])
def test_sink_attention_equals_full_attention_over_sinks_plus_window(sinks, window):
    """Reference: for each query, F.scaled_dot_product_attention over only the kept keys, with RoPE applied
    at their positions inside the cache (sinks 0 .. S-1, then the window; the query last)."""
    config = tiny_config(num_heads=2, embed_dim=16)
    torch.manual_seed(1)
    attention = SlidingWindowAttention(config, 0, window, num_sinks=sinks).eval()
    T, D = 20, config.head_dim
    x = torch.randn(1, T, config.embed_dim)
    with torch.no_grad():
        actual, _ = attention(x, AttentionContext(offset=0))
        q, k, v = attention.qkv(x).view(1, T, 3, 2, D).permute(2, 0, 3, 1, 4)  # each (1, H, T, D), unrotated
        rows = []
        for i in range(T):
            kept = sorted(set(range(min(sinks, i + 1))) | set(range(max(0, i - window + 1), i + 1)))
            cache_positions = torch.arange(len(kept))
            keys = apply_rope(k[:, :, kept], positions=cache_positions)
            query = apply_rope(q[:, :, i:i + 1], positions=cache_positions[-1:])
            rows.append(F.scaled_dot_product_attention(query, keys, v[:, :, kept]))
        expected = attention.out(torch.cat(rows, dim=2).transpose(1, 2).reshape(1, T, config.embed_dim))
    torch.testing.assert_close(actual, expected, **EXACT)


def test_generation_with_the_sink_cache_runs_past_the_context_length():
    config = tiny_config(context_length=16)
    model = with_sliding_window(build(config), 12, num_sinks=4)
    prompt = random_ids(config.vocab_size, batch=1, length=5)
    caches = []

    def factory():
        caches.append(SinkKVCache(4, 12))
        return caches[-1]

    out = model.generate(prompt, 60, temperature=0, cache_factory=factory)
    assert out.shape == (1, 65) and len(caches) == 1  # one cache for the whole run: never refilled
    assert caches[0].offset == 64 and caches[0].key_positions(0).shape == (16,)
    with torch.no_grad():  # greedy: each token is the argmax of the sink-window forward over everything before
        logits = model(out[:, :-1])
    assert torch.equal(logits.argmax(-1)[:, 4:], out[:, 5:])


# ------------------------------------------------------------------------------------------------
# Registration and bad arguments
# ------------------------------------------------------------------------------------------------

def test_registered_name_is_a_config_choice():
    name = register_sliding_window(4, num_sinks=1)
    model = MiniFormer(tiny_config(attention_module=name))
    assert all(isinstance(b.attn, SlidingWindowAttention) and b.attn.window == 4 for b in model.blocks)


@pytest.mark.parametrize("call, argument", [
    (lambda: sliding_window_mask(torch.arange(3), torch.arange(3), 0), "window"),
    (lambda: sliding_window_mask(torch.arange(3), torch.arange(3), 2, num_sinks=-1), "num_sinks"),
    (lambda: banded_attention(*torch.randn(3, 1, 1, 4, 2).unbind(0), window=1.5), "window"),
    (lambda: register_sliding_window(True), "window"),
    (lambda: register_sliding_window(4, compute="flash"), "compute"),
    (lambda: SlidingWindowAttention(tiny_config(), 0, 4, num_sinks=2, compute="banded"), "num_sinks"),
    (lambda: SinkKVCache(-1, 4), "num_sinks"),
    (lambda: SinkKVCache(2, 0), "window"),
    (lambda: attention_score_bytes(1, 1, 0), "length"),
])
def test_bad_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
