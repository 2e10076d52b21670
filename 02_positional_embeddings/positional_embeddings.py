"""Positional information for attention: sinusoidal, learned, rotary (RoPE) and linear biases (ALiBi).

Attention is permutation-invariant: without a position signal, "dog bites man" and "man bites dog"
give the same set of scores. Four ways to add one, in the order they appeared:

  sinusoidal (Vaswani et al. 2017), a fixed vector ADDED to the token embedding:
      PE[p, 2i] = sin(p * w_i),  PE[p, 2i+1] = cos(p * w_i),  w_i = base^(-2i/dim)
  learned (GPT-2), a trained table ADDED to the token embedding: PE[p] = W[p], one row per position,
      so a position never seen in training has no trained row.
  RoPE (Su et al., RoFormer 2021), a ROTATION of each query/key feature pair by the angle p * w_i:
      [x_a', x_b'] = [x_a cos(p w_i) - x_b sin(p w_i),  x_b cos(p w_i) + x_a sin(p w_i)]
      so that q_m . k_n depends on m - n only. The pair (a, b) is (2i, 2i+1) in the paper's
      "interleaved" layout and (i, i + D/2) in the "half" layout of Hugging Face Llama.
  ALiBi (Press et al. 2022), no vector at all: a BIAS added to the attention scores,
      score[h, i, j] += -m_h * (i - j),  with head slopes m_h a geometric sequence (2^(-8/H), 2^(-16/H), ...).

Only torch is imported; the model that uses these lives in 04_transformer_block.
"""

import math

import torch
from torch import nn

ROPE_LAYOUTS = ("half", "interleaved")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_offset(offset: int) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


def _check_base(base: float) -> None:
    if not (base > 1.0 and math.isfinite(base)):
        raise ValueError(f"base must be a finite number > 1, got {base}")


# ----------------------------------------------------------------------------------------------
# 1. Sinusoidal: a fixed vector per position, added to the token embedding.
# ----------------------------------------------------------------------------------------------

def sinusoidal_encoding(num_positions: int, dim: int, base: float = 10000.0, offset: int = 0, *,
                        device=None) -> torch.Tensor:
    """Table (num_positions, dim) whose row p encodes position offset + p.

    Even features are sin(position * w_i), odd features cos(position * w_i), w_i = base^(-2i/dim):
    wavelengths from 2*pi (feature 0) to 2*pi*base (the last pair). Float32, angles formed in float64
    so that large positions keep their precision.
    """
    _check_positive("num_positions", num_positions)
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be even and >= 2, got {dim}")
    _check_base(base)
    _check_offset(offset)
    positions = torch.arange(offset, offset + num_positions, dtype=torch.float64, device=device)  # (P,)
    frequencies = rope_frequencies(dim, base, device=device).double()  # (dim/2,)
    angles = positions[:, None] * frequencies[None, :]  # (P, dim/2)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (P, dim/2, 2): sin then cos per pair
    return table.reshape(num_positions, dim).float()


# ----------------------------------------------------------------------------------------------
# 2. Learned: a trained table, one row per position it was sized for.
# ----------------------------------------------------------------------------------------------

