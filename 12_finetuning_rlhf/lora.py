"""LoRA: fine-tune a frozen linear layer through a low-rank update (Hu et al. 2021), and QLoRA on a 4-bit base.

    y = W x + b + (alpha / r) * B A dropout(x),     A (r, in), B (out, r), r << min(in, out)

W and b stay frozen; only A and B train: r * (in + out) numbers instead of in * out. A starts like peft's
(Kaiming-uniform, a = sqrt(5), the nn.Linear default) and B at zero, so a fresh adapter changes nothing and
training starts from the pretrained model. alpha / r scales the update so that changing r does not change
how far a step moves the output. After training the update folds into the weight, W' = W + (alpha / r) B A
(merge): the adapted model then costs nothing extra at inference; unmerge subtracts it back.

QLoRA keeps the frozen base quantized (NF4 in the paper, 14's quantize_nf4 here) and dequantizes it at every
forward; the adapter stays float. Such a base cannot merge: W + (alpha / r) B A would have to be quantized
again, and that rounding would undo most of the (small) update.

The frozen base is an nn.Linear, or a quantized linear layer: any nn.Module with `in_features`,
`out_features` and forward(x) that keeps its weight in `.quantized` (an object with `shape`, `nbytes`,
`dequantize()`), as 14's QuantizedLinear does. This topic comes before 14, so it never imports 14:
apply_qlora takes the function that builds the quantized base (a test or demo passes 14's).

Contents: LoRALinear, TARGETS, DEFAULT_TARGETS, apply_lora, apply_qlora, lora_layers, merge_lora,
unmerge_lora, count_parameters, training_memory.
"""

import itertools
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# The linear layers of 04's blocks an adapter can target: attention's fused q/k/v and output projection, the
# feed-forward's up and down (and SwiGLU's gate). The tied output head is never a target.
TARGETS = ("qkv", "out", "gate", "up", "down")
DEFAULT_TARGETS = ("qkv", "out", "up", "down")
OPTIMIZERS = {"adamw": 2, "sgd": 0}  # fp32 state tensors per trainable parameter (AdamW: first and second moment)


def _quantized_weight(module: nn.Module):
    """The weight a quantized layer holds outside its parameters (14's QuantizedLinear.quantized), else None."""
    held = getattr(module, "quantized", None)
    return held if held is not None and hasattr(held, "nbytes") and hasattr(held, "dequantize") else None


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: base(x) + (alpha / rank) * B(A(dropout(x)))."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear) and not (
                isinstance(base, nn.Module) and isinstance(getattr(base, "in_features", None), int)
                and isinstance(getattr(base, "out_features", None), int)):
            raise TypeError(f"base must be an nn.Linear or a quantized linear layer (an nn.Module with in_features "
                            f"and out_features, e.g. 14's QuantizedLinear), got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")  # NaN fails the comparison too
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        if isinstance(base, nn.Linear):
            factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        else:  # a quantized base: the adapter stays float32, on the device of the base's tensors
            held = next(itertools.chain(base.parameters(), base.buffers()), None)
            factory = {"device": None if held is None else held.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r): a fresh adapter adds 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's (and nn.Linear's) default
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to the weight: (alpha / r) B A, shape (out, in)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x):  # (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:  # the update is already inside base.weight
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def _check_mergeable(self, action: str) -> None:
        if not isinstance(self.base, nn.Linear):
            raise TypeError(f"cannot {action} a LoRA adapter into a {type(self.base).__name__} base: its weight is "
                            f"quantized, so W + (alpha / r) B A would have to be re-quantized (losing most of the "
                            f"update); keep the adapter separate, or dequantize the base into an nn.Linear first")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: W <- W + (alpha / r) B A. Forward then skips the adapter."""
        self._check_mergeable("merge")
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; unmerge() first")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight: W <- W - (alpha / r) B A."""
        self._check_mergeable("unmerge")
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged; merge() first")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _check_targets(targets) -> tuple:
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty sequence of names from {TARGETS}, got {targets!r}")
    unknown = [name for name in targets if name not in TARGETS]
    if unknown:
        raise ValueError(f"targets must be names from {TARGETS}, got unknown {unknown}")
    return tuple(targets)


