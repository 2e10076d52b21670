"""Tests for positional_embeddings: closed forms, hand-computed values, the relative-position
property of RoPE, the permutation between its two layouts, and Hugging Face's implementations
(Llama rotary, DistilBERT sinusoidal, BLOOM ALiBi) when transformers is installed."""

import math

import pytest
import torch

from positional_embeddings import (
    LearnedPositionalEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    interleaved_to_half_permutation,
    rope_frequencies,
    sinusoidal_encoding,
)
from testing import require

LAYOUTS = ("half", "interleaved")


# ---------------------------------------------------------------------------------------------- sinusoidal

def test_sinusoidal_hand_computed_row():
    # dim 4, base 10000: w_0 = 1, w_1 = 10000^(-2/4) = 0.01
    table = sinusoidal_encoding(3, 4)
    expected_row_2 = [math.sin(2.0), math.cos(2.0), math.sin(0.02), math.cos(0.02)]
    assert table.shape == (3, 4) and table.dtype == torch.float32
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(table[2], torch.tensor(expected_row_2))


def test_sinusoidal_offset_is_a_slice_of_the_longer_table():
    torch.testing.assert_close(sinusoidal_encoding(5, 16, offset=7), sinusoidal_encoding(12, 16)[7:])


def test_sinusoidal_shift_is_a_rotation_independent_of_position():
    # PE[p + k] is PE[p] with each (sin, cos) pair rotated by k * w_i: a linear map that does not depend on p.
    dim, shift = 16, 5
    table = sinusoidal_encoding(40, dim, base=100.0).double()
    angle = shift * rope_frequencies(dim, base=100.0).double()  # (dim/2,)
    sin_p, cos_p = table[:-shift, 0::2], table[:-shift, 1::2]
    predicted_sin = sin_p * angle.cos() + cos_p * angle.sin()
    predicted_cos = cos_p * angle.cos() - sin_p * angle.sin()
    torch.testing.assert_close(table[shift:, 0::2], predicted_sin, atol=1e-6, rtol=0)
    torch.testing.assert_close(table[shift:, 1::2], predicted_cos, atol=1e-6, rtol=0)


def test_sinusoidal_matches_hugging_face_distilbert():
    distilbert = require("transformers.models.distilbert.modeling_distilbert")
    reference = torch.empty(50, 32)
    distilbert._create_sinusoidal_embeddings(n_pos=50, dim=32, out=reference)
    torch.testing.assert_close(sinusoidal_encoding(50, 32), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, name", [
    ({"num_positions": 4, "dim": 7}, "dim"),
    ({"num_positions": 0, "dim": 8}, "num_positions"),
    ({"num_positions": 4, "dim": 8, "base": 1.0}, "base"),
    ({"num_positions": 4, "dim": 8, "offset": -1}, "offset"),
])
def test_sinusoidal_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sinusoidal_encoding(**kwargs)


# ---------------------------------------------------------------------------------------------- learned

def test_learned_returns_table_rows_and_trains_only_the_rows_it_used():
    table = LearnedPositionalEmbedding(max_positions=10, dim=4)
    rows = table(3, offset=2)
    torch.testing.assert_close(rows, table.weight[2:5])
    rows.sum().backward()
    touched = table.weight.grad.abs().sum(dim=1) > 0
    assert touched.tolist() == [False, False, True, True, True, False, False, False, False, False]


def test_learned_cannot_go_past_its_table():
    table = LearnedPositionalEmbedding(max_positions=8, dim=4)
    assert table(8).shape == (8, 4)
    with pytest.raises(ValueError, match="max_positions"):
        table(4, offset=5)


@pytest.mark.parametrize("call, name", [
    (lambda: LearnedPositionalEmbedding(0, 4), "max_positions"),
    (lambda: LearnedPositionalEmbedding(4, 0), "dim"),
    (lambda: LearnedPositionalEmbedding(4, 4)(0), "seq_len"),
    (lambda: LearnedPositionalEmbedding(4, 4)(2, offset=-1), "offset"),
])
def test_learned_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ---------------------------------------------------------------------------------------------- RoPE

