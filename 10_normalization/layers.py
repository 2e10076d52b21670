"""Normalisation layers and activations of a transformer, written from the equations.

Normalisation rescales each token's feature vector x (length E) before a sub-layer sees it:

    LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * g + b      (Ba et al. 2016; var is the biased one)
    RMSNorm(x)   = x / sqrt(mean(x^2) + eps) * g                     (Zhang & Sennrich 2019: no centring, no bias)

Activations used in the feed-forward network (FFN):

    GELU(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))                      exact
            ~ 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))                 tanh approximation (GPT-2)
    SiLU(x) = Swish_1(x) = x * sigmoid(x)
    GLU(a, b) = a * sigmoid(b)                                                 (Dauphin et al. 2017)

A gated FFN (Shazeer 2020) multiplies an activated projection by a linear one:

    FFN_gated(x) = W_down (act(W_gate x) * (W_up x))        act = sigmoid (GLU), relu (ReGLU),
                                                            gelu (GEGLU), silu (SwiGLU), identity (bilinear)

It has three matrices instead of two, so for the same parameters as a 4x GELU MLP
(2 * E * 4E) its hidden size is 2/3 * 4E: 3 * E * (8E/3) = 8 E^2 (the "2/3 rule" of PaLM and Llama).

Contents, in reading order: LayerNorm, RMSNorm, gelu, silu, glu, GeluMLP (the 4x baseline),
swiglu_hidden_size, GatedFeedForward and its SwiGLU / GEGLU special cases. Gradients come from
autograd; the tests check values and gradients against torch's built-ins.
"""

import math

import torch
import torch.nn as nn


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")


def _check_input(x: torch.Tensor, dim: int) -> None:
    if not x.is_floating_point():  # integer statistics would truncate: [1, 2, 3, 6] -> [0, 0, 0, 1]
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"x must have last dimension dim={dim}, got shape {tuple(x.shape)}")


# --- Normalisation ---------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension; same as nn.LayerNorm(dim, eps)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        _check_positive_int("dim", dim)
        _check_eps(eps)
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))  # gain g starts at 1: the layer starts as a pure normaliser
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., E) -> (..., E)
        _check_input(x, self.dim)
        # Statistics in at least float32: in bf16/fp16 the mean of squares loses most of its digits.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        mean = x32.mean(dim=-1, keepdim=True)  # (..., 1)
        variance = (x32 - mean).pow(2).mean(dim=-1, keepdim=True)  # (..., 1), biased (divide by E)
        normalised = ((x32 - mean) * torch.rsqrt(variance + self.eps)).to(x.dtype)
        out = normalised * self.weight
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension; same as nn.RMSNorm(dim, eps).

    Compared with LayerNorm it skips the mean subtraction and the bias: one reduction instead of
    two, and the output is not centred (re-centring turned out not to matter for training).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        _check_positive_int("dim", dim)
        _check_eps(eps)
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., E) -> (..., E)
        _check_input(x, self.dim)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        mean_square = x32.pow(2).mean(dim=-1, keepdim=True)  # (..., 1)
        normalised = (x32 * torch.rsqrt(mean_square + self.eps)).to(x.dtype)
        return normalised * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


# --- Activations ---------------------------------------------------------------------------------------

GELU_APPROXIMATIONS = ("none", "tanh")


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x * Phi(x), Phi the standard normal CDF; approximate='tanh' is GPT-2's cheaper formula (F.gelu's modes)."""
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if approximate == "tanh":
        # The cubic term makes tanh's S-curve follow erf's: max error about 5e-4 (measured in the demo).
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU = Swish with beta = 1: x * sigmoid(x). Smooth, non-monotonic (minimum -0.278 at x = -1.278)."""
    return x * torch.sigmoid(x)


