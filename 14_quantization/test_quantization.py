"""Tests of round-to-nearest quantization and NF4: error <= scale / 2 per element (int8 and every bit width),
hand-computed grids, packing round trips, the published NF4 levels, double quantization, a quantized lab
model that runs and reports its real bytes, and clear errors for bad bits, group sizes and calibration."""

import pytest
import torch

from quantization import (NF4_CODE, container_bits, nf4_code, pack_codes, quantize_nf4, quantize_tensor,
                          unpack_codes)
from quantized_model import QuantizedLinear, model_bytes, quantize_model
from transformer import MiniFormer, TransformerConfig


def random_weight(rows=16, columns=64, seed=0, outlier=False):
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * 0.05
    if outlier:
        weight[3, 7] = 2.0
    return weight


def group_scales(quantized):
    """The stored scale of every element's group, shaped like the weight."""
    return quantized.scale.float().expand(-1, quantized.group_len).reshape(quantized.shape)


@pytest.mark.parametrize("scheme", ["absmax", "zeropoint"])
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 16)])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_round_trip_error_is_at_most_half_a_step(scheme, granularity, group_size, bits):
    weight = random_weight(outlier=True)
    quantized = quantize_tensor(weight, bits, scheme, granularity, group_size)
    error = (quantized.dequantize() - weight).abs()
    bound = group_scales(quantized) / 2
    assert (error <= bound * (1 + 1e-6) + 1e-12).all(), (error - bound).max()


def test_absmax_int8_by_hand():
    weight = torch.tensor([[0.5, -1.27, 0.0, 0.01]])
    quantized = quantize_tensor(weight, 8, "absmax", "channel", scale_dtype=torch.float32)
    assert quantized.scale.item() == pytest.approx(0.01)  # 1.27 / 127
    assert quantized.codes.tolist() == [[50, -127, 0, 1]]


def test_zero_point_int8_by_hand():
    # range [-1, 1.55] over 255 steps: scale 0.01, zero = round(1 / 0.01) = 100
    weight = torch.tensor([[-1.0, 0.0, 1.55, 0.2]])
    quantized = quantize_tensor(weight, 8, "zeropoint", "tensor", scale_dtype=torch.float32)
    assert quantized.scale.item() == pytest.approx(0.01)
    assert quantized.zero.item() == 100
    assert quantized.codes.tolist() == [[0, 100, 255, 120]]


def test_per_channel_survives_an_outlier_that_per_tensor_does_not():
    weight = random_weight(outlier=True)
    errors = {g: (quantize_tensor(weight, 8, "absmax", g).dequantize() - weight).pow(2).mean().item()
              for g in ("tensor", "channel")}
    assert errors["channel"] < errors["tensor"] / 4


def test_zero_is_exact_and_all_zero_groups_stay_zero():
    weight = random_weight()
    weight[2] = 0.0
    for scheme in ("absmax", "zeropoint"):
        restored = quantize_tensor(weight, 4, scheme, "group", 16).dequantize()
        assert torch.equal(restored[2], torch.zeros_like(restored[2]))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_packing_round_trip_and_size(bits, signed):
    count = 37  # not a multiple of the codes per byte
    generator = torch.Generator().manual_seed(bits)
    if signed:
        low, high = -(2 ** (container_bits(bits) - 1)), 2 ** (container_bits(bits) - 1)
        codes = torch.randint(max(low, -128), min(high, 128), (count,), generator=generator).to(torch.int8)
    else:
        codes = torch.randint(0, 2 ** bits, (count,), generator=generator).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count * container_bits(bits) // 8)
    assert torch.equal(unpack_codes(packed, bits, count, signed), codes)


