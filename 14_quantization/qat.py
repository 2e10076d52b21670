"""Quantization-aware training (QAT): train through the rounding with the straight-through estimator.

The forward pass uses the quantized weight w_hat = Q(w) (the very function post-training quantization uses),
so the model learns weights that work after rounding. round() has zero gradient almost everywhere; the
straight-through estimator (STE, Bengio et al. 2013) pretends Q is the identity in the backward pass:

    forward:  y = x Q(w)^T + b          backward:  dL/dw := dL/dQ(w)      (written  w + (Q(w) - w).detach())

After training, quantizing the trained weights with the same Q gives a model whose forward equals the QAT
model's forward exactly.

Contents: fake_quantize, QATLinear, prepare_qat.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantization import quantize_tensor
from quantized_model import linear_layers


def fake_quantize(weight: torch.Tensor, bits: int, scheme: str = "zeropoint", group_size: int | None = None,
                  scale_dtype=torch.float16) -> torch.Tensor:
    """Q(w) in the forward pass, identity gradient in the backward pass (STE)."""
    granularity = "channel" if group_size is None else "group"
    rounded = quantize_tensor(weight.detach(), bits, scheme, granularity, group_size, scale_dtype).dequantize()
    return weight + (rounded.to(weight.dtype) - weight).detach()


class QATLinear(nn.Linear):
    """An nn.Linear whose forward uses the fake-quantized weight; the float weight is what the optimizer trains."""

    def __init__(self, linear: nn.Linear, bits: int, scheme: str = "zeropoint", group_size: int | None = None):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.load_state_dict(linear.state_dict())
        self.bits, self.scheme, self.group_size = bits, scheme, group_size
        fake_quantize(self.weight, bits, scheme, group_size)  # fail now on bad settings, not in the first step

    def forward(self, x):  # (..., in) -> (..., out)
        return F.linear(x, fake_quantize(self.weight, self.bits, self.scheme, self.group_size), self.bias)


def prepare_qat(model: nn.Module, bits: int, scheme: str = "zeropoint", group_size: int | None = None,
                skip=("head",)) -> nn.Module:
    """Replace every nn.Linear of `model` (in place, except names in `skip`) by a QATLinear; returns the model."""
    for parent, attribute, _, linear in linear_layers(model, skip):
        setattr(parent, attribute, QATLinear(linear, bits, scheme, group_size))
    return model