def glu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Gated linear unit: split x in halves a, b along `dim` and return a * sigmoid(b) (same as F.glu)."""
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for a tensor of shape {tuple(x.shape)}, "
                         f"got {dim}")
    if x.shape[dim] % 2:
        raise ValueError(f"x must have an even size along dim={dim}, got {x.shape[dim]}")
    a, b = x.chunk(2, dim=dim)
    return a * torch.sigmoid(b)


# --- Feed-forward networks ------------------------------------------------------------------------------


class GeluMLP(nn.Module):
    """The GPT-2 feed-forward network: W_down gelu(W_up x), hidden size 4 * embed_dim by default."""

    def __init__(self, embed_dim: int, hidden_size: int | None = None, bias: bool = True,
                 approximate: str = "none"):
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        hidden_size = 4 * embed_dim if hidden_size is None else hidden_size
        _check_positive_int("hidden_size", hidden_size)
        if approximate not in GELU_APPROXIMATIONS:
            raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
        self.approximate = approximate
        self.up = nn.Linear(embed_dim, hidden_size, bias=bias)
        self.down = nn.Linear(hidden_size, embed_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, E) -> (B, T, E)
        return self.down(gelu(self.up(x), self.approximate))  # hidden (B, T, 4E)


def swiglu_hidden_size(embed_dim: int, multiple_of: int = 1) -> int:
    """Hidden size of a gated FFN with the parameters of a 4x MLP: 2/3 * 4 * embed_dim, rounded up to multiple_of.

    Three (E x h) matrices match two (E x 4E) ones when h = 8E/3. Llama rounds h up to a multiple
    of 256 for fast kernels, which costs a few extra parameters; multiple_of=1 keeps the count at or
    just below the 4x MLP's (floor of 8E/3).
    """
    _check_positive_int("embed_dim", embed_dim)
    _check_positive_int("multiple_of", multiple_of)
    hidden = (2 * 4 * embed_dim) // 3
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


GATE_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,  # GLU (Dauphin et al. 2017)
    "relu": torch.relu,  # ReGLU
    "gelu": gelu,  # GEGLU
    "silu": silu,  # SwiGLU (PaLM, Llama)
    "identity": lambda x: x,  # bilinear
}


class GatedFeedForward(nn.Module):
    """The GLU family of FFNs (Shazeer 2020): W_down (act(W_gate x) * (W_up x)), act from GATE_ACTIVATIONS."""

    def __init__(self, embed_dim: int, hidden_size: int | None = None, activation: str = "silu", bias: bool = False):
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        hidden_size = swiglu_hidden_size(embed_dim) if hidden_size is None else hidden_size
        _check_positive_int("hidden_size", hidden_size)
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(GATE_ACTIVATIONS)}, got {activation!r}")
        self.activation_name = activation
        self.activation = GATE_ACTIVATIONS[activation]
        self.gate = nn.Linear(embed_dim, hidden_size, bias=bias)
        self.up = nn.Linear(embed_dim, hidden_size, bias=bias)
        self.down = nn.Linear(hidden_size, embed_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, E) -> (B, T, E)
        return self.down(self.activation(self.gate(x)) * self.up(x))  # hidden (B, T, h)

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}"


class SwiGLU(GatedFeedForward):
    """W_down (silu(W_gate x) * (W_up x)); hidden_size=None applies the 2/3 rule (equal parameters to a 4x MLP)."""

    def __init__(self, embed_dim: int, hidden_size: int | None = None, bias: bool = False):
        super().__init__(embed_dim, hidden_size, activation="silu", bias=bias)


class GEGLU(GatedFeedForward):
    """W_down (gelu(W_gate x) * (W_up x)), the GELU member of the GLU family."""

    def __init__(self, embed_dim: int, hidden_size: int | None = None, bias: bool = False):
        super().__init__(embed_dim, hidden_size, activation="gelu", bias=bias)


# --- Factories for 04's MiniFormer seams (register_norm / register_ffn); only these touch 04 ---------------
# A norm factory is factory(dim, eps); an FFN factory is factory(config) and reads config.embed_dim,
# config.ffn_hidden_size (None = this layer's own default), config.bias and config.gelu_approximate.


def _for_miniformer(ffn: nn.Module) -> nn.Module:
    """Mark the FFN's output layer as a residual-stream writer, so MiniFormer gives it the depth-scaled init."""
    from transformer import mark_residual_projection  # 04, an earlier topic; the layers above never need it

    mark_residual_projection(ffn.down)
    return ffn


NORM_FACTORIES = {
    "scratch_layernorm": lambda dim, eps: LayerNorm(dim, eps),
    "scratch_rmsnorm": lambda dim, eps: RMSNorm(dim, eps),
}

FFN_FACTORIES = {
    "scratch_gelu": lambda config: _for_miniformer(GeluMLP(config.embed_dim, config.ffn_hidden_size, bias=config.bias,
                                                           approximate=getattr(config, "gelu_approximate", "none"))),
    "scratch_swiglu": lambda config: _for_miniformer(SwiGLU(config.embed_dim, config.ffn_hidden_size, bias=config.bias)),
}
