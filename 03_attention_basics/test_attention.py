"""Tests of attention.py against torch's own attention, closed forms and properties (causality, masks)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import (MultiHeadAttention, attention_entropy, causal_mask, naive_score_memory_bytes, padding_mask,
                       scaled_dot_product_attention, tiled_attention)


def random_qkv(batch=2, heads=3, query_length=5, key_length=5, head_dim=8, value_dim=None, dtype=torch.float64,
               seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, query_length, head_dim), (batch, heads, key_length, head_dim),
              (batch, heads, key_length, value_dim or head_dim)]
    return [torch.randn(s, generator=generator, dtype=dtype).requires_grad_(requires_grad) for s in shapes]


def values_and_grads(fn, tensors):
    """Output of fn(*tensors) and the gradients of a fixed random projection of it w.r.t. every input."""
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    output = fn(*tensors)
    projection = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=output.dtype)
    (output * projection).sum().backward()
    return output.detach(), [t.grad for t in tensors]


def assert_same_values_and_grads(fn, reference_fn, tensors, atol=1e-10):
    output, grads = values_and_grads(fn, tensors)
    expected, expected_grads = values_and_grads(reference_fn, tensors)
    torch.testing.assert_close(output, expected, atol=atol, rtol=atol)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=atol, rtol=atol)


# ---------------------------------------------------------------- masks

def test_causal_mask_hand_computed():
    expected_square = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(3, 3), expected_square)
    # Two new queries after three cached keys sit at positions 3 and 4 (end-aligned, as with a KV cache).
    expected_cached = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected_cached)


def test_padding_mask_hand_computed():
    mask = padding_mask(torch.tensor([2, 4, 0]), 4)
    assert mask.shape == (3, 1, 1, 4) and mask.dtype == torch.bool
    assert mask[:, 0, 0].tolist() == [[True, True, False, False], [True, True, True, True], [False] * 4]


# ---------------------------------------------------------------- scaled dot-product attention vs torch

@pytest.mark.parametrize("is_causal, lengths", [(False, (1, 1)), (False, (6, 6)), (False, (6, 9)), (False, (9, 4)),
                                               (True, (1, 1)), (True, (6, 6)), (True, (6, 9)), (True, (1, 9))])
def test_sdpa_matches_torch_values_and_grads(is_causal, lengths):
    query_length, key_length = lengths
    tensors = random_qkv(query_length=query_length, key_length=key_length, value_dim=5)
    # torch's is_causal is top-left aligned; pass our end-aligned mask explicitly so both mean the same thing.
    torch_mask = causal_mask(query_length, key_length) if is_causal else None
    assert_same_values_and_grads(lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=is_causal),
                                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask),
                                 tensors)


def test_sdpa_matches_torch_is_causal_for_square_inputs():
    tensors = random_qkv(query_length=7, key_length=7)
    assert_same_values_and_grads(lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True),
                                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), tensors)


def test_torch_is_causal_is_top_left_aligned_and_ours_is_not():
    """Why callers with a KV cache must pass causal_mask: torch's is_causal differs when Tq < Tk."""
    q, k, v = random_qkv(query_length=2, key_length=5)
    ours = scaled_dot_product_attention(q, k, v, is_causal=True)
    torch_top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(ours, torch_top_left)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(2, 5)))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_sdpa_masks_match_torch(mask_kind):
    tensors = random_qkv(query_length=4, key_length=6)
    generator = torch.Generator().manual_seed(3)
    bool_mask = torch.rand(2, 1, 4, 6, generator=generator) > 0.3
    bool_mask[..., 0] = True  # every row keeps one key, so torch gives no NaN either
    mask = bool_mask if mask_kind == "bool" else torch.randn(2, 3, 4, 6, generator=generator, dtype=torch.float64)
    assert_same_values_and_grads(lambda q, k, v: scaled_dot_product_attention(q, k, v, mask=mask),
                                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), tensors)


def test_sdpa_custom_scale_matches_torch():
    tensors = random_qkv()
    assert_same_values_and_grads(lambda q, k, v: scaled_dot_product_attention(q, k, v, scale=1.0),
                                 lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=1.0), tensors)


def test_weights_are_a_distribution_and_reproduce_the_output():
    q, k, v = random_qkv(query_length=4, key_length=6)
    output, weights = scaled_dot_product_attention(q, k, v, return_weights=True)
    assert weights.shape == (2, 3, 4, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 4, dtype=torch.float64))
    torch.testing.assert_close(output, weights @ v)


def test_leading_dims_broadcast():
    q, k, v = random_qkv(batch=2, heads=3)
    shared_k, shared_v = k[:1, :1], v[:1, :1]  # (1, 1, T, D): one key/value set for every batch and head
    torch.testing.assert_close(scaled_dot_product_attention(q, shared_k, shared_v),
                               F.scaled_dot_product_attention(q, shared_k.expand_as(k), shared_v.expand_as(v)))


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = random_qkv(query_length=3, key_length=4, requires_grad=True)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False  # query 1 may see nothing
    output, weights = scaled_dot_product_attention(q, k, v, mask=mask, return_weights=True)
    assert torch.all(output[:, :, 1] == 0) and torch.all(weights[:, :, 1] == 0)
    output.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # the other rows are untouched by the empty one
    torch.testing.assert_close(output[:, :, [0, 2]],
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, :, [0, 2]])


