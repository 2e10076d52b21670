"""Tests of the calibrated quantizers: GPTQ's output error on its calibration data <= round-to-nearest's on the
same layer (per channel and grouped, every bit width), GPTQ on uncorrelated inputs with a diagonal H is RTN,
AWQ's alpha = 0 is RTN and its chosen alpha never does worse, and an empty calibration set is refused."""

import pytest
import torch

from awq import awq_quantize
from gptq import calibration_objective, gptq_quantize, hessian
from quantization import quantize_tensor


def layer_and_inputs(out_features=24, in_features=64, rows=512, seed=0):
    """A weight and correlated calibration inputs with a few large ("salient") channels, like real activations."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.1
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features ** 0.5
    inputs = torch.randn(rows, in_features, generator=generator) @ (torch.eye(in_features) + mixing)
    inputs[:, :4] *= 8.0
    return weight, inputs


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 16), (3, None), (3, 32), (2, 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_error_on_calibration_objective_at_most_rtn(bits, group_size, seed):
    weight, inputs = layer_and_inputs(seed=seed)
    granularity = "channel" if group_size is None else "group"
    rtn = quantize_tensor(weight, bits, "zeropoint", granularity, group_size).dequantize()
    gptq = gptq_quantize(weight, inputs, bits, "zeropoint", group_size).dequantize()
    assert calibration_objective(weight, gptq, inputs) <= calibration_objective(weight, rtn, inputs)


def test_gptq_with_uncorrelated_inputs_and_no_damping_is_round_to_nearest():
    # H diagonal -> H^-1 diagonal -> the error of one column never moves another column
    weight, _ = layer_and_inputs()
    inputs = torch.eye(64).repeat(4, 1) * torch.linspace(1, 2, 64)
    assert torch.allclose(hessian(inputs, 64), torch.diag(hessian(inputs, 64).diagonal()))
    gptq = gptq_quantize(weight, inputs, 4, "absmax", None, damping=0.0)
    rtn = quantize_tensor(weight, 4, "absmax", "channel")
    assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scale, rtn.scale)


def test_gptq_layout_and_bytes_equal_round_to_nearest():
    weight, inputs = layer_and_inputs()
    gptq = gptq_quantize(weight, inputs, 4, "zeropoint", 16)
    rtn = quantize_tensor(weight, 4, "zeropoint", "group", 16)
    assert gptq.scale.shape == rtn.scale.shape and gptq.nbytes == rtn.nbytes and gptq.group_len == 16


def test_awq_alpha_zero_is_rtn_and_search_never_worse():
    weight, inputs = layer_and_inputs()
    rtn = quantize_tensor(weight, 3, "zeropoint", "channel").dequantize()
    plain = awq_quantize(weight, inputs, 3, alphas=(0.0,))
    assert torch.allclose(plain.effective_weight(), rtn, atol=1e-6)
    searched = awq_quantize(weight, inputs, 3)
    assert searched.objective <= calibration_objective(weight, rtn, inputs)
    assert searched.alpha > 0  # the salient channels make scaling worth it


@pytest.mark.parametrize("empty", [torch.empty(0, 64), torch.empty(0)])
def test_empty_calibration_set_is_refused(empty):
    weight, _ = layer_and_inputs()
    with pytest.raises(ValueError, match="calibration set is empty"):
        gptq_quantize(weight, empty, 4)
    with pytest.raises(ValueError, match="calibration set is empty"):
        awq_quantize(weight, empty, 4)


def test_bad_gptq_arguments():
    weight, inputs = layer_and_inputs()
    with pytest.raises(ValueError, match="group_size must be a positive integer that divides"):
        gptq_quantize(weight, inputs, 4, group_size=24)
    with pytest.raises(ValueError, match="bits must be an integer in"):
        gptq_quantize(weight, inputs, 1)
    with pytest.raises(ValueError, match="inputs \\(the calibration activations\\) must end with in_features = 64"):
        gptq_quantize(weight, inputs[:, :32], 4)
    with pytest.raises(ValueError, match="damping must be"):
        gptq_quantize(weight, inputs, 4, damping=float("nan"))