def test_rope_frequencies_closed_form():
    torch.testing.assert_close(rope_frequencies(4), torch.tensor([1.0, 0.01]))
    torch.testing.assert_close(rope_frequencies(8, base=16.0), torch.tensor([1.0, 0.5, 0.25, 0.125]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_hand_computed_two_dimensional_rotation(layout):
    # D = 2 has one pair with w_0 = 1: position p rotates (1, 0) to (cos p, sin p) in both layouts.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # (T=3, D=2)
    expected = torch.tensor([[1.0, 0.0], [math.cos(1), math.sin(1)], [-2 * math.sin(2), 2 * math.cos(2)]])
    torch.testing.assert_close(apply_rope(x, layout=layout), expected)


@pytest.mark.parametrize("head_dim", [2, 8, 64])
def test_rope_layouts_are_the_same_map_up_to_a_feature_permutation(head_dim):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, head_dim)
    permutation = interleaved_to_half_permutation(head_dim)
    interleaved = apply_rope(x, offset=4, layout="interleaved")
    half = apply_rope(x[..., permutation], offset=4, layout="half")
    torch.testing.assert_close(interleaved[..., permutation], half)
    if head_dim > 2:  # ...and not the same map without the permutation
        assert not torch.allclose(interleaved, apply_rope(x, offset=4, layout="half"), atol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_is_a_rotation_and_position_zero_is_identity(layout):
    torch.manual_seed(0)
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    rotated = apply_rope(x, offset=3, layout=layout)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rope(x[:, :1], layout=layout), x[:, :1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_dot_product_depends_only_on_relative_position(layout):
    torch.manual_seed(0)
    q, k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)

    def score(query_position, key_position):
        rotated_q = apply_rope(q[None], layout=layout, positions=torch.tensor([query_position]))[0]
        rotated_k = apply_rope(k[None], layout=layout, positions=torch.tensor([key_position]))[0]
        return (rotated_q @ rotated_k).item()

    for query_position, key_position in [(5, 2), (9, 9), (3, 10)]:
        reference = score(query_position, key_position)
        for shift in (1, 17, 1000):
            assert score(query_position + shift, key_position + shift) == pytest.approx(reference, abs=1e-9)
    # moving only one of the two changes the score: the property above is not vacuous
    assert abs(score(5, 2) - score(6, 2)) > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_offset_equals_positions_and_a_slice_of_the_longer_sequence(layout):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 12, 8)
    full = apply_rope(x, layout=layout)
    torch.testing.assert_close(apply_rope(x[:, :, 5:], offset=5, layout=layout), full[:, :, 5:])
    torch.testing.assert_close(apply_rope(x[:, :, 5:], positions=torch.arange(5, 12), layout=layout), full[:, :, 5:])


def test_rope_keeps_low_precision_dtype_and_computes_in_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    low = apply_rope(x.bfloat16(), offset=100)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), apply_rope(x, offset=100), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("offset", [0, 37])
def test_rope_matches_hugging_face_llama(offset):
    llama = require("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    batch, heads, seq_len, head_dim, theta = 2, 3, 10, 16, 500.0
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, rope_theta=theta,
                         max_position_embeddings=128)
    assert config.rope_parameters["rope_type"] == "default"
    torch.manual_seed(0)
    q, k = torch.randn(batch, heads, seq_len, head_dim), torch.randn(batch, heads, seq_len, head_dim)
    position_ids = torch.arange(offset, offset + seq_len)[None].expand(batch, -1)
    cos, sin = llama.LlamaRotaryEmbedding(config)(q, position_ids)
    q_hf, k_hf = llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, offset=offset, base=theta, layout="half"), q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope(k, offset=offset, base=theta, layout="half"), k_hf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call, error, name", [
    (lambda: apply_rope(torch.randn(3, 5, 7)), ValueError, "head_dim"),
    (lambda: apply_rope(torch.randn(3, 5, 8), layout="gptj"), ValueError,
     r"layout must be one of \('half', 'interleaved'\)"),
    (lambda: apply_rope(torch.randn(3, 5, 8), offset=-2), ValueError, "offset"),
    (lambda: apply_rope(torch.randn(3, 5, 8), positions=torch.arange(4)), ValueError, "positions"),
    (lambda: apply_rope(torch.randn(3, 5, 8), base=0.5), ValueError, "base"),
    (lambda: apply_rope(torch.randn(8)), ValueError, "x must have shape"),
    (lambda: rope_frequencies(5), ValueError, "head_dim"),
    (lambda: interleaved_to_half_permutation(3), ValueError, "head_dim"),
    (lambda: apply_rope(torch.ones(3, 5, 8, dtype=torch.long)), TypeError, "x must be a floating-point tensor"),
    (lambda: apply_rope(torch.randn(3, 5, 8), base=float("inf")), ValueError, "base"),
    (lambda: apply_rope(torch.randn(3, 5, 8), base=float("nan")), ValueError, "base"),
])
def test_rope_bad_arguments(call, error, name):
    with pytest.raises(error, match=name):
        call()


