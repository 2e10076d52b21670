"""The engine against the naive loop (04's generate), the paged cache against 06's contiguous cache."""

import pytest
import torch

from cache import PreallocatedKVCache
from engine import Engine
from inference import naive_generate, static_cache_generate
from paged_cache import BatchView, PagedKVCache, contiguous_cache
from sampler import PRESETS, SamplingConfig
from transformer import AttentionContext, MiniFormer, TransformerConfig

VOCAB = 40


def make_model(dtype=torch.float64, context_length: int = 24, **overrides) -> MiniFormer:
    """A tiny model with large weights: peaked, well-separated logits, so float rounding between a batched
    and a single-row forward cannot flip a token (float64 makes the rounding itself ~1e-15)."""
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, context_length=context_length, num_layers=2, num_heads=2, embed_dim=32)
    settings.update(overrides)
    model = MiniFormer(TransformerConfig(**settings)).to(dtype).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(15)
    return model


def mixed_requests(count: int = 9, seed: int = 1):
    """(prompt, max_new_tokens) pairs: prompts of 1..20 tokens, 1..30 new tokens (some pass the context)."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(count):
        length = int(torch.randint(1, 21, (1,), generator=generator))
        prompt = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        requests.append((prompt, int(torch.randint(1, 31, (1,), generator=generator))))
    return requests


def run_staggered(engine: Engine, requests, sampling: SamplingConfig, join_every: int = 2) -> dict:
    """Submit one request every `join_every` steps (they join a running batch); -> {index: tokens}."""
    ids, out, pending = {}, {}, list(enumerate(requests))
    step = 0
    while pending or engine.has_work:
        if pending and step % join_every == 0:
            index, (prompt, new) = pending.pop(0)
            ids[engine.submit(prompt, new, sampling, seed=100 + index)] = index
        for event in engine.step():
            out.setdefault(ids[event.request_id], []).append(event.token)
        step += 1
    return out


@pytest.mark.parametrize("preset", ["deterministic", "focused", "creative"])
@pytest.mark.parametrize("layout, policy", [("paged", "continuous"), ("contiguous", "continuous"),
                                            ("paged", "static")])
def test_engine_equals_naive_loop_token_for_token(preset, layout, policy):
    model = make_model()
    requests = mixed_requests()
    engine = Engine(model, max_batch_size=4, policy=policy, cache_layout=layout, block_size=4)
    out = run_staggered(engine, requests, PRESETS[preset])
    for index, (prompt, new) in enumerate(requests):
        assert out[index] == naive_generate(model, prompt, new, PRESETS[preset], seed=100 + index), index
    assert engine.cache.blocks_used == 0 and not engine.cache.block_tables  # every block returned


@pytest.mark.parametrize("overrides", [{"position": "sinusoidal"}, {"position": "none"}, {"num_kv_heads": 1},
                                       {"norm_placement": "post"}, {"ffn": "swiglu", "norm": "rmsnorm"}])
def test_engine_equals_naive_loop_for_other_model_shapes(overrides):
    model = make_model(**overrides)
    requests = mixed_requests(6, seed=4)
    out = run_staggered(Engine(model, max_batch_size=3, block_size=4), requests, PRESETS["focused"])
    for index, (prompt, new) in enumerate(requests):
        assert out[index] == naive_generate(model, prompt, new, PRESETS["focused"], seed=100 + index), index


def test_seeded_sampling_does_not_depend_on_the_batch():
    """The same request and seed give the same tokens alone or among 8 others (per-request generators)."""
    model = make_model()
    alone = Engine(model, max_batch_size=1)
    target = alone.submit([1, 2, 3], 20, PRESETS["creative"], seed=5)
    expected = alone.run()[target]
    crowd = Engine(model, max_batch_size=9, block_size=4)
    for index, (prompt, new) in enumerate(mixed_requests(8)):
        crowd.submit(prompt, new, PRESETS["creative"], seed=index)
    target = crowd.submit([1, 2, 3], 20, PRESETS["creative"], seed=5)
    assert crowd.run()[target] == expected


def test_float32_greedy_matches_too():
    model = make_model(torch.float32)
    requests = mixed_requests(6, seed=3)
    out = run_staggered(Engine(model, max_batch_size=3, block_size=8), requests, SamplingConfig(temperature=0))
    for index, (prompt, new) in enumerate(requests):
        assert out[index] == naive_generate(model, prompt, new, SamplingConfig(temperature=0)), index


def test_preemption_recomputes_exactly_and_frees_everything():
    """A pool of 7 blocks of 4 for 6 requests forces evictions; evicted requests are re-fed later."""
    model = make_model()
    requests = mixed_requests(6, seed=2)
    engine = Engine(model, max_batch_size=6, block_size=4, num_blocks=7)
    ids = [engine.submit(p, n, PRESETS["focused"], seed=i) for i, (p, n) in enumerate(requests)]
    out = engine.run()
    assert engine.preemptions > 0
    for i, (prompt, new) in enumerate(requests):
        assert out[ids[i]] == naive_generate(model, prompt, new, PRESETS["focused"], seed=i)
    assert engine.cache.blocks_used == 0


def test_cancel_returns_blocks_and_others_continue():
    model = make_model()
    engine = Engine(model, max_batch_size=4, block_size=4)
    keep = engine.submit([1, 2, 3, 4, 5], 15, SamplingConfig(temperature=0))
    drop = engine.submit(list(range(18)), 15, SamplingConfig(temperature=0))
    engine.step()
    engine.step()
    assert len(engine.cache.block_tables[drop]) == 5  # 19 tokens held in blocks of 4
    used = engine.cache.blocks_used
    assert engine.cancel(drop) and engine.cache.blocks_used == used - 5
    assert not engine.cancel(drop)
    tokens = []
    while engine.has_work:
        tokens += [e.token for e in engine.step() if e.request_id == keep]
    assert tokens == naive_generate(model, [1, 2, 3, 4, 5], 15, SamplingConfig(temperature=0))[2:]
    assert engine.cache.blocks_used == 0


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_paged_attention_equals_contiguous_cache(block_size):
    """Logits of a prefill then decode steps through scattered blocks == 06's PreallocatedKVCache."""
    model = make_model(torch.float32)
    paged_model = Engine(model, block_size=block_size).model
    cache = PagedKVCache(model.config, num_blocks=64, block_size=block_size)
    cache.add("other")  # interleave another request's blocks so the block table is not contiguous
    cache.add("r")
    reference = PreallocatedKVCache(model.config.context_length)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pieces = [(0, 7)] + [(t, t + 1) for t in range(7, 12)]
        for start, end in pieces:
            cache.reserve("other", 2)
            view = BatchView(cache, ["r"], [end - start])
            x = paged_model.token_embedding(tokens[:, start:end]) + paged_model.position_embedding.weight[view.positions]
            for block in paged_model.blocks:
                x, _ = block(x, AttentionContext(0, view))
            ours = paged_model.final_norm_and_head(x)
            theirs = model(tokens[:, start:end], kv_cache=reference)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert len(set(cache.block_tables["r"])) == -(-12 // block_size)


def test_paged_memory_is_blocks_of_what_is_held():
    model = make_model(context_length=64)
    paged = PagedKVCache(model.config, num_blocks=32, block_size=16)
    contiguous = contiguous_cache(model.config, max_batch_size=4)
    for cache in (paged, contiguous):
        for name, length in (("a", 5), ("b", 17), ("c", 40)):
            cache.add(name)
            cache.reserve(name, length)
    assert paged.blocks_used == 1 + 2 + 3 and paged.tokens_held == 62
    assert contiguous.blocks_used * contiguous.block_size == 3 * 64  # a whole context each
    assert paged.free("c") == 3 and paged.blocks_used == 3 and len(paged.free_blocks) == 29
    paged.add("d")
    paged.reserve("d", 33)  # the freed blocks are reused first
    assert set(paged.block_tables["d"]) >= set(range(3, 6))


def test_static_cache_loop_equals_naive_loop():
    model = make_model()
    for prompt, new in mixed_requests(4):
        assert static_cache_generate(model, prompt, new, PRESETS["creative"], seed=3) == \
            naive_generate(model, prompt, new, PRESETS["creative"], seed=3)


def test_bad_arguments_name_the_argument():
    model = make_model()
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(model, max_batch_size=0)
    with pytest.raises(ValueError, match="policy"):
        Engine(model, policy="eager")
    with pytest.raises(ValueError, match="cache_layout"):
        Engine(model, cache_layout="ring")
    with pytest.raises(ValueError, match="num_blocks"):
        Engine(model, block_size=4, num_blocks=2)  # one context of 24 tokens needs 6
    with pytest.raises(ValueError, match="position"):
        Engine(make_model(position="rope"))
    engine = Engine(model)
    with pytest.raises(ValueError, match="prompt"):
        engine.submit([], 5)
    with pytest.raises(ValueError, match="prompt"):
        engine.submit([VOCAB], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit([1], 0)
    with pytest.raises(TypeError, match="sampling"):
        engine.submit([1], 3, sampling={"temperature": 0})
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(model.config, num_blocks=4, block_size=0)
    cache = PagedKVCache(model.config, num_blocks=2, block_size=4)
    cache.add("r")
    with pytest.raises(ValueError, match="exhausted"):
        cache.reserve("r", 9)
