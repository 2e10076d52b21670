"""Tests of the KV caches: cached == uncached (logits within 1e-5, identical greedy tokens) for every position
encoding and grouped KV heads, chunked == one-shot prefill, the ring buffer == a windowed mask after
wrap-around, int8 within its error bound, H2O eviction by hand, bytes == the formula, clear errors, and
greedy tokens == Hugging Face generate on the same GPT-2 weights."""

import pytest
import torch

from cache import PreallocatedKVCache, SlidingWindowKVCache, kv_cache_bytes
from compressed_cache import HeavyHitterKVCache, Int8KVCache, dequantize_int8, quantize_int8
from hf_interop import miniformer_from_hf_gpt2
from test_transformer import check_reorder
from testing import require
from transformer import (POSITIONS, CausalSelfAttention, MiniFormer, TransformerConfig, position_mask,
                         register_attention, unregister)

EXACT = dict(atol=1e-5, rtol=1e-5)  # float32 rounding: the cached path sums the same terms in another order
INT8_LOGIT_ATOL = 5e-3  # int8 keys/values: measured max |logit error| ~7e-4 on these tiny random models


def tiny_config(**overrides) -> TransformerConfig:
    settings = dict(vocab_size=37, context_length=32, num_layers=2, num_heads=4, embed_dim=32)
    settings.update(overrides)
    return TransformerConfig(**settings)


def build(config, seed=0):
    torch.manual_seed(seed)
    return MiniFormer(config).eval()


def random_ids(config, batch=2, length=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length or config.context_length), generator=generator)


@torch.no_grad()
def forward_in_pieces(model, ids, cache, pieces):
    """Logits of ids fed through `cache` in chunks of the given lengths (then one token at a time)."""
    outputs, start = [], 0
    for length in pieces:
        outputs.append(model(ids[:, start:start + length], kv_cache=cache))
        start += length
    outputs += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(start, ids.shape[1])]
    return torch.cat(outputs, dim=1)


CACHES = {  # each large enough to hold a whole tiny_config context: then it must equal no cache at all
    "preallocated": lambda: PreallocatedKVCache(32),
    "sliding_window": lambda: SlidingWindowKVCache(32),
    "heavy_hitter": lambda: HeavyHitterKVCache(32, recent=8),
}