def _wrap_targets(model: nn.Module, rank: int, alpha: float, targets, dropout: float,
                  make_base: Callable[[nn.Linear], nn.Module]) -> list:
    """Replace every nn.Linear child named in targets by LoRALinear(make_base(linear)); freeze everything else."""
    targets = _check_targets(targets)
    found = [(parent, child_name, f"{name}.{child_name}" if name else child_name, child)
             for name, parent in model.named_modules() for child_name, child in parent.named_children()
             if child_name in targets and type(child) is nn.Linear]
    missing = [target for target in targets if not any(child_name == target for _, child_name, _, _ in found)]
    if missing:
        raise ValueError(f"targets {missing} match no nn.Linear in the model (already wrapped? a GELU MLP has no "
                         f"'gate'); targets must name linear layers of the blocks, from {TARGETS}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parent, child_name, _, linear in found:
        setattr(parent, child_name, LoRALinear(make_base(linear), rank, alpha, dropout))
    return [full_name for _, _, full_name, _ in found]


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS, dropout: float = 0.0) -> list:
    """Wrap, in place, every nn.Linear of `model` whose attribute name is in targets with a LoRALinear and
    freeze every other parameter. Returns the wrapped layers' names (e.g. 'blocks.0.attn.qkv')."""
    return _wrap_targets(model, rank, alpha, targets, dropout, lambda linear: linear)


def apply_qlora(model: nn.Module, rank: int, alpha: float, quantize_base: Callable[[nn.Linear], nn.Module],
                targets=DEFAULT_TARGETS, dropout: float = 0.0) -> list:
    """QLoRA: like apply_lora, but each target's frozen base is first replaced by quantize_base(linear), a
    quantized linear layer with the same in/out features (14's NF4: lambda linear: QuantizedLinear(
    quantize_nf4(linear.weight, 64, double_quant=True), linear.bias)). Returns the wrapped layers' names."""
    if not callable(quantize_base):
        raise TypeError(f"quantize_base must be a callable nn.Linear -> quantized layer, got {quantize_base!r}")

    def make_base(linear: nn.Linear) -> nn.Module:
        with torch.no_grad():
            quantized = quantize_base(linear)
        if not isinstance(quantized, nn.Module) or (getattr(quantized, "in_features", None), getattr(
                quantized, "out_features", None)) != (linear.in_features, linear.out_features):
            raise TypeError(f"quantize_base must return an nn.Module with in_features={linear.in_features} and "
                            f"out_features={linear.out_features}, got {type(quantized).__name__}")
        return quantized
    return _wrap_targets(model, rank, alpha, targets, dropout, make_base)


def lora_layers(model: nn.Module) -> list:
    """Every LoRALinear inside `model`."""
    return [module for module in model.modules() if isinstance(module, LoRALinear)]


def _lora_layers_or_raise(model: nn.Module) -> list:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: call apply_lora (or apply_qlora) first")
    return layers


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (the merged model runs at the base model's cost)."""
    for layer in _lora_layers_or_raise(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Subtract every adapter back out of its base weight."""
    for layer in _lora_layers_or_raise(model):
        layer.unmerge()


def count_parameters(model: nn.Module) -> dict:
    """{"trainable", "frozen", "total"} numbers of weights; a tied tensor counts once, and a quantized base
    counts its in * out weights as frozen (so LoRA and QLoRA on the same model report the same total)."""
    parameters = list(model.parameters())  # parameters() yields a shared (tied) tensor once
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    frozen = sum(p.numel() for p in parameters if not p.requires_grad)
    frozen += sum(math.prod(held.shape) for held in map(_quantized_weight, model.modules()) if held is not None)
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}


def training_memory(model: nn.Module, optimizer: str = "adamw") -> dict:
    """Bytes a training step holds besides activations (which depend on batch and sequence length):

    frozen_weights    frozen parameters and buffers as stored (a quantized base: its codes and scales)
    trainable_weights trainable parameters
    gradients         one per trainable parameter, in its dtype (frozen weights get none)
    optimizer_state   AdamW: 2 fp32 tensors (first and second moment) per trainable parameter; SGD: none
    total             the sum
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    parameters = list(model.parameters())  # a shared (tied) tensor once
    parameter_storage = {p.data_ptr() for p in parameters}
    buffers = [b for b in model.buffers() if b.data_ptr() not in parameter_storage]
    trainable = [p for p in parameters if p.requires_grad]
    frozen_weights = sum(t.numel() * t.element_size() for t in [*parameters, *buffers] if not t.requires_grad)
    frozen_weights += sum(held.nbytes for held in map(_quantized_weight, model.modules()) if held is not None)
    trainable_weights = sum(p.numel() * p.element_size() for p in trainable)
    state = OPTIMIZERS[optimizer] * 4 * sum(p.numel() for p in trainable)
    memory = {"frozen_weights": frozen_weights, "trainable_weights": trainable_weights,
              "gradients": trainable_weights, "optimizer_state": state}
    memory["total"] = sum(memory.values())
    return memory