# ---------------------------------------------------------------------------------------------- ALiBi

def test_alibi_slopes_power_of_two_by_hand():
    # The paper's reference code for 8 heads: start = 2^(-8/8) = 1/2, ratio 1/2 -> 1/2, 1/4, ..., 1/256.
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([1 / 2 ** h for h in range(1, 9)]))
    torch.testing.assert_close(alibi_slopes(1), torch.tensor([1 / 256]))
    torch.testing.assert_close(alibi_slopes(16), torch.tensor([2 ** (-h / 2) for h in range(1, 17)]))


def test_alibi_slopes_not_a_power_of_two_by_hand():
    # The reference code for n = 12: the 8 slopes of 8 heads, then get_slopes(16)[0::2][:4], i.e. the
    # 16-head slopes 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 that lie between the 8-head ones.
    expected_12 = [2 ** -1, 2 ** -2, 2 ** -3, 2 ** -4, 2 ** -5, 2 ** -6, 2 ** -7, 2 ** -8,
                   2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected_12))
    # n = 6: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then the 8-head slopes 2^-1, 2^-3
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))


def test_alibi_slopes_match_hugging_face_bloom():
    bloom = require("transformers.models.bloom.modeling_bloom")
    for num_heads in range(1, 65):
        torch.testing.assert_close(alibi_slopes(num_heads), bloom._get_alibi_slopes(num_heads, "cpu"),
                                   msg=f"num_heads={num_heads}")


def test_alibi_bias_hand_computed():
    # 2 heads: slopes 2^-4, 2^-8; 2 queries at positions 1, 2 over 3 keys (default offset 3 - 2 = 1)
    bias = alibi_bias(2, 2, 3)
    expected_head_0 = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, -1.0, 0.0]]) / 16
    assert bias.shape == (2, 2, 3)
    torch.testing.assert_close(bias[0], expected_head_0)
    torch.testing.assert_close(bias[1], expected_head_0 / 16)
    torch.testing.assert_close(alibi_bias(2, 2, 3, offset=0)[0], torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 1.0]]) / 16)


def test_alibi_bias_of_one_cached_query_is_the_last_row_of_the_full_bias():
    full = alibi_bias(12, 20, 20)
    torch.testing.assert_close(alibi_bias(12, 1, 20), full[:, -1:])
    torch.testing.assert_close(alibi_bias(12, 5, 20), full[:, -5:])
    assert torch.all(full.diagonal(dim1=1, dim2=2) == 0)


def test_alibi_bias_gives_the_same_causal_softmax_as_hugging_face_bloom():
    # BLOOM adds slope * j (no query term): it differs from ours by slope * i per row, which a softmax ignores.
    bloom = require("transformers.models.bloom.modeling_bloom")
    num_heads, seq_len = 6, 9
    bloom_bias = bloom.build_alibi_tensor(torch.ones(1, seq_len), num_heads, torch.float32)  # (H, 1, T)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    torch.manual_seed(0)
    scores = torch.randn(num_heads, seq_len, seq_len)
    ours = torch.softmax((scores + alibi_bias(num_heads, seq_len, seq_len)).masked_fill(~causal, -math.inf), dim=-1)
    theirs = torch.softmax((scores + bloom_bias).masked_fill(~causal, -math.inf), dim=-1)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("call, name", [
    (lambda: alibi_slopes(0), "num_heads"),
    (lambda: alibi_bias(0, 2, 2), "num_heads"),
    (lambda: alibi_bias(4, 0, 2), "query_length"),
    (lambda: alibi_bias(4, 2, 0), "key_length"),
    (lambda: alibi_bias(4, 5, 3), "query_length"),
    (lambda: alibi_bias(4, 2, 3, offset=-1), "offset"),
])
def test_alibi_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()