# ------------------------------------------------------------------------------------------------
# Cached == uncached
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CACHES)
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("num_kv_heads", [4, 2])  # multi-head, grouped-query (MQA: the generate test)
def test_token_by_token_logits_equal_the_full_forward(name, position, num_kv_heads):
    config = tiny_config(position=position, num_kv_heads=num_kv_heads)
    model = build(config)
    ids = random_ids(config, length=30)
    with torch.no_grad():
        full = model(ids)
    torch.testing.assert_close(forward_in_pieces(model, ids, CACHES[name](), [5]), full, **EXACT)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_generate_with_the_preallocated_cache_gives_the_uncached_tokens(position, num_kv_heads):
    config = tiny_config(position=position, num_kv_heads=num_kv_heads, context_length=16)
    model = build(config)
    prompt = random_ids(config, length=4)
    made = []

    def factory():
        made.append(PreallocatedKVCache(config.context_length))
        return made[-1]

    # 24 new tokens > context 16: the cache fills, then generate refills a fresh one from the last 16 tokens
    cached = model.generate(prompt, 24, temperature=0, cache_factory=factory)
    uncached = model.generate(prompt, 24, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(made) > 1 and made[0].offset == config.context_length


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_generate_with_a_ring_that_never_wraps_gives_the_uncached_tokens(position):
    config = tiny_config(position=position, num_kv_heads=2, context_length=64)
    model = build(config)
    prompt = random_ids(config, length=3)
    cached = model.generate(prompt, 40, temperature=0, cache_factory=lambda: SlidingWindowKVCache(64))
    assert torch.equal(cached, model.generate(prompt, 40, temperature=0, use_cache=False))


@pytest.mark.parametrize("name", ["preallocated", "sliding_window", "int8"])
def test_reordered_rows_continue_from_their_parents(name):
    """reorder() moves rows in place (int8: within its tolerance); 05's beam search keeps one cache for all beams."""
    make = {**CACHES, "int8": lambda: Int8KVCache(32)}[name]
    check_reorder(build(tiny_config(position="rope", num_kv_heads=2)), make(),
                  atol=INT8_LOGIT_ATOL if name == "int8" else 1e-5)


@pytest.mark.parametrize("name", ["preallocated", "heavy_hitter"])
@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_chunked_prefill_equals_one_shot_prefill(name, position):
    config = tiny_config(position=position, num_kv_heads=2)
    model = build(config)
    ids = random_ids(config, length=28)
    one_shot = forward_in_pieces(model, ids, CACHES[name](), [20])
    chunked = forward_in_pieces(model, ids, CACHES[name](), [3, 9, 1, 7])
    torch.testing.assert_close(chunked, one_shot, **EXACT)


def test_a_cache_stored_in_bfloat16_returns_float32_close_to_the_float32_cache():
    config = tiny_config(position="rope")
    model = build(config)
    ids = random_ids(config, length=20)
    exact = forward_in_pieces(model, ids, PreallocatedKVCache(32), [4])
    cache = PreallocatedKVCache(32, dtype=torch.bfloat16)
    halved = forward_in_pieces(model, ids, cache, [4])
    assert halved.dtype == torch.float32 and cache.buffers[0][0].dtype == torch.bfloat16
    torch.testing.assert_close(halved, exact, atol=5e-3, rtol=0)  # bfloat16 keeps ~3 significant digits
    assert not torch.equal(halved, exact)  # it really stored bfloat16


# ------------------------------------------------------------------------------------------------
# The ring buffer == sliding-window attention
# ------------------------------------------------------------------------------------------------

class WindowedReferenceAttention(CausalSelfAttention):
    """04's attention with a window added to 04's position_mask: key j visible to query i iff i - W < j <= i."""

    window = None

    def mask(self, query_length, context, device, dtype):
        queries = context.query_positions(query_length, device)
        cache = context.kv_cache
        keys = queries if cache is None else cache.key_positions(self.layer_index).to(device)
        allowed = position_mask(queries, keys, context.alibi_slopes, dtype)
        near = (queries[:, None] - keys[None, :]) < self.window  # (Tq, Tk)
        return allowed & near if allowed.dtype == torch.bool else allowed.masked_fill(~near, float("-inf"))


@pytest.fixture
def windowed_model():
    """(causal model, the same weights with a windowed mask) for a config and window."""
    def make(config, window):
        WindowedReferenceAttention.window = window
        model = build(config)
        windowed = MiniFormer(config.__class__(**{**config.__dict__, "attention_module": "windowed_reference"}))
        windowed.load_state_dict(model.state_dict())
        return model, windowed.eval()

    register_attention("windowed_reference", WindowedReferenceAttention)
    yield make
    unregister("attention", "windowed_reference")


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_ring_buffer_equals_a_windowed_mask_after_wrap_around(windowed_model, position, num_kv_heads):
    window = 6
    config = tiny_config(position=position, num_kv_heads=num_kv_heads)
    model, windowed = windowed_model(config, window)
    ids = random_ids(config, length=31)  # 5-token prefill, then 26 steps: the ring wraps 4 times
    with torch.no_grad():
        reference = windowed(ids)
        unwindowed = model(ids)
    cache = SlidingWindowKVCache(window)
    ringed = forward_in_pieces(model, ids, cache, [5])
    torch.testing.assert_close(ringed, reference, **EXACT)
    assert not torch.allclose(ringed[:, window:], unwindowed[:, window:], atol=1e-3)  # the window mattered
    assert cache.nbytes == kv_cache_bytes(config, window, batch_size=2)  # memory stays at the window
    assert sorted(cache.key_positions(0).tolist()) == list(range(31 - window, 31))


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_ring_buffer_chunks_are_exact_under_a_windowed_mask(windowed_model, position):
    config = tiny_config(position=position, num_kv_heads=2)
    _, windowed = windowed_model(config, 5)
    ids = random_ids(config, length=30)
    with torch.no_grad():
        reference = windowed(ids)
    chunked = forward_in_pieces(windowed, ids, SlidingWindowKVCache(5), [3, 4, 7, 1, 2, 9])  # chunks wrap too
    torch.testing.assert_close(chunked, reference, **EXACT)


def test_heavy_hitters_with_only_a_recent_window_equal_the_ring_buffer():
    config = tiny_config(position="alibi", num_kv_heads=2)
    model = build(config)
    ids = random_ids(config, length=30)
    ring = forward_in_pieces(model, ids, SlidingWindowKVCache(7), [4])
    recent_only = forward_in_pieces(model, ids, HeavyHitterKVCache(7, recent=7), [4])
    torch.testing.assert_close(recent_only, ring, **EXACT)


# ------------------------------------------------------------------------------------------------
# int8 and heavy hitters
# ------------------------------------------------------------------------------------------------

def test_int8_error_is_at_most_absmax_over_254_per_vector():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 50, 16, generator=generator) * torch.randn(3, 4, 50, 1, generator=generator).exp()
    x[0, 0, 0] = 0.0  # an all-zero vector must stay exactly zero
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 4, 50, 1) and q.abs().max() == 127
    error = (dequantize_int8(q, scale) - x).abs()
    bound = x.abs().amax(-1, keepdim=True) / 254
    assert (error <= bound * (1 + 1e-5) + 1e-12).all()
    assert (error > bound / 4).any()  # the bound is tight, not loose by orders of magnitude
    assert torch.equal(dequantize_int8(q, scale)[0, 0, 0], torch.zeros(16))