def test_int4_packs_two_values_per_byte_low_nibble_first():
    assert pack_codes(torch.tensor([1, 2, 15, 0], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]
    assert pack_codes(torch.tensor([-1, 3], dtype=torch.int8), 4).tolist() == [0x3F]


def test_bytes_of_a_group_wise_int4_weight():
    quantized = quantize_tensor(random_weight(16, 64), 4, "zeropoint", "group", 32)
    # 1024 codes in 512 bytes, 32 groups of one float16 scale and one uint8 zero
    assert quantized.nbytes == 512 + 32 * 2 + 32


def test_nf4_levels_equal_the_published_table():
    assert torch.allclose(nf4_code(), torch.tensor(NF4_CODE), atol=1e-6, rtol=0)
    assert len(NF4_CODE) == 16 and NF4_CODE[7] == 0.0 and (NF4_CODE[0], NF4_CODE[-1]) == (-1.0, 1.0)


def test_nf4_rounds_each_weight_to_the_nearest_level():
    weight = random_weight(8, 64)
    quantized = quantize_nf4(weight, block_size=64)
    normalised = weight / weight.abs().amax(dim=1, keepdim=True)
    nearest = (normalised[..., None] - torch.tensor(NF4_CODE)).abs().min(dim=-1).values
    assert torch.allclose((quantized.dequantize() / weight.abs().amax(dim=1, keepdim=True) - normalised).abs(),
                          nearest, atol=1e-6)


def test_nf4_beats_uniform_int4_on_normal_weights():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    nf4 = (quantize_nf4(weight, 64).dequantize() - weight).pow(2).mean()
    int4 = (quantize_tensor(weight, 4, "absmax", "group", 64).dequantize() - weight).pow(2).mean()
    assert nf4 < int4


def test_double_quantization_saves_bytes_and_stays_close():
    weight = random_weight(64, 256)
    single, double = quantize_nf4(weight, 64), quantize_nf4(weight, 64, double_quant=True)
    assert double.nbytes < single.nbytes
    step = single.block_absmax().abs().max() / 127  # int8 absmax of the block scales: error <= step
    assert (double.block_absmax() - single.block_absmax()).abs().max() <= step
    assert single.nbytes == 64 * 256 // 2 + 256 * 4


def lab_like_model(seed=0):
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=29, context_length=16, num_layers=2, num_heads=2, embed_dim=32)
    return MiniFormer(config).eval()


def calibration_batches(count=2):
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, 29, (2, 16), generator=generator) for _ in range(count)]


@pytest.mark.parametrize("method,bits,group_size", [("rtn", 8, None), ("rtn", 4, 16), ("gptq", 3, 16),
                                                    ("awq", 4, None), ("nf4", 4, 32)])
def test_quantized_model_runs_and_holds_fewer_bytes(method, bits, group_size):
    model = lab_like_model()
    ids = calibration_batches(1)[0]
    quantized = quantize_model(model, method, bits, group_size, calibration=calibration_batches())
    assert sum(isinstance(m, QuantizedLinear) for m in quantized.modules()) == 8
    with torch.no_grad():
        reference, logits = model(ids), quantized(ids)
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    assert (logits - reference).abs().max() < 0.5 * reference.abs().max()
    full, small = model_bytes(model), model_bytes(quantized)
    assert full["linear_weights"] == 4 * sum(m.weight.numel() for n, m in model.named_modules()
                                             if isinstance(m, torch.nn.Linear) and n != "head")
    assert small["linear_weights"] < full["linear_weights"] * (container_bits(bits) + 2) / 32  # codes + scales
    assert full["total"] - small["total"] == full["linear_weights"] - small["linear_weights"]


def test_int8_model_is_close_to_float():
    model = lab_like_model()
    ids = calibration_batches(1)[0]
    with torch.no_grad():
        error = (quantize_model(model, "rtn", 8, scheme="absmax")(ids) - model(ids)).abs().max()
    assert error < 2e-3


@pytest.mark.parametrize("bits", [1, 9, 4.0, True, "8"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be an integer in"):
        quantize_tensor(random_weight(), bits)


@pytest.mark.parametrize("group_size", [0, 24, 100, None, 2.0])
def test_group_size_must_divide_the_input_dimension(group_size):
    with pytest.raises(ValueError, match="group_size must be a positive integer that divides"):
        quantize_tensor(random_weight(16, 64), 4, "absmax", "group", group_size)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_tensor(random_weight(), 8, "minmax")
    with pytest.raises(ValueError, match="granularity must be one of"):
        quantize_tensor(random_weight(), 8, "absmax", "row")
    with pytest.raises(ValueError, match="block_size must divide"):
        quantize_nf4(random_weight(5, 60), 64)  # 300 weights
    with pytest.raises(ValueError, match="weight must hold finite values"):
        quantize_tensor(torch.tensor([1.0, float("nan")]), 8)
    with pytest.raises(ValueError, match="bits must be 4, got 3"):
        quantize_model(lab_like_model(), "nf4", 3)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_model(lab_like_model(), "hqq", 4)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_empty_calibration_set(method):
    with pytest.raises(ValueError, match="calibration must hold at least one batch"):
        quantize_model(lab_like_model(), method, 4, calibration=[])
