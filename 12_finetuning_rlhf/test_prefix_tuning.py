"""Prefix tuning checked against peft's PrefixTuning on a tiny GPT-2, and against the model reading real tokens."""

import pytest
import torch
import torch.nn as nn

from hf_interop import miniformer_from_hf_gpt2
from prefix_tuning import PrefixKVCache, PrefixTunedModel, keys_values_of
from testing import require
from training import TrainConfig, train
from transformer import CausalSelfAttention, ConcatKVCache, MiniFormer, TransformerConfig, register_attention, unregister

V, C = 17, 12  # vocabulary, context_length


def tiny_model(position="learned", num_kv_heads=None, seed=0) -> MiniFormer:
    torch.manual_seed(seed)
    return MiniFormer(TransformerConfig(vocab_size=V, context_length=C, num_layers=2, num_heads=2, embed_dim=8,
                                        num_kv_heads=num_kv_heads, position=position)).eval()


def ids(batch=2, length=5, seed=3):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the reference: peft's PrefixTuning on Hugging Face GPT-2 -----------------------------------------------

def test_logits_equal_peft_prefix_tuning_on_a_tiny_gpt2():
    transformers, peft = require("transformers"), require("peft")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=C, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    ours = PrefixTunedModel(miniformer_from_hf_gpt2(hf).eval(), prefix_length=3)
    theirs = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    # peft's prefix encoder (no projection) is an embedding (P, num_layers * 2 * E): per virtual token, for each
    # layer its key then its value, each split into heads. Our layout is (num_layers, 2, H_kv, P, D).
    table = theirs.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        ours.prefix.copy_(table.view(3, 2, 2, 2, 8).permute(1, 2, 3, 0, 4))
    x = ids(batch=3, length=C - 3)
    expected = theirs(input_ids=x).logits
    assert not torch.allclose(expected, hf(input_ids=x).logits, atol=1e-2)  # the prefix does change the logits
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=2e-5)


# --- a property reference: a prefix that is the model's own keys of real tokens ------------------------------

@pytest.mark.parametrize("position, num_kv_heads", [("learned", None), ("rope", 1), ("alibi", None)])
def test_a_prefix_of_real_tokens_equals_reading_those_tokens_first(position, num_kv_heads):
    base = tiny_model(position, num_kv_heads)
    prefix_ids = torch.tensor([4, 9, 1])
    x = ids(length=C - 3)
    expected = base(torch.cat([prefix_ids.expand(2, -1), x], dim=1))[:, 3:]  # (B, T, V)
    model = PrefixTunedModel(base, 3, init_ids=prefix_ids)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    other = PrefixTunedModel(base, 3)  # a random prefix gives other logits
    assert not torch.allclose(other(x), expected, atol=1e-3)


def test_keys_values_of_matches_a_plain_cache_and_the_prefix_layout():
    base = tiny_model(num_kv_heads=1)
    prefix = keys_values_of(base, torch.tensor([2, 3, 5, 7]))
    assert prefix.shape == (2, 2, 1, 4, 4)  # (L, 2, H_kv, P, D)
    cache = ConcatKVCache()
    base(torch.tensor([[2, 3, 5, 7]]), kv_cache=cache)
    assert torch.equal(prefix[1, 0], cache.keys[1][0]) and torch.equal(prefix[0, 1], cache.values[0][0])


def test_the_prefix_cache_puts_real_tokens_after_the_prefix_and_expands_to_the_batch():
    prefix = torch.randn(2, 2, 2, 3, 4)
    cache = PrefixKVCache(prefix)
    assert cache.offset == 3
    k, v = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    keys, values = cache.update(0, k, v)
    assert keys.shape == (5, 2, 7, 4)
    assert torch.equal(keys[4, :, :3], prefix[0, 0]) and torch.equal(values[:, :, 3:], v)
    assert torch.equal(cache.key_positions(0), torch.arange(7))
    cache.advance(4)
    assert cache.offset == 7


def test_each_row_of_a_batch_reads_the_same_prefix():
    model = PrefixTunedModel(tiny_model(), 2)
    x = ids(batch=3)
    batched = model(x)
    for row in range(3):
        torch.testing.assert_close(batched[row:row + 1], model(x[row:row + 1]), rtol=0, atol=1e-6)


# --- generation -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["learned", "rope"])
def test_generate_equals_greedy_argmax_of_repeated_full_forwards(position):
    model = PrefixTunedModel(tiny_model(position), 3, init_std=3.0)  # a prefix large enough to change the argmax
    prompt = ids(batch=2, length=3)
    generated = model.generate(prompt, 6, temperature=0.0)  # 3 + 6 - 1 = 8 = C - P: the whole budget
    expected = prompt
    for _ in range(6):
        next_token = model(expected)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(generated, expected)
    assert not torch.equal(generated, model.base.generate(prompt, 6, temperature=0.0))  # the prefix steers it