@pytest.mark.parametrize("position", POSITIONS)
def test_int8_cache_logits_within_tolerance(position):
    config = tiny_config(position=position, num_kv_heads=2)
    model = build(config)
    ids = random_ids(config, length=30)
    with torch.no_grad():
        full = model(ids)
    quantized = forward_in_pieces(model, ids, Int8KVCache(32), [5])
    torch.testing.assert_close(quantized, full, atol=INT8_LOGIT_ATOL, rtol=0)
    assert not torch.equal(quantized, full)


def test_heavy_hitter_eviction_by_hand():
    def step(cache, position, weights):
        k = torch.full((1, 1, 1, 1), float(position))
        keys, _ = cache.update(0, k, k)
        cache.observe_attention(0, torch.tensor(weights).reshape(1, 1, 1, -1))
        cache.advance(1)
        return keys.flatten().tolist()

    for recent, victim in [(1, 2), (2, 1)]:
        cache = HeavyHitterKVCache(budget=3, recent=recent)
        step(cache, 0, [1.0])
        step(cache, 1, [0.9, 0.1])
        step(cache, 2, [0.2, 0.7, 0.1])  # scores: position 0 -> 2.1, 1 -> 0.8, 2 -> 0.1
        keys = step(cache, 3, [0.25, 0.25, 0.5])  # full: position 3 takes the slot of the evicted position
        assert victim not in keys and sorted(keys) == sorted({0, 1, 2, 3} - {victim})
        assert cache.key_positions(0).tolist() == keys  # update's order is the order key_positions reports


def test_heavy_hitter_prefill_keeps_the_recent_window_and_the_heaviest_older_tokens():
    cache = HeavyHitterKVCache(budget=4, recent=2)
    k = torch.arange(6.0).reshape(1, 1, 6, 1)
    keys, _ = cache.update(0, k, k)
    assert keys.shape[2] == 6  # the prefill attends in full
    column_sums = torch.tensor([5.0, 0.1, 3.0, 0.2, 0.0, 0.0])
    cache.observe_attention(0, (column_sums / 6).expand(1, 2, 6, 6) / 2)  # 2 heads, 6 queries
    cache.advance(6)
    assert cache.key_positions(0).tolist() == [0, 2, 4, 5]
    assert cache.buffers[0][0][0, 0, :, 0].tolist() == [0.0, 2.0, 4.0, 5.0]


