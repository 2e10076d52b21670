"""Round-to-nearest quantization of a weight matrix: absmax and zero-point integers, packed codes, NF4.

A b-bit integer grid stores each weight as a small integer q and shares one float `scale` per group:

    absmax (symmetric)     qmax = 2^(b-1) - 1    scale = max|w| / qmax          q = round(w / scale) in [-qmax, qmax]
                                                                                 w_hat = q * scale
    zero-point (affine)    L = 2^b levels        scale = (max w - min w) / (L - 1), zero = round(-min w / scale)
                                                 q = clamp(round(w / scale) + zero, 0, L - 1)   w_hat = (q - zero) * scale

with min/max taken over 0 too, so w = 0 is stored exactly. Every element inside the grid's range is off by at
most scale / 2. The group that shares a scale is the whole tensor, one output channel (a row of W (out, in)),
or `group_size` consecutive inputs of a row: smaller groups follow the weights more closely and cost
(scale + zero bytes) / group_size more per weight. Codes of at most 4 bits are packed: two 4-bit (or 3-bit)
codes, or four 2-bit codes, per byte.

NF4 (QLoRA, Dettmers et al. 2023) keeps absmax blocks (64 weights) but replaces the 16 evenly spaced levels by
the quantiles of a standard normal, rescaled to [-1, 1], with an exact zero:
    positive levels  Phi^-1(linspace(0.5, p, 9)[1:]),  negative levels  -Phi^-1(linspace(0.5, p, 8)[1:]),
    p = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, all divided by the largest one.
Weights are roughly normal, so each level gets about equally many weights. Double quantization stores
the block absmaxes themselves in 8 bits (per block of 256, minus their mean): 32/64 -> ~8.5/64 bits per weight.

Contents: check_bits, grid_for, quantize_to_grid, dequantize_codes, container_bits, pack_codes, unpack_codes,
QuantizedTensor, group_view, check_scheme, quantize_tensor (round to nearest, any granularity),
NF4_CODE / nf4_code, NF4Tensor, quantize_nf4.
"""

import math
from dataclasses import dataclass, fields, replace

import torch

SCHEMES = ("absmax", "zeropoint")
GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_bits(bits, allowed=range(2, 9)) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        allowed_text = f"{min(allowed)}" if len(allowed) == 1 else f"an integer in [{min(allowed)}, {max(allowed)}]"
        raise ValueError(f"bits must be {allowed_text}, got {bits!r}")
    return bits


def _check_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {type(weight).__name__}")
    if weight.dim() not in (1, 2) or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 1-D or 2-D tensor (out, in), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight must hold finite values only")


def _round_scale_up(scale: torch.Tensor, largest: torch.Tensor, levels: int, scale_dtype) -> torch.Tensor:
    """The scale in its storage dtype, nudged up one step where rounding made it too small to reach `largest`
    (so the grid still covers every weight and the error bound scale / 2 holds for the stored scale)."""
    stored = scale.to(scale_dtype).clamp(min=torch.finfo(scale_dtype).tiny)  # an all-zero group never divides 0/0
    too_small = stored.float() * levels < largest
    return torch.where(too_small, torch.nextafter(stored, torch.full_like(stored, math.inf)), stored)


def grid_for(groups: torch.Tensor, bits: int, scheme: str = "absmax", scale_dtype=torch.float16) -> tuple:
    """Fit one grid per row of `groups` (G, group_len): -> (scale (G, 1) in scale_dtype, zero (G, 1) uint8 or None)."""
    groups = groups.float()
    if scheme == "absmax":
        qmax = 2 ** (bits - 1) - 1
        largest = groups.abs().amax(dim=1, keepdim=True)  # (G, 1)
        return _round_scale_up(largest / qmax, largest, qmax, scale_dtype), None
    levels = 2 ** bits - 1
    low = groups.amin(dim=1, keepdim=True).clamp(max=0)  # (G, 1): the range always holds 0
    high = groups.amax(dim=1, keepdim=True).clamp(min=0)
    scale = _round_scale_up((high - low) / levels, high - low, levels, scale_dtype)
    zero = torch.round(-low / scale.float()).clamp(0, levels).to(torch.uint8)
    return scale, zero


