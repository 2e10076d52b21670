"""AWQ (Lin et al. 2023): activation-aware weight quantization by per-input-channel scaling.

A few input channels carry much larger activations than the rest; the rounding error of the weights that
read them is multiplied by those large activations. Scaling column j of W up by s_j before quantizing, and
the input down by s_j, leaves the product unchanged,  x W^T = (x / s) (W diag(s))^T,  but shrinks the
relative rounding error of the salient columns. AWQ sets

    s_j = mean_n |x_nj| ^ alpha,   normalised so that sqrt(max s * min s) = 1,

and picks alpha in [0, 1] on a grid to minimise the calibration output error ||X W^T - (X / s) Q(W diag(s))^T||^2.
alpha = 0 is plain round-to-nearest. The 1 / s is kept beside the layer here (it can be folded into the norm
before it); the paper also searches a clipping range, which this lesson leaves out.

Contents: AWQResult, awq_quantize.
"""

from dataclasses import dataclass

import torch

from gptq import calibration_rows, hessian, output_error
from quantization import QuantizedTensor, quantize_tensor

ALPHAS = tuple(i / 10 for i in range(11))  # the exponent grid searched


@dataclass
class AWQResult:
    quantized: QuantizedTensor  # Q(W diag(s))
    input_scale: torch.Tensor  # (in,) s: the layer computes (x / s) Q(W diag(s))^T
    alpha: float
    objective: float  # calibration output error of the chosen alpha

    def effective_weight(self) -> torch.Tensor:
        """Q(W diag(s)) diag(1/s): the weight the layer effectively applies to x."""
        return self.quantized.dequantize() / self.input_scale


def awq_quantize(weight: torch.Tensor, inputs: torch.Tensor, bits: int = 4, scheme: str = "zeropoint",
                 group_size: int | None = None, alphas=ALPHAS, scale_dtype=torch.float16) -> AWQResult:
    """Search alpha over `alphas` for the per-input-channel scaling of `weight` (out, in) with calibration
    `inputs` (..., in); group_size None = one grid per output row."""
    x = calibration_rows(inputs, weight.shape[1])  # (N, in)
    if not alphas:
        raise ValueError("alphas must hold at least one exponent in [0, 1]")
    granularity = "channel" if group_size is None else "group"
    activation = x.abs().mean(dim=0).clamp(min=1e-8)  # (in,): mean |x_j|
    H = hessian(x, weight.shape[1])  # the objective as trace(dW H dW^T): one (in, in) matrix instead of X
    best = None
    for alpha in alphas:
        s = activation ** alpha
        s = s / (s.max() * s.min()).sqrt()
        quantized = quantize_tensor(weight.float() * s, bits, scheme, granularity, group_size, scale_dtype)
        objective = output_error(weight.float(), quantized.dequantize() / s, H)
        if best is None or objective < best.objective:
            best = AWQResult(quantized, s, float(alpha), objective)
    return best