# ------------------------------------------------------------------------------------------------
# Memory: bytes == formula
# ------------------------------------------------------------------------------------------------

def test_kv_cache_bytes_hand_computed():
    gpt2_small = TransformerConfig(vocab_size=50257, context_length=1024, num_layers=12, num_heads=12, embed_dim=768)
    assert kv_cache_bytes(gpt2_small, 1024) == 2 * 12 * 12 * 64 * 4 * 1024 == 75_497_472  # 72 KiB per token
    llama2_7b = TransformerConfig(vocab_size=32000, context_length=4096, num_layers=32, num_heads=32, embed_dim=4096)
    assert kv_cache_bytes(llama2_7b, 4096, dtype=torch.float16) == 2 ** 31  # 2 GiB: 0.5 MiB per token
    llama3_8b = TransformerConfig(vocab_size=128256, context_length=8192, num_layers=32, num_heads=32,
                                  embed_dim=4096, num_kv_heads=8)
    assert kv_cache_bytes(llama3_8b, 1, dtype=torch.bfloat16) == 128 * 1024  # GQA: 4x less per token
    assert kv_cache_bytes(llama3_8b, 10, batch_size=3, dtype=torch.int8) == 30 * 64 * 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_bytes_equal_the_formula(dtype):
    config = tiny_config(num_kv_heads=2)
    model = build(config)
    ids = random_ids(config, batch=3, length=20)
    layers, heads, dim = config.num_layers, config.kv_heads, config.head_dim
    caches = {"prealloc": PreallocatedKVCache(32, dtype=dtype), "ring": SlidingWindowKVCache(8, dtype=dtype),
              "int8": Int8KVCache(32), "h2o": HeavyHitterKVCache(12, dtype=dtype)}
    for cache in caches.values():
        forward_in_pieces(model, ids, cache, [4])
    allocated = sum(t.untyped_storage().nbytes() for buffers in caches["prealloc"].buffers.values() for t in buffers)
    assert caches["prealloc"].nbytes == allocated == kv_cache_bytes(config, 32, 3, dtype)
    assert caches["ring"].nbytes == kv_cache_bytes(config, 8, 3, dtype)
    scales = 2 * layers * heads * 32 * 3 * 4  # one float32 scale per token, head, k or v
    assert caches["int8"].nbytes == kv_cache_bytes(config, 32, 3, torch.int8) + scales
    bookkeeping = layers * 12 * (8 + 4)  # an int64 position and a float32 score per slot
    assert caches["h2o"].nbytes == kv_cache_bytes(config, 12, 3, dtype) + bookkeeping
    assert kv_cache_bytes(config, 32, 3, torch.int8) * 4 == kv_cache_bytes(config, 32, 3) and dim == 8


def test_caches_store_any_tensors_such_as_mla_latents():
    generator = torch.Generator().manual_seed(0)
    latent, rope_key = torch.randn(2, 1, 5, 16, generator=generator), torch.randn(2, 1, 5, 4, generator=generator)
    for cache in (PreallocatedKVCache(8), SlidingWindowKVCache(8), Int8KVCache(8), HeavyHitterKVCache(8)):
        held = cache.update(0, latent, rope_key)
        assert [tuple(t.shape) for t in held] == [(2, 1, 5, 16), (2, 1, 5, 4)]
        torch.testing.assert_close(held[0], latent, atol=latent.abs().max().item() / 200, rtol=0)
        cache.advance(5)


# ------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------

