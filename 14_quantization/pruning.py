"""Magnitude pruning: set the smallest weights to zero.

Unstructured:  keep the weights with the largest |w|; exactly k = round(sparsity * numel) become 0.
2:4 (semi-structured, NVIDIA Ampere sparse tensor cores): in every run of 4 consecutive inputs of a row keep
the 2 largest |w|, so exactly half the weights are 0 and the pattern is regular enough for a kernel to skip.
A zero saves nothing until a sparse format or kernel uses it: the tensors here stay dense (the lesson is the
accuracy cost).

Contents: magnitude_mask, two_four_mask, prune_model.
"""

import math

import torch
import torch.nn as nn

from quantized_model import linear_layers


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (same shape, True = keep) zeroing exactly round(sparsity * numel) of the smallest |w|."""
    if not (isinstance(sparsity, (int, float)) and math.isfinite(sparsity) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity must be a finite number in [0, 1), got {sparsity!r}")
    pruned = round(sparsity * weight.numel())
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    keep[torch.argsort(weight.detach().abs().reshape(-1), stable=True)[:pruned]] = False  # ties: lower index first
    return keep.reshape(weight.shape)


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping the 2 largest |w| in every 4 consecutive inputs of each row of weight (out, in)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"2:4 pruning needs a 2-D weight whose input dimension is divisible by 4, got shape "
                         f"{tuple(weight.shape)}")
    quads = weight.detach().abs().reshape(-1, 4)  # (out * in / 4, 4)
    keep = torch.zeros_like(quads, dtype=torch.bool)
    keep.scatter_(1, quads.topk(2, dim=1).indices, True)
    return keep.reshape(weight.shape)


@torch.no_grad()
def prune_model(model: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured", skip=("head",)) -> float:
    """Prune every nn.Linear of `model` in place (each layer to the same sparsity; names in `skip` kept).
    pattern "unstructured" | "2:4" (sparsity is then 0.5). Returns the fraction of their weights now zero."""
    if pattern not in ("unstructured", "2:4"):
        raise ValueError(f"pattern must be 'unstructured' or '2:4', got {pattern!r}")
    zeros = total = 0
    for _, _, _, module in linear_layers(model, skip):
        mask = two_four_mask(module.weight) if pattern == "2:4" else magnitude_mask(module.weight, sparsity)
        module.weight.mul_(mask)
        zeros += (~mask).sum().item()
        total += mask.numel()
    if total == 0:
        raise ValueError("model has no nn.Linear layer to prune")
    return zeros / total
