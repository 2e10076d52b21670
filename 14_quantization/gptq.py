"""GPTQ (Frantar et al. 2022): quantize a linear layer one input column at a time, and push each column's
rounding error onto the columns not yet quantized, so the layer's OUTPUT on calibration data stays close.

Objective for W (out, in) and calibration inputs X (N, in):   E(W_hat) = ||X W^T - X W_hat^T||^2 / N
                                                              = trace((W - W_hat) H (W - W_hat)^T),  H = X^T X / N.
Quantizing column i to q_i leaves the error e_i = w_i - q_i; the optimal correction of the remaining
columns j > i (Optimal Brain Quantization) is  w_j <- w_j - e_i / [H^-1]_ii * [H^-1]_ij.  With U the upper
Cholesky factor of H^-1, processing columns left to right needs only row i of U:

    for i in 0 .. in-1:   q_i = quantize(w_i);  e_i = (w_i - q_i) / U_ii;  w_{i+1:} -= e_i U_{i, i+1:}

A small damping (1% of mean diag H) keeps H invertible. With groups, a group's grid is fitted when the loop
reaches its first column, on the weights as corrected so far (so the grid matches what gets rounded).
Calibration inputs here come from the full-precision model (one pass); the paper feeds each layer the
outputs of the already-quantized layers before it.

Contents: calibration_rows, hessian, output_error, calibration_objective, gptq_quantize.
"""

import math

import torch

from quantization import QuantizedTensor, check_bits, check_scheme, grid_for, pack_codes


def calibration_rows(inputs: torch.Tensor, in_features: int) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor) or inputs.numel() == 0:
        raise ValueError("inputs (the calibration activations) must be a non-empty tensor (..., in_features); the "
                         "calibration set is empty")
    if inputs.shape[-1] != in_features:
        raise ValueError(f"inputs (the calibration activations) must end with in_features = {in_features}, got shape "
                         f"{tuple(inputs.shape)}")
    return inputs.reshape(-1, in_features).float()  # (N, in)


def hessian(inputs: torch.Tensor, in_features: int) -> torch.Tensor:
    """H = X^T X / N (in, in) from calibration inputs (..., in)."""
    x = calibration_rows(inputs, in_features)
    return x.T @ x / x.shape[0]


def output_error(weight: torch.Tensor, approximation: torch.Tensor, H: torch.Tensor) -> float:
    """trace((W - W_hat) H (W - W_hat)^T): the calibration objective from H, without touching X again."""
    delta = (weight - approximation).to(H.dtype)  # (out, in)
    return ((delta @ H) * delta).sum().item()


def calibration_objective(weight: torch.Tensor, approximation: torch.Tensor, inputs: torch.Tensor) -> float:
    """||X W^T - X W_hat^T||^2 / N: the squared output error per calibration row, what GPTQ minimises."""
    x = calibration_rows(inputs, weight.shape[1])
    return ((x @ (weight.float() - approximation.float()).T) ** 2).sum().item() / x.shape[0]


def gptq_quantize(weight: torch.Tensor, inputs: torch.Tensor, bits: int = 4, scheme: str = "zeropoint",
                  group_size: int | None = None, damping: float = 0.01, scale_dtype=torch.float16) -> QuantizedTensor:
    """GPTQ-quantize `weight` (out, in) with calibration `inputs` (..., in); group_size None = one grid per row.

    Returns a QuantizedTensor with the same layout (and bytes) as quantize_tensor's round-to-nearest one."""
    check_bits(bits)
    check_scheme(scheme, scale_dtype)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    group = columns if group_size is None else group_size
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or columns % group:
        raise ValueError(f"group_size must be a positive integer that divides the input dimension ({columns}), "
                         f"got {group_size!r}")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    H = hessian(inputs, columns)  # (in, in)
    W = weight.detach().float().clone()  # (out, in), corrected as the loop goes
    dead = H.diagonal() == 0  # inputs that are always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damping * H.diagonal().mean() * torch.eye(columns, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H^-1 = U^T U

    levels = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if scheme == "absmax" else (0, 2 ** bits - 1)
    codes = torch.empty(rows, columns, device=weight.device)  # the integer codes, held as floats in the loop
    scales, zeros = [], []
    for i in range(columns):
        if i % group == 0:  # fit the grid of the group starting here, on the corrected weights
            scale, zero = grid_for(W[:, i:i + group], bits, scheme, scale_dtype)  # (out, 1) each
            scales.append(scale)
            zeros.append(zero)
            step = scale.float()[:, 0]  # (out,)
            offset = torch.zeros_like(step) if zero is None else zero.float()[:, 0]
        column = W[:, i]  # (out,): quantize_to_grid and dequantize_codes, written out for one column
        codes[:, i] = q = (torch.round(column / step) + offset).clamp_(*levels)
        error = (column - (q - offset) * step) / U[i, i]  # (out,)
        W[:, i + 1:] -= error[:, None] * U[i, i + 1:]  # push the error onto the columns still to come

    # Reorder the per-column-block grids (out, groups) into row-major groups (out * groups, 1) as quantize_tensor does.
    scale = torch.cat(scales, dim=1).reshape(-1, 1)
    zero = None if scheme == "absmax" else torch.cat(zeros, dim=1).reshape(-1, 1)
    codes = codes.to(torch.int8 if scheme == "absmax" else torch.uint8)
    return QuantizedTensor(pack_codes(codes, bits), scale, zero, bits, group, (rows, columns))