def test_over_capacity_is_a_clear_error_even_inside_generate():
    config = tiny_config()
    model = build(config)
    ids = random_ids(config, length=10)
    cache = PreallocatedKVCache(8)
    with torch.no_grad():
        model(ids[:, :6], kv_cache=cache)
        with pytest.raises(ValueError, match="capacity exceeded: 6 positions held \\+ 3 new > capacity 8"):
            model(ids[:, 6:9], kv_cache=cache)
    with pytest.raises(ValueError, match="capacity"):
        model.generate(ids[:, :4], 20, temperature=0, cache_factory=lambda: PreallocatedKVCache(10))


@pytest.mark.parametrize("name", CACHES)
def test_offset_batch_and_head_changes_are_clear_errors(name):
    config = tiny_config(position="rope")
    model = build(config)
    ids = random_ids(config, length=8)
    cache = CACHES[name]()
    with torch.no_grad():
        model(ids[:, :4], kv_cache=cache)
        cache.offset = 0  # a "reset" that forgot the held keys: attention would silently be wrong
        with pytest.raises(ValueError, match="offset"):
            model(ids[:, 4:5], kv_cache=cache)
        cache.offset = 4
        with pytest.raises(ValueError, match="batch size"):
            model(ids[:1, 4:5], kv_cache=cache)
    with pytest.raises(ValueError, match="heads"):
        cache.update(0, torch.zeros(2, 3, 1, 8), torch.zeros(2, 3, 1, 8))
    with pytest.raises(ValueError, match="advance"):
        cache.update(0, torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8))
        cache.advance(1)  # layer 1 was not written


@pytest.mark.parametrize("make, message", [
    (lambda: PreallocatedKVCache(0), "capacity"), (lambda: PreallocatedKVCache(2.5), "capacity"),
    (lambda: PreallocatedKVCache(True), "capacity"), (lambda: SlidingWindowKVCache(0), "window"),
    (lambda: HeavyHitterKVCache(0), "budget"), (lambda: HeavyHitterKVCache(4, recent=5), "recent"),
    (lambda: HeavyHitterKVCache(4, recent=-1), "recent"), (lambda: Int8KVCache(4, scale_dtype=torch.int32), "scale_dtype"),
])
def test_bad_arguments_raise_value_errors_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_update_arguments():
    cache = PreallocatedKVCache(4)
    with pytest.raises(ValueError, match="at least one tensor"):
        cache.update(0)
    with pytest.raises(ValueError, match="time axis"):
        cache.update(0, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same batch size"):
        cache.update(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 3, 4))
    with pytest.raises(TypeError, match="dtype"):
        PreallocatedKVCache(4, dtype="float16")
    with pytest.raises(ValueError, match="device"):
        PreallocatedKVCache(4, device="meta").update(0, torch.zeros(1, 1, 1, 4))
    with pytest.raises(ValueError, match="seq_len"):
        kv_cache_bytes(tiny_config(), -1)
    cache = HeavyHitterKVCache(4)
    cache.update(0, torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="cover 2 keys"):
        cache.observe_attention(0, torch.ones(1, 1, 3, 2))


# ------------------------------------------------------------------------------------------------
# Hugging Face: the same GPT-2 weights give the same greedy tokens
# ------------------------------------------------------------------------------------------------

def test_greedy_tokens_equal_hugging_face_generate():
    transformers = require("transformers")
    torch.manual_seed(1)
    hf_config = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=3, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # HF zero-initialises biases and sets LayerNorm to (1, 0): randomise them all
        for parameter in hf_model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    hf_model.generation_config.eos_token_id = None  # random weights: never stop early
    hf_model.generation_config.pad_token_id = 0
    ours = miniformer_from_hf_gpt2(hf_model)
    prompt = torch.randint(0, 97, (2, 4))
    with torch.no_grad():
        expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                                     do_sample=False, use_cache=True)
    actual = ours.generate(prompt, 40, temperature=0, cache_factory=lambda: PreallocatedKVCache(64))
    assert expected.shape == (2, 44)
    assert torch.equal(actual, expected)