def test_context_overflow_raises_instead_of_shifting_positions():
    model = PrefixTunedModel(tiny_model(), 4)
    assert model.usable_context == C - 4
    model(ids(length=C - 4))  # exactly fits
    with pytest.raises(ValueError, match="leaves 8 of context_length 12"):
        model(ids(length=C - 3))
    model.generate(ids(length=4), 5, temperature=0.0)  # 4 + 5 - 1 = 8
    with pytest.raises(ValueError, match=r"max_new_tokens \(6\) - 1 exceeds the 8 positions"):
        model.generate(ids(length=4), 6, temperature=0.0)


def test_generate_rejects_arguments_that_would_drop_the_prefix():
    model = PrefixTunedModel(tiny_model(), 2)
    with pytest.raises(ValueError, match="use_cache must be True"):
        model.generate(ids(length=3), 2, use_cache=False)
    with pytest.raises(ValueError, match="cache_factory is set by PrefixTunedModel"):
        model.generate(ids(length=3), 2, cache_factory=ConcatKVCache)


# --- training: only the prefix learns -----------------------------------------------------------------------

def test_only_the_prefix_requires_and_receives_gradients():
    model = PrefixTunedModel(tiny_model(num_kv_heads=1), 3)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["prefix"]
    assert model.prefix.shape == (2, 2, 1, 3, 4)  # (L, 2, H_kv, P, D): 48 trainable numbers
    model(ids()).logsumexp(-1).mean().backward()
    assert model.prefix.grad is not None and model.prefix.grad.abs().sum(dim=(1, 2, 3, 4)).min() > 0  # every layer
    assert all(p.grad is None for p in model.base.parameters())


def test_00_utils_train_moves_only_the_prefix():
    model = PrefixTunedModel(tiny_model(), 2)
    base_before = {name: p.clone() for name, p in model.base.state_dict().items()}
    prefix_before = model.prefix.detach().clone()
    generator = torch.Generator().manual_seed(0)

    def batch_fn(split):
        x = torch.randint(0, V, (4, C - 2), generator=generator)
        return x, torch.roll(x, -1, dims=1)

    history = train(model, batch_fn, TrainConfig(steps=3, warmup_steps=0, eval_interval=3, eval_batches=1,
                                                 learning_rate=1e-2, progress=False))
    assert len(history.train_loss) == 3
    assert not torch.equal(model.prefix, prefix_before)
    assert all(torch.equal(p, base_before[name]) for name, p in model.base.state_dict().items())


def test_random_initialisation_is_small():
    torch.manual_seed(0)
    prefix = PrefixTunedModel(tiny_model(), 10, init_std=0.02).prefix
    assert abs(prefix.std().item() - 0.02) < 0.004


# --- bad arguments ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"prefix_length": 0}, ValueError, r"prefix_length must be an integer in \[1, 12\)"),
    ({"prefix_length": C}, ValueError, r"prefix_length must be an integer in \[1, 12\)"),
    ({"prefix_length": 1.5}, ValueError, r"prefix_length must be an integer in \[1, 12\)"),
    ({"prefix_length": True}, ValueError, r"prefix_length must be an integer in \[1, 12\)"),
    ({"init_std": 0.0}, ValueError, "init_std must be a finite number > 0"),
    ({"init_std": float("nan")}, ValueError, "init_std must be a finite number > 0"),
    ({"init_std": float("inf")}, ValueError, "init_std must be a finite number > 0"),
    ({"init_ids": torch.tensor([1, 2])}, ValueError, r"init_ids must be a tensor of 3 token ids"),
    ({"init_ids": [1, 2, 3]}, ValueError, r"init_ids must be a tensor of 3 token ids"),
    ({"base": nn.Linear(3, 3)}, TypeError, "base must be a MiniFormer"),
])
def test_prefix_tuned_model_rejects_bad_arguments(kwargs, error, match):
    arguments = {"base": tiny_model(), "prefix_length": 3, **kwargs}
    with pytest.raises(error, match=match):
        PrefixTunedModel(**arguments)


def test_a_model_whose_attention_caches_a_latent_is_rejected():
    class LatentCachingAttention(CausalSelfAttention):
        cache_factory = ConcatKVCache  # stands for 09's MLA cache, which holds a latent, not k and v

    register_attention("latent_for_prefix_test", LatentCachingAttention)
    try:
        base = MiniFormer(TransformerConfig(vocab_size=V, context_length=C, num_layers=1, num_heads=2, embed_dim=8,
                                            attention_module="latent_for_prefix_test"))
        with pytest.raises(ValueError, match="plain k, v cache"):
            PrefixTunedModel(base, 2)
    finally:
        unregister("attention", "latent_for_prefix_test")


@pytest.mark.parametrize("prefix", [torch.zeros(2, 3, 1, 2, 4), torch.zeros(2, 2, 1, 2), "prefix"])
def test_prefix_cache_rejects_a_prefix_of_the_wrong_layout(prefix):
    with pytest.raises(ValueError, match=r"prefix must be a tensor \(num_layers, 2, H_kv, P, D\)"):
        PrefixKVCache(prefix)


def test_prefix_cache_rejects_a_layer_it_has_no_prefix_for_and_a_head_mismatch():
    cache = PrefixKVCache(torch.zeros(2, 2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"layer_index must be in \[0, 2\)"):
        cache.update(2, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    with pytest.raises(ValueError, match="KV heads"):
        cache.update(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))  # the prefix has 1 head, these 2