def quantize_to_grid(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round (G, group_len) weights onto a fitted grid: int8 codes (absmax) or uint8 codes (zero-point)."""
    scaled = groups.float() / scale.float()
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return torch.round(scaled).clamp(-qmax, qmax).to(torch.int8)
    return (torch.round(scaled) + zero.float()).clamp(0, 2 ** bits - 1).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(G, group_len) codes -> float32 weights: q * scale, or (q - zero) * scale."""
    values = codes.float() if zero is None else codes.float() - zero.float()
    return values * scale.float()


def container_bits(bits: int) -> int:
    """Bits each code occupies once packed: 8 bits for 5-8, a nibble for 3-4, 2 bits for 2."""
    return 8 if bits > 4 else 4 if bits > 2 else 2


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of codes (int8 or uint8) into bytes: 8 // container_bits(bits) codes per byte, the first
    code in the lowest bits. Signed codes are stored in two's complement within their slot."""
    width = container_bits(bits)
    flat = codes.reshape(-1)
    if width == 8:
        return flat.view(torch.uint8) if flat.dtype == torch.int8 else flat.to(torch.uint8)
    per_byte = 8 // width
    mask = (1 << width) - 1
    padded = torch.zeros(math.ceil(flat.numel() / per_byte) * per_byte, dtype=torch.int16, device=flat.device)
    padded[:flat.numel()] = flat.to(torch.int16) & mask  # (N,) each code in [0, 2^width)
    slots = padded.reshape(-1, per_byte)  # (N / per_byte, per_byte)
    shifts = torch.arange(per_byte, device=flat.device, dtype=torch.int16) * width
    return (slots << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int, signed: bool) -> torch.Tensor:
    """Inverse of pack_codes: the first `count` codes, as int8 (signed) or uint8."""
    width = container_bits(bits)
    if width == 8:
        return packed[:count].view(torch.int8) if signed else packed[:count]
    per_byte = 8 // width
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int16) * width
    slots = (packed.to(torch.int16)[:, None] >> shifts) & ((1 << width) - 1)  # (N / per_byte, per_byte)
    codes = slots.reshape(-1)[:count]
    if signed:  # two's complement of a width-bit field: flip the sign bit, then subtract it
        sign = 1 << (width - 1)
        return ((codes ^ sign) - sign).to(torch.int8)
    return codes.to(torch.uint8)


