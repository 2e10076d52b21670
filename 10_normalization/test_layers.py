"""Tests for layers.py: values and gradients equal to torch's built-ins, closed forms where none exists,
parameter counts of the 2/3 rule, and bad arguments."""

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import (GATE_ACTIVATIONS, GEGLU, GatedFeedForward, GeluMLP, LayerNorm, RMSNorm, SwiGLU, gelu, glu,
                    silu, swiglu_hidden_size)

SHAPES = [(7,), (3, 5, 16), (2, 4, 6, 32)]


def _randomise(module: nn.Module, seed: int) -> None:
    """Give every parameter random values, so a gain or bias left at 1/0 cannot hide a mistake."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _values_and_grads(module_or_fn, x: torch.Tensor, upstream: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = module_or_fn(x)
    y.backward(upstream)
    params = [p.grad for p in module_or_fn.parameters()] if isinstance(module_or_fn, nn.Module) else []
    return y.detach(), x.grad, params


# --- Norms against nn.LayerNorm / nn.RMSNorm --------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_values_and_gradients_equal_torch(shape, bias):
    dim = shape[-1]
    ours, ref = LayerNorm(dim, eps=1e-5, bias=bias).double(), nn.LayerNorm(dim, eps=1e-5, bias=bias).double()
    _randomise(ours, 0)
    _randomise(ref, 0)
    generator = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(shape, generator=generator, dtype=torch.float64) + 2.0  # off-centre on purpose
    upstream = torch.randn(shape, generator=generator, dtype=torch.float64)
    y, gx, gp = _values_and_grads(ours, x, upstream)
    y_ref, gx_ref, gp_ref = _values_and_grads(ref, x, upstream)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    for g, g_ref in zip(gp, gp_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_values_and_gradients_equal_torch(shape):
    dim = shape[-1]
    ours, ref = RMSNorm(dim, eps=1e-5).double(), nn.RMSNorm(dim, eps=1e-5).double()
    _randomise(ours, 0)
    _randomise(ref, 0)
    generator = torch.Generator().manual_seed(2)
    x = 3.0 * torch.randn(shape, generator=generator, dtype=torch.float64) + 2.0
    upstream = torch.randn(shape, generator=generator, dtype=torch.float64)
    y, gx, gp = _values_and_grads(ours, x, upstream)
    y_ref, gx_ref, gp_ref = _values_and_grads(ref, x, upstream)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gp[0], gp_ref[0])


def test_norms_hand_computed_example():
    # x = [1, 2, 3, 6]: mean 3, biased variance (4 + 1 + 0 + 9) / 4 = 3.5, mean square (1 + 4 + 9 + 36) / 4 = 12.5
    x = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    layer_norm, rms_norm = LayerNorm(4, eps=1e-12).double(), RMSNorm(4, eps=1e-12).double()
    torch.testing.assert_close(layer_norm(x), (x - 3.0) / math.sqrt(3.5))
    torch.testing.assert_close(rms_norm(x), x / math.sqrt(12.5))


def test_layernorm_output_has_zero_mean_unit_variance_and_rmsnorm_unit_rms():
    x = 5.0 * torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) + 7.0
    y = LayerNorm(128)(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(64), atol=1e-3, rtol=0)
    z = RMSNorm(128)(x)
    torch.testing.assert_close(z.pow(2).mean(-1).sqrt(), torch.ones(64), atol=1e-4, rtol=0)
    assert z.mean(-1).abs().min() > 0.5  # RMSNorm does not centre: the offset of 7 survives


def test_norms_are_scale_invariant_and_layernorm_shift_invariant():
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layer_norm, rms_norm = LayerNorm(32, eps=1e-12).double(), RMSNorm(32, eps=1e-12).double()
    torch.testing.assert_close(layer_norm(x * 37.0 + 11.0), layer_norm(x))
    torch.testing.assert_close(rms_norm(x * 37.0), rms_norm(x))
    assert not torch.allclose(rms_norm(x + 11.0), rms_norm(x))  # no centring: a shift changes the output


@pytest.mark.parametrize("norm_class", [LayerNorm, RMSNorm])
def test_norms_keep_low_precision_dtype_and_stay_close_to_float32(norm_class):
    x = 4.0 * torch.randn(16, 64, generator=torch.Generator().manual_seed(5)) + 3.0
    norm = norm_class(64)
    y16 = norm_class(64).bfloat16()(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), norm(x), atol=0.05, rtol=0.02)


# --- Activations against F.gelu / F.silu / F.glu -------------------------------------------------


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_values_and_gradients_equal_torch(approximate):
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y, gx, _ = _values_and_grads(lambda t: gelu(t, approximate), x, upstream)
    y_ref, gx_ref, _ = _values_and_grads(lambda t: F.gelu(t, approximate=approximate), x, upstream)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)


def test_gelu_closed_form_points_and_tanh_error_is_small_but_nonzero():
    x = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    phi_of_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # standard normal CDF at 1
    torch.testing.assert_close(gelu(x), torch.tensor([0.0, phi_of_1, -(1 - phi_of_1)], dtype=torch.float64))
    grid = torch.linspace(-6, 6, 12001, dtype=torch.float64)
    error = (gelu(grid) - gelu(grid, "tanh")).abs().max().item()
    assert 1e-4 < error < 1e-3


def test_silu_values_and_gradients_equal_torch_and_its_minimum():
    x = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y, gx, _ = _values_and_grads(silu, x, upstream)
    y_ref, gx_ref, _ = _values_and_grads(F.silu, x, upstream)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    # minimum where d/dx x*sigmoid(x) = 0, i.e. x = -1.2785 (solution of 1 + x(1 - sigmoid(x)) = 0)
    assert abs(x[y.argmin()].item() + 1.2785) < 0.01 and abs(y.min().item() + 0.2785) < 1e-3


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_glu_values_and_gradients_equal_torch(dim):
    x = torch.randn(6, 8, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    upstream = torch.randn(F.glu(x, dim=dim).shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y, gx, _ = _values_and_grads(lambda t: glu(t, dim), x, upstream)
    y_ref, gx_ref, _ = _values_and_grads(lambda t: F.glu(t, dim=dim), x, upstream)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)


# --- Feed-forward networks: closed forms and the 2/3 rule -----------------------------------------


def test_swiglu_equals_hand_written_formula_and_gradients():
    torch.manual_seed(10)
    ffn = SwiGLU(16, 40).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w_gate, w_up, w_down = ffn.gate.weight, ffn.up.weight, ffn.down.weight

    def formula(t):  # (silu(x W_g^T) * (x W_u^T)) W_d^T with silu written out
        a, b = t @ w_gate.T, t @ w_up.T
        return (a / (1 + torch.exp(-a)) * b) @ w_down.T

    torch.testing.assert_close(ffn(x), formula(x))
    grad_ours = torch.autograd.grad(ffn(x).sum(), [x, w_gate, w_up, w_down])
    grad_formula = torch.autograd.grad(formula(x).sum(), [x, w_gate, w_up, w_down])
    for g, g_ref in zip(grad_ours, grad_formula, strict=True):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("activation", sorted(GATE_ACTIVATIONS))
def test_gated_ffn_family_equals_glu_of_concatenated_projections(activation):
    # With act = sigmoid the family member is F.glu applied to [W_up x, W_gate x]; for the others the
    # gate is act(W_gate x) computed with torch's built-in.
    builtin = {"sigmoid": torch.sigmoid, "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "identity": lambda t: t}
    torch.manual_seed(11)
    ffn = GatedFeedForward(8, 12, activation=activation, bias=True).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = ffn.down(builtin[activation](ffn.gate(x)) * ffn.up(x))
    torch.testing.assert_close(ffn(x), expected)
    if activation == "sigmoid":
        concatenated = torch.cat([ffn.up(x), ffn.gate(x)], dim=-1)
        torch.testing.assert_close(ffn(x), ffn.down(F.glu(concatenated, dim=-1)))


def test_gelu_mlp_equals_linear_gelu_linear():
    torch.manual_seed(12)
    for approximate in ("none", "tanh"):
        mlp = GeluMLP(16, approximate=approximate).double()
        reference = nn.Sequential(mlp.up, nn.GELU(approximate=approximate), mlp.down)
        x = torch.randn(4, 16, dtype=torch.float64)
        torch.testing.assert_close(mlp(x), reference(x))


@pytest.mark.parametrize("embed_dim", [48, 128, 384, 768, 4096])
def test_two_thirds_rule_matches_a_4x_gelu_mlp_in_parameters(embed_dim):
    hidden = swiglu_hidden_size(embed_dim)
    assert hidden == math.floor(8 * embed_dim / 3)
    swiglu_params = sum(p.numel() for p in SwiGLU(embed_dim).parameters())
    mlp_params = sum(p.numel() for p in GeluMLP(embed_dim, bias=False).parameters())
    assert swiglu_params == 3 * embed_dim * hidden
    assert mlp_params == 8 * embed_dim**2
    assert 0 <= mlp_params - swiglu_params < 3 * embed_dim  # short by less than one hidden unit


def test_swiglu_hidden_size_rounding_and_llama_7b_value():
    assert swiglu_hidden_size(128) == 341
    assert swiglu_hidden_size(128, multiple_of=64) == 384
    assert swiglu_hidden_size(4096, multiple_of=256) == 11008  # Llama-7B's published intermediate size
    assert SwiGLU(128).gate.out_features == 341


def test_geglu_is_the_gelu_member():
    torch.manual_seed(13)
    ffn = GEGLU(8, 10).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(ffn(x), ffn.down(F.gelu(ffn.gate(x)) * ffn.up(x)))


# --- Bad arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("build, error, name", [
    (lambda: LayerNorm(0), ValueError, "dim"),
    (lambda: LayerNorm(8, eps=0.0), ValueError, "eps"),
    (lambda: LayerNorm(8, eps=float("nan")), ValueError, "eps"),
    (lambda: RMSNorm(-3), ValueError, "dim"),
    (lambda: RMSNorm(8, eps=-1e-5), ValueError, "eps"),
    (lambda: gelu(torch.zeros(3), approximate="erf"), ValueError, "approximate"),
    (lambda: glu(torch.zeros(3, 5)), ValueError, "x must have an even size"),
    (lambda: glu(torch.zeros(3, 4), dim=2), ValueError, "dim"),
    (lambda: GeluMLP(0), ValueError, "embed_dim"),
    (lambda: GeluMLP(8, hidden_size=0), ValueError, "hidden_size"),
    (lambda: GeluMLP(8, approximate="fast"), ValueError, "approximate"),
    (lambda: swiglu_hidden_size(0), ValueError, "embed_dim"),
    (lambda: swiglu_hidden_size(128, multiple_of=0), ValueError, "multiple_of"),
    (lambda: SwiGLU(8, hidden_size=-1), ValueError, "hidden_size"),
    (lambda: GatedFeedForward(8, 16, activation="tanh"), ValueError, "activation"),
    (lambda: LayerNorm(8)(torch.zeros(2, 7)), ValueError, "x must have last dimension dim=8"),
    (lambda: RMSNorm(8)(torch.zeros(2, 7)), ValueError, "x must have last dimension dim=8"),
    (lambda: LayerNorm(8, eps=float("inf")), ValueError, "eps"),
    (lambda: RMSNorm(8, eps=float("nan")), ValueError, "eps"),
    (lambda: RMSNorm(8, eps=float("inf")), ValueError, "eps"),
    (lambda: LayerNorm(4)(torch.tensor([1, 2, 3, 6])), TypeError, "x must be a floating-point tensor"),
    (lambda: RMSNorm(4)(torch.tensor([1, 2, 3, 6])), TypeError, "x must be a floating-point tensor"),
])
def test_bad_arguments_raise_an_error_naming_the_argument(build, error, name):
    with pytest.raises(error, match=name):
        build()


# --- The seam: our layers inside 04's MiniFormer -------------------------------------------------------


@contextmanager
def scratch_layers_registered():
    """Register 10's layers in 04's norm/FFN registries, and restore the registries on exit, so that no
    later test (in any topic) sees names this file added."""
    import transformer
    from layers import FFN_FACTORIES, NORM_FACTORIES

    saved = [(registry, dict(registry)) for registry in (transformer._NORMS, transformer._FFNS)]
    try:
        for name, factory in NORM_FACTORIES.items():
            transformer.register_norm(name, factory)
        for name, factory in FFN_FACTORIES.items():
            transformer.register_ffn(name, factory)
        yield
    finally:
        for registry, contents in saved:
            registry.clear()
            registry.update(contents)


@pytest.fixture
def scratch_layers():
    with scratch_layers_registered():
        yield


def test_registering_the_scratch_layers_is_undone_afterwards():
    from transformer import TransformerConfig

    sizes = dict(vocab_size=5, context_length=4, num_layers=1, num_heads=1, embed_dim=8)
    with scratch_layers_registered():
        TransformerConfig(norm="scratch_rmsnorm", ffn="scratch_swiglu", **sizes)  # accepted while registered
    with pytest.raises(ValueError, match="scratch_rmsnorm"):
        TransformerConfig(norm="scratch_rmsnorm", **sizes)
    with pytest.raises(ValueError, match="scratch_swiglu"):
        TransformerConfig(ffn="scratch_swiglu", **sizes)


@pytest.mark.parametrize("norm, ffn", [("layernorm", "gelu"), ("layernorm", "swiglu"), ("rmsnorm", "gelu"),
                                       ("rmsnorm", "swiglu")])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_scratch_layers_in_miniformer_give_the_builtin_models_logits_and_gradients(scratch_layers, norm, ffn,
                                                                                   placement):
    from transformer import MiniFormer, TransformerConfig

    settings = dict(vocab_size=17, context_length=8, num_layers=2, num_heads=2, embed_dim=24,
                    norm_placement=placement, gelu_approximate="tanh")
    torch.manual_seed(14)
    builtin = MiniFormer(TransformerConfig(norm=norm, ffn=ffn, **settings)).double()
    scratch = MiniFormer(TransformerConfig(norm=f"scratch_{norm}", ffn=f"scratch_{ffn}", **settings)).double()
    scratch.load_state_dict(builtin.state_dict(), strict=True)  # same names and shapes, same parameter count
    assert isinstance(scratch.blocks[0].norm1, LayerNorm if norm == "layernorm" else RMSNorm)
    assert scratch.blocks[0].ffn.down.writes_residual_stream  # gets the depth-scaled init, like 04's own FFNs
    idx = torch.randint(0, 17, (3, 8), generator=torch.Generator().manual_seed(15))
    logits, logits_ref = scratch(idx), builtin(idx)
    torch.testing.assert_close(logits, logits_ref)
    logits.square().mean().backward()
    logits_ref.square().mean().backward()
    for (name, p), p_ref in zip(scratch.named_parameters(), builtin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=lambda m: f"{name}: {m}")
