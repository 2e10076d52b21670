"""A quantized lab model that runs: every linear layer of the blocks stored as codes, dequantized on the fly.

    y = (x / s) W_hat^T + b,   W_hat = dequantize(codes, scales[, zeros])   (s = AWQ's input scale, else 1)

The token embedding (tied to the output head), the position table, norms and biases stay float32: they are
a small share of the lab model, and most published schemes keep them at higher precision. model_bytes counts
what the model really holds: every unique parameter and buffer, plus each quantized layer's packed codes,
scales and zero points.

Contents: QuantizedLinear, METHODS, linear_layers, linear_inputs, quantize_model, model_bytes.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from awq import awq_quantize
from gptq import gptq_quantize
from quantization import check_bits, quantize_nf4, quantize_tensor

METHODS = ("rtn", "gptq", "awq", "nf4")


class QuantizedLinear(nn.Module):
    """A linear layer that keeps only the quantized weight (QuantizedTensor or NF4Tensor) and dequantizes it at
    every forward. input_scale (in,) divides the input first (AWQ)."""

    def __init__(self, quantized, bias: torch.Tensor | None, input_scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = quantized.shape
        self.quantized = quantized
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().half())

    def forward(self, x):  # (..., in) -> (..., out)
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        return F.linear(x, self.quantized.dequantize().to(x.dtype), self.bias)

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the codes and scales too
        self.quantized = self.quantized.apply(fn)
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {type(self.quantized).__name__}"


def linear_layers(model: nn.Module, skip=("head",)) -> list:
    """[(parent module, attribute name, full name, nn.Linear)] for every nn.Linear not named in skip."""
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full_name = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and full_name not in skip:
                found.append((module, child_name, full_name, child))
    return found


@torch.no_grad()
def linear_inputs(model: nn.Module, calibration, skip=("head",)) -> dict:
    """{layer name: inputs (N, in)} seen by each nn.Linear while `model` reads the calibration batches of ids."""
    batches = list(calibration) if calibration is not None else []
    if not batches:
        raise ValueError("calibration must hold at least one batch of token ids (B, T); got an empty calibration set")
    seen, hooks = {}, []
    for _, _, full_name, linear in linear_layers(model, skip):
        def record(module, args, output, name=full_name):
            seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))
        hooks.append(linear.register_forward_hook(record))
    try:
        for ids in batches:
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


@torch.no_grad()
def quantize_model(model: nn.Module, method: str = "rtn", bits: int = 4, group_size: int | None = None,
                   scheme: str = "zeropoint", calibration=None, double_quant: bool = False, skip=("head",)) -> nn.Module:
    """A copy of `model` with every nn.Linear (except `skip`) replaced by a QuantizedLinear.

    method "rtn" (round to nearest) | "gptq" | "awq" (both need `calibration`, a list of id batches) | "nf4"
    (bits must be 4; group_size is the NF4 block, default 64; double_quant quantizes the block absmaxes).
    group_size None = one grid per output channel."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_bits(bits, allowed=(4,) if method == "nf4" else range(2, 9))
    inputs = linear_inputs(model, calibration, skip) if method in ("gptq", "awq") else {}
    quantized_model = copy.deepcopy(model)
    granularity = "channel" if group_size is None else "group"
    for parent, attribute, full_name, linear in linear_layers(quantized_model, skip):
        weight, input_scale = linear.weight, None
        if method == "rtn":
            quantized = quantize_tensor(weight, bits, scheme, granularity, group_size)
        elif method == "gptq":
            quantized = gptq_quantize(weight, inputs[full_name], bits, scheme, group_size)
        elif method == "awq":
            result = awq_quantize(weight, inputs[full_name], bits, scheme, group_size)
            quantized, input_scale = result.quantized, result.input_scale
        else:
            quantized = quantize_nf4(weight, group_size or 64, double_quant)
        setattr(parent, attribute, QuantizedLinear(quantized, linear.bias, input_scale))
    return quantized_model


def model_bytes(model: nn.Module, skip=("head",)) -> dict:
    """{"total": bytes held by the model, "linear_weights": bytes of the weights of its linear layers except
    `skip` (codes, scales, zeros and AWQ input scales once quantized)}. Shared (tied) tensors count once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    linear_weights = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            total += module.quantized.nbytes
            linear_weights += module.quantized.nbytes
            if module.input_scale is not None:
                linear_weights += module.input_scale.numel() * module.input_scale.element_size()
        elif isinstance(module, nn.Linear) and name not in skip:
            linear_weights += module.weight.numel() * module.weight.element_size()
    return {"total": total, "linear_weights": linear_weights}