def test_padding_keys_are_ignored():
    """A sequence padded with garbage keys gives the same outputs as the unpadded sequence."""
    q, k, v = random_qkv(batch=1, query_length=3, key_length=7)
    mask = padding_mask(torch.tensor([4]), 7)
    padded = scaled_dot_product_attention(q, k, v, mask=mask)
    k_noise, v_noise = k.clone(), v.clone()
    k_noise[..., 4:, :] = 1e3
    v_noise[..., 4:, :] = -1e3
    torch.testing.assert_close(scaled_dot_product_attention(q, k_noise, v_noise, mask=mask), padded)
    torch.testing.assert_close(padded, scaled_dot_product_attention(q, k[..., :4, :], v[..., :4, :]))


@pytest.mark.parametrize("attention", ["naive", "tiled"])
def test_causality_future_token_changes_no_earlier_output(attention):
    fn = ((lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True)) if attention == "naive"
          else (lambda q, k, v: tiled_attention(q, k, v, is_causal=True, block_size=3)))
    q, k, v = random_qkv(query_length=10, key_length=10)
    before = fn(q, k, v)
    changed = 6
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for tensor in (q2, k2, v2):
        tensor[..., changed, :] += 5.0
    after = fn(q2, k2, v2)
    assert torch.equal(after[..., :changed, :], before[..., :changed, :])
    assert not torch.allclose(after[..., changed:, :], before[..., changed:, :])


def test_entropy_closed_forms():
    uniform = torch.full((2, 8), 1 / 8)
    one_hot = torch.eye(8)[:2]
    torch.testing.assert_close(attention_entropy(uniform), torch.full((2,), math.log(8)))
    torch.testing.assert_close(attention_entropy(one_hot), torch.zeros(2))


def test_score_memory_formula_equals_the_weights_tensor_size():
    q, k, v = random_qkv(batch=2, heads=3, query_length=5, key_length=7, dtype=torch.float32)
    _, weights = scaled_dot_product_attention(q, k, v, return_weights=True)
    assert naive_score_memory_bytes(2, 3, 5, 7) == weights.numel() * weights.element_size() == 2 * 3 * 5 * 7 * 4


# ---------------------------------------------------------------- multi-head attention vs torch.nn.MultiheadAttention

def paired_modules(embed_dim=12, num_heads=3, bias=True):
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(embed_dim, num_heads, bias=bias, batch_first=True).double()
    ours = MultiHeadAttention(embed_dim, num_heads, bias=bias).double().copy_from_torch(reference)
    return ours, reference


@pytest.mark.parametrize("bias", [True, False])
def test_mha_self_attention_matches_torch(bias):
    ours, reference = paired_modules(bias=bias)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    output, weights = ours(x, x, x, return_weights=True)
    expected, expected_weights = reference(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(weights, expected_weights)
    (grad,) = torch.autograd.grad(output.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad)


def test_mha_causal_and_padding_masks_match_torch():
    ours, reference = paired_modules()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    lengths = torch.tensor([6, 4])
    keep = padding_mask(lengths, 6) & causal_mask(6, 6)  # (B, 1, T, T), True = attend
    output = ours(x, x, x, mask=padding_mask(lengths, 6), is_causal=True)
    # torch's masks mean the opposite: True = may NOT attend
    expected, _ = reference(x, x, x, attn_mask=~causal_mask(6, 6), key_padding_mask=~padding_mask(lengths, 6)[:, 0, 0])
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(ours(x, x, x, mask=keep), expected)


def test_mha_cross_attention_matches_torch():
    ours, reference = paired_modules()
    query, memory = torch.randn(2, 3, 12, dtype=torch.float64), torch.randn(2, 8, 12, dtype=torch.float64)
    torch.testing.assert_close(ours(query, memory, memory), reference(query, memory, memory)[0])


def test_mha_causality():
    ours, _ = paired_modules()
    x = torch.randn(1, 8, 12, dtype=torch.float64)
    y = x.clone()
    y[:, 5] += 1.0
    assert torch.equal(ours(x, x, x, is_causal=True)[:, :5], ours(y, y, y, is_causal=True)[:, :5])


# ---------------------------------------------------------------- tiled attention

@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("lengths", [(1, 1), (7, 7), (65, 65), (130, 130), (5, 70), (33, 100)])
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_tiled_equals_naive_for_lengths_not_multiple_of_block(is_causal, lengths, block_size):
    query_length, key_length = lengths
    q, k, v = random_qkv(query_length=query_length, key_length=key_length, value_dim=6)
    torch.testing.assert_close(tiled_attention(q, k, v, is_causal=is_causal, block_size=block_size),
                               scaled_dot_product_attention(q, k, v, is_causal=is_causal), atol=1e-12, rtol=1e-12)


def test_tiled_gradients_equal_naive():
    tensors = random_qkv(query_length=21, key_length=21)
    assert_same_values_and_grads(lambda q, k, v: tiled_attention(q, k, v, is_causal=True, block_size=8),
                                 lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True), tensors)