class LearnedPositionalEmbedding(nn.Module):
    """A (max_positions, dim) table of trained vectors, initialised N(0, 0.02^2) as in GPT-2.

    It cannot extrapolate: a position >= max_positions has no row, and forward raises ValueError.
    A row that exists but never received a gradient (the table is larger than the training
    context) keeps its random initialisation: that is what "untrained position" means.
    """

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        _check_positive("max_positions", max_positions)
        _check_positive("dim", dim)
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.randn(max_positions, dim) * 0.02)

    def forward(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        """Rows offset .. offset + seq_len - 1 of the table: (seq_len, dim)."""
        _check_positive("seq_len", seq_len)
        _check_offset(offset)
        if offset + seq_len > self.max_positions:
            raise ValueError(f"offset + seq_len = {offset + seq_len} exceeds max_positions = {self.max_positions}: "
                             f"a learned table has no row for positions >= max_positions")
        return self.weight[offset:offset + seq_len]


# ----------------------------------------------------------------------------------------------
# 3. RoPE: rotate query/key feature pairs by an angle proportional to the position.
# ----------------------------------------------------------------------------------------------

def rope_frequencies(head_dim: int, base: float = 10000.0, *, device=None) -> torch.Tensor:
    """Angular frequencies w_i = base^(-2i/head_dim) for i = 0 .. head_dim/2 - 1: (head_dim // 2,) float32."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 2, got {head_dim}")
    _check_base(base)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return (base ** -exponents).float()


def interleaved_to_half_permutation(head_dim: int) -> torch.Tensor:
    """Index p such that x[..., p] moves the interleaved pairs (2i, 2i+1) to the half pairs (i, i + D/2).

    apply_rope(x, layout="interleaved")[..., p] == apply_rope(x[..., p], layout="half"): the two layouts
    are one map written in two orders of the features (this is how Meta's Llama weights are permuted
    into Hugging Face's layout).
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 2, got {head_dim}")
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def apply_rope(x: torch.Tensor, offset: int = 0, base: float = 10000.0, layout: str = "half",
               positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the feature pairs of x (..., T, D) by position * w_i; returns x's shape and dtype.

    Positions are offset + arange(T) (offset = tokens already in a KV cache) unless `positions` (T,)
    is given. Computed in float32 (float64 for a float64 input); cos/sin from float64 angles.
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    if not x.is_floating_point():  # an integer x would be rotated and then truncated back to integers
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., T, D), got {tuple(x.shape)}")
    seq_len, head_dim = x.shape[-2], x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"the last dimension of x (head_dim) must be even, got {head_dim}")
    frequencies = rope_frequencies(head_dim, base, device=x.device).double()  # (D/2,)
    if positions is None:
        _check_offset(offset)
        positions = torch.arange(offset, offset + seq_len, device=x.device)
    elif positions.shape != (seq_len,):
        raise ValueError(f"positions must have shape (T,) = ({seq_len},), got {tuple(positions.shape)}")
    angles = positions.to(x.device, torch.float64)[:, None] * frequencies[None, :]  # (T, D/2)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = angles.cos().to(compute_dtype), angles.sin().to(compute_dtype)  # (T, D/2) each
    input_dtype, x = x.dtype, x.to(compute_dtype)
    if layout == "half":
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2:]  # (..., T, D/2) each
        rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    else:
        even, odd = x[..., 0::2], x[..., 1::2]  # (..., T, D/2) each
        rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return rotated.to(input_dtype)


# ----------------------------------------------------------------------------------------------
# 4. ALiBi: no vector at all, a distance penalty added to the attention scores.
# ----------------------------------------------------------------------------------------------

def alibi_slopes(num_heads: int, *, device=None) -> torch.Tensor:
    """Head slopes m_h (num_heads,) float32, as in the ALiBi paper's reference code.

    For a power of two n: m_h = 2^(-8 (h + 1) / n), h = 0 .. n-1 (8 heads: 1/2, 1/4, ..., 1/256).
    Otherwise, with n0 the largest power of two below n: the n0 slopes of n0 heads, followed by the
    first n - n0 odd-indexed slopes of 2*n0 heads, 2^(-8 (2j + 1) / (2 n0)), which fall between them.
    """
    _check_positive("num_heads", num_heads)
    closest_power = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * (h + 1) / closest_power) for h in range(closest_power)]
    slopes += [2.0 ** (-8.0 * (2 * j + 1) / (2 * closest_power)) for j in range(num_heads - closest_power)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def alibi_bias(num_heads: int, query_length: int, key_length: int, offset: int | None = None, *,
               device=None) -> torch.Tensor:
    """Additive score bias (num_heads, query_length, key_length): bias[h, i, j] = -m_h * (offset + i - j).

    Query i sits at position offset + i; by default offset = key_length - query_length (queries are
    the last positions, as with a KV cache). Future keys (j > offset + i) get a positive bias here:
    the causal mask is applied separately by the caller.
    """
    _check_positive("query_length", query_length)
    _check_positive("key_length", key_length)
    if offset is None:
        if query_length > key_length:
            raise ValueError(f"query_length ({query_length}) must be <= key_length ({key_length}) when offset "
                             f"is None (queries are aligned to the last keys)")
        offset = key_length - query_length
    _check_offset(offset)
    query_positions = torch.arange(offset, offset + query_length, device=device)  # (Tq,)
    key_positions = torch.arange(key_length, device=device)  # (Tk,)
    signed_distance = (key_positions[None, :] - query_positions[:, None]).float()  # (Tq, Tk): j - i, <= 0 in the past
    return alibi_slopes(num_heads, device=device)[:, None, None] * signed_distance  # (H, Tq, Tk)