@dataclass
class QuantizedTensor:
    """A weight stored as packed integer codes with one scale (and zero) per group.

    The weight (out, in) is viewed as groups of `group_len` consecutive elements in row-major order:
    per tensor one group, per channel one group per row, per group `in // group_size` groups per row.
    """

    packed: torch.Tensor  # (ceil(numel / codes per byte),) uint8
    scale: torch.Tensor  # (G, 1) scale_dtype
    zero: torch.Tensor | None  # (G, 1) uint8 for zero-point, None for absmax
    bits: int
    group_len: int
    shape: tuple

    @property
    def codes(self) -> torch.Tensor:
        """The codes unpacked: (G, group_len) int8 (absmax) or uint8 (zero-point)."""
        numel = math.prod(self.shape)
        return unpack_codes(self.packed, self.bits, numel, signed=self.zero is None).reshape(-1, self.group_len)

    def dequantize(self) -> torch.Tensor:
        """The weight the codes stand for, float32, in the original shape."""
        return dequantize_codes(self.codes, self.scale, self.zero).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually held: packed codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)

    def apply(self, fn) -> "QuantizedTensor":
        """A copy with `fn` applied to every tensor field (moves it between devices)."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def group_view(weight: torch.Tensor, granularity: str = "channel", group_size: int | None = None) -> torch.Tensor:
    """The weight as (G, group_len) rows, one row per group that will share a scale."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    matrix = weight.reshape(1, -1) if weight.dim() == 1 else weight
    if granularity == "tensor":
        return matrix.reshape(1, -1)
    if granularity == "channel":
        return matrix
    columns = matrix.shape[1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or columns % group_size:
        raise ValueError(f"group_size must be a positive integer that divides the input dimension ({columns}), "
                         f"got {group_size!r}")
    return matrix.reshape(-1, group_size)


def check_scheme(scheme: str, scale_dtype) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")


def quantize_tensor(weight: torch.Tensor, bits: int = 8, scheme: str = "absmax", granularity: str = "channel",
                    group_size: int | None = None, scale_dtype=torch.float16) -> QuantizedTensor:
    """Round-to-nearest (RTN) quantization of `weight` (out, in) or (n,) at `bits` with one grid per group.

    granularity "tensor" | "channel" (one grid per output row) | "group" (`group_size` inputs of a row)."""
    _check_weight(weight)
    check_bits(bits)
    check_scheme(scheme, scale_dtype)
    groups = group_view(weight, granularity, group_size)  # (G, group_len)
    scale, zero = grid_for(groups, bits, scheme, scale_dtype)
    codes = quantize_to_grid(groups, scale, zero, bits)
    return QuantizedTensor(pack_codes(codes, bits), scale, zero, bits, groups.shape[1], tuple(weight.shape))


# ---------------------------------------------------------------------------------------------------
# NF4: normal-float levels, absmax blocks, optional double quantization of the block scales
# ---------------------------------------------------------------------------------------------------

# The 16 NF4 levels as published with QLoRA (bitsandbytes' `NF4` table); nf4_code() derives them from Phi^-1.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236328, 1.0)


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels (16,) float32, computed from normal quantiles as in the QLoRA paper."""
    p = (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2  # ~0.9677: the outermost quantile probability
    normal_quantile = torch.special.ndtri
    positive = normal_quantile(torch.linspace(p, 0.5, 9, dtype=torch.float64)[:-1])  # 8 levels > 0
    negative = -normal_quantile(torch.linspace(p, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels < 0
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.max()).float()


@dataclass
class NF4Tensor:
    """4-bit NF4 codes (two per byte) with one absmax per block, stored directly (float32) or double-quantized
    (int8 per block plus a float32 scale per `second_block` absmaxes and their mean)."""

    packed: torch.Tensor  # (numel / 2,) uint8
    absmax: torch.Tensor | None  # (blocks,) float32, without double quantization
    absmax_codes: torch.Tensor | None  # (blocks,) int8, with double quantization
    absmax_scale: torch.Tensor | None  # (ceil(blocks / second_block),) float32
    absmax_mean: torch.Tensor | None  # () float32
    block_size: int
    second_block: int
    shape: tuple

    def block_absmax(self) -> torch.Tensor:
        if self.absmax is not None:
            return self.absmax
        codes = self.absmax_codes.float()
        padded = torch.zeros(self.absmax_scale.numel() * self.second_block, device=codes.device)
        padded[:codes.numel()] = codes
        scaled = (padded.reshape(-1, self.second_block) * self.absmax_scale[:, None]).reshape(-1)
        return scaled[:codes.numel()] + self.absmax_mean

    def dequantize(self) -> torch.Tensor:
        numel = math.prod(self.shape)
        index = unpack_codes(self.packed, 4, numel, signed=False).long().reshape(-1, self.block_size)
        levels = torch.tensor(NF4_CODE, device=index.device)[index]  # (blocks, block_size) in [-1, 1]
        return (levels * self.block_absmax()[:, None]).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        parts = (self.packed, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_mean)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def apply(self, fn) -> "NF4Tensor":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False,
                 second_block: int = 256) -> NF4Tensor:
    """NF4 quantization: per block of `block_size` consecutive weights, w / absmax is rounded to the nearest
    NF4 level. double_quant stores the absmaxes as int8 (absmax quantization of absmax - mean, per
    `second_block` of them; QLoRA uses an 8-bit float there)."""
    _check_weight(weight)
    for name, value in (("block_size", block_size), ("second_block", second_block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if weight.numel() % block_size:
        raise ValueError(f"block_size must divide the number of weights ({weight.numel()}), got {block_size}")
    blocks = weight.float().reshape(-1, block_size)  # (blocks, block_size)
    absmax = blocks.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)  # (blocks,)
    levels = torch.tensor(NF4_CODE, device=weight.device)
    normalised = blocks / absmax[:, None]  # in [-1, 1]
    index = (normalised[..., None] - levels).abs().argmin(dim=-1)  # (blocks, block_size): nearest level
    packed = pack_codes(index.to(torch.uint8), 4)
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, None, block_size, second_block, tuple(weight.shape))
    mean = absmax.mean()
    centred = torch.zeros(math.ceil(absmax.numel() / second_block) * second_block, device=weight.device)
    centred[:absmax.numel()] = absmax - mean
    chunks = centred.reshape(-1, second_block)  # (chunks, second_block)
    scale = (chunks.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (chunks,)
    codes = torch.round(chunks / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[:absmax.numel()]
    return NF4Tensor(packed, None, codes, scale, mean, block_size, second_block, tuple(weight.shape))