def test_tiled_survives_large_scores():
    """The running max keeps exp() finite where an un-shifted softmax would overflow."""
    q, k, v = random_qkv(query_length=20, key_length=20, dtype=torch.float32)
    output = tiled_attention(q * 30, k * 30, v, block_size=8)
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, F.scaled_dot_product_attention(q * 30, k * 30, v), atol=1e-4, rtol=1e-4)


def test_tiled_half_precision_close_to_float32():
    q, k, v = random_qkv(query_length=40, key_length=40, dtype=torch.float32)
    half = tiled_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True, block_size=16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=3e-2, rtol=3e-2)


def test_tiled_never_holds_a_full_score_matrix():
    """Every tensor autograd keeps is at most a (block, block) tile per head, never (T, T)."""
    length, block_size = 96, 16
    q, k, v = random_qkv(batch=1, heads=2, query_length=length, key_length=length, head_dim=4, requires_grad=True)
    saved_sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_sizes.append(t.shape[-2:]) or t, lambda t: t):
        tiled_attention(q, k, v, block_size=block_size)
    assert saved_sizes and max(s.numel() for s in saved_sizes) <= block_size * block_size
    saved_sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_sizes.append(t.shape[-2:]) or t, lambda t: t):
        scaled_dot_product_attention(q, k, v)
    assert (length, length) in saved_sizes  # the naive version does keep the full matrix


@settings(max_examples=25, deadline=None)
@given(query_length=st.integers(1, 40), extra_keys=st.integers(0, 30), block_size=st.integers(1, 50),
       is_causal=st.booleans())
def test_tiled_equals_naive_property(query_length, extra_keys, block_size, is_causal):
    q, k, v = random_qkv(batch=1, heads=2, query_length=query_length, key_length=query_length + extra_keys)
    torch.testing.assert_close(tiled_attention(q, k, v, is_causal=is_causal, block_size=block_size),
                               scaled_dot_product_attention(q, k, v, is_causal=is_causal), atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- bad arguments

def qkv_with(**shapes):
    defaults = {"q": (1, 2, 4, 8), "k": (1, 2, 6, 8), "v": (1, 2, 6, 8)}
    defaults.update(shapes)
    return [torch.randn(defaults[name]) for name in ("q", "k", "v")]


@pytest.mark.parametrize("attention", [scaled_dot_product_attention, tiled_attention])
@pytest.mark.parametrize("shapes, message", [
    ({"k": (1, 2, 6, 7)}, "q and k"),
    ({"v": (1, 2, 5, 8)}, "k and v"),
    ({"q": (8,)}, "q must have at least 2 dims"),
    ({"k": (3, 2, 6, 8), "v": (3, 2, 6, 8), "q": (2, 2, 4, 8)}, "do not broadcast"),
    ({"k": (1, 2, 0, 8), "v": (1, 2, 0, 8)}, r"k must hold at least one key \(Tk >= 1\)"),
    ({"q": (1, 2, 0, 8)}, r"q must hold at least one query \(Tq >= 1\)"),
    ({"q": (1, 2, 4, 0), "k": (1, 2, 6, 0)}, "head dim D of q and k must be >= 1"),
])
def test_bad_shapes_raise_clear_errors(attention, shapes, message):
    with pytest.raises(ValueError, match=message):
        attention(*qkv_with(**shapes))


@pytest.mark.parametrize("attention", [scaled_dot_product_attention, tiled_attention])
@pytest.mark.parametrize("scale", [0.0, -0.5, float("inf"), float("nan")])
def test_bad_scale_is_refused(attention, scale):
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        attention(*qkv_with(), scale=scale)


@pytest.mark.parametrize("attention", [scaled_dot_product_attention, tiled_attention])
def test_bad_causal_lengths(attention):
    q, k, v = qkv_with()
    with pytest.raises(ValueError, match="query_length must be <= key_length"):
        attention(k, q, q, is_causal=True)  # 6 queries, 4 keys


def test_bad_masks():
    q, k, v = qkv_with()
    with pytest.raises(ValueError, match="mask of shape"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(4, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="query_length and key_length must be >= 1"):
        causal_mask(0, 3)
    with pytest.raises(ValueError, match="lengths must be in"):
        padding_mask(torch.tensor([2, 5]), 4)
    with pytest.raises(ValueError, match="lengths must be a 1-D"):
        padding_mask(torch.tensor([[2]]), 4)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        padding_mask(torch.tensor([0]), 0)


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        tiled_attention(*qkv_with(), block_size=0)


def test_bad_multi_head_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="embed_dim and num_heads must be >= 1"):
        MultiHeadAttention(0, 1)
    module = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="query must have shape"):
        module(torch.randn(2, 5, 6), torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="share the batch size"):
        module(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="reference must have"):
        module.copy_from_torch(torch.nn.MultiheadAttention(8, 4, batch_first=True))
