"""Tests of scaling.py: counts == the model and torch's FlopCounterMode and published parameter counts; memory
estimates == measured tensor bytes; the fits recover known laws from noisy synthetic data (tolerance from the
bootstrap); the compute-optimal closed form == a brute-force search; bad arguments raise ValueError."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lab import lab_model_config, short_schedule
from scaling import (LawFit, activation_bytes, bootstrap_fits, compute_optimal, fit_chinchilla, fit_power_law,
                     forward_flops_per_token, interval, measure_saved_activation_bytes, measured_state_bytes,
                     parameter_count, six_n_d, training_flops, training_state_bytes)
from training import make_optimizer
from transformer import MiniFormer, TransformerConfig

VARIANTS = {
    "gpt2-like": dict(),
    "llama-like": dict(ffn="swiglu", norm="rmsnorm", bias=False, tie_weights=False, position="rope", num_kv_heads=2),
    "post-norm, no-norm sizes": dict(norm_placement="post", position="sinusoidal", ffn_hidden_size=48),
    "alibi, untied, norm none": dict(position="alibi", tie_weights=False, norm="none"),
}


def small_config(**overrides) -> TransformerConfig:
    return lab_model_config(37, embed_dim=32, num_layers=2, num_heads=4, context_length=16, **overrides)


def loss_of(model, x):
    return F.cross_entropy(model(x).flatten(0, 1), x.flatten())


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_parameter_count_equals_the_model(overrides):
    config = small_config(**overrides)
    model = MiniFormer(config)
    assert parameter_count(config) == model.num_parameters()
    assert parameter_count(config, exclude_embeddings=True) == model.num_parameters(exclude_embeddings=True)


def test_parameter_count_of_published_models():
    """GPT-2 small has 124,439,808 parameters (Hugging Face's gpt2) and Llama-2-7B 6,738,415,616 (its model card's
    7B, exact from its config); the same models built on the meta device count the same."""
    gpt2 = TransformerConfig(vocab_size=50257, context_length=1024, num_layers=12, num_heads=12, embed_dim=768)
    llama = TransformerConfig(vocab_size=32000, context_length=4096, num_layers=32, num_heads=32, embed_dim=4096,
                              ffn="swiglu", ffn_hidden_size=11008, norm="rmsnorm", position="rope", bias=False,
                              tie_weights=False)
    assert parameter_count(gpt2) == 124_439_808
    assert parameter_count(llama) == 6_738_415_616
    with torch.device("meta"):
        assert MiniFormer(gpt2).num_parameters() == 124_439_808


@pytest.mark.parametrize("overrides", list(VARIANTS.values())[:2], ids=list(VARIANTS)[:2])
def test_training_flops_equal_flop_counter(overrides):
    """Forward + backward: 03's from-scratch attention makes the T x T products visible to FlopCounterMode;
    with CPU SDPA they are not, and the count without attention matches instead."""
    x = torch.randint(0, 37, (3, 16))
    for attention, include in (("scratch", True), ("sdpa", False)):
        config = small_config(attention=attention, **overrides)
        model = MiniFormer(config)
        with FlopCounterMode(display=False) as counter:
            loss_of(model, x).backward()
        if attention == "sdpa" and torch.cuda.is_available():
            continue  # on a GPU FlopCounterMode does see SDPA
        assert counter.get_total_flops() == training_flops(config, x.numel(), include_attention=include)


def test_six_n_d_is_the_large_model_limit():
    """6ND ignores attention and the head: exact / 6ND -> 1 as the width grows at fixed context and vocabulary."""
    ratios = []
    for width in (32, 128, 512):
        config = lab_model_config(37, embed_dim=width, num_layers=2, num_heads=4, context_length=16)
        N = parameter_count(config, exclude_embeddings=True)
        ratios.append(training_flops(config, 1000) / six_n_d(N, 1000))
    assert ratios[0] > ratios[1] > ratios[2] > 1.0 and ratios[2] < 1.05
    assert forward_flops_per_token(config) * 3 == training_flops(config, 1)


def test_training_state_estimate_equals_measured_bytes():
    config = small_config(ffn="swiglu", tie_weights=False)
    model = MiniFormer(config)
    optimizer = make_optimizer(model, short_schedule(1))
    loss_of(model, torch.randint(0, 37, (2, 16))).backward()
    optimizer.step()
    estimate = training_state_bytes(model.num_parameters(), len(list(model.parameters())))
    assert measured_state_bytes(model, optimizer) == estimate
    assert estimate["optimizer"] == 2 * estimate["weights"] + 4 * len(list(model.parameters()))


def test_measured_activations_of_a_hand_case():
    """Linear -> GELU: the linear keeps its input (B x 8), GELU its input (B x 16): (8 + 16) B floats."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU())
    x = torch.randn(5, 8)
    assert measure_saved_activation_bytes(model, lambda m: m(x).sum()) == (8 + 16) * 5 * 4


@pytest.mark.parametrize("shape", [(2, 16, 32, 1), (3, 8, 64, 3)])
def test_activation_formula_equals_saved_tensors(shape):
    batch, context, width, layers = shape
    config = lab_model_config(37, embed_dim=width, num_layers=layers, num_heads=4, context_length=context)
    x = torch.randint(0, 37, (batch, context))
    assert measure_saved_activation_bytes(MiniFormer(config), lambda m: loss_of(m, x)) == activation_bytes(config, batch)


TRUE = dict(E=1.5, A=50.0, alpha=0.4, B=80.0, beta=0.3)


def synthetic(noise=0.005, seed=0):
    rng = np.random.default_rng(seed)
    N = np.repeat(np.logspace(3, 6, 7), 4)
    D = np.tile(np.logspace(4, 7, 4), 7)
    loss = LawFit(**TRUE).predict(N, D) * np.exp(rng.normal(0, noise, N.size))
    return N, D, loss


def test_chinchilla_fit_recovers_the_law_within_its_bootstrap_error():
    N, D, loss = synthetic()
    fit, boot = bootstrap_fits(N, loss, D=D, resamples=30, seed=1)
    for name, true in TRUE.items():
        spread = np.std([getattr(f, name) for f in boot])
        assert abs(getattr(fit, name) - true) <= 4 * spread + 1e-9, (name, getattr(fit, name), true, spread)
    low, high = interval(boot, "alpha", 0.95)
    assert low < high


def test_power_law_fit_recovers_exact_data_and_rejects_a_wrong_floor():
    N = np.logspace(3, 7, 9)
    loss = 2.0 + 30.0 / N ** 0.3
    fit = fit_power_law(N, loss)
    assert fit.E == pytest.approx(2.0, rel=1e-3) and fit.alpha == pytest.approx(0.3, rel=1e-2)
    assert fit.B is None and np.allclose(fit.predict(N), loss, rtol=1e-4)


def test_fit_of_noise_free_chinchilla_data_is_exact():
    N, D, loss = synthetic(noise=0.0)
    fit = fit_chinchilla(N, D, loss)
    for name, true in TRUE.items():
        assert getattr(fit, name) == pytest.approx(true, rel=2e-2), name


def test_compute_optimal_equals_brute_force_search():
    law = LawFit(**TRUE)
    for C in (1e15, 1e19):
        N_grid = np.logspace(2, 12, 200_001)
        losses = law.predict(N_grid, C / (6 * N_grid))
        best = N_grid[np.argmin(losses)]
        optimum = compute_optimal(law, C)
        assert optimum["N_opt"] == pytest.approx(best, rel=1e-3)
        assert optimum["tokens_per_parameter"] == pytest.approx(C / 6 / best ** 2, rel=3e-3)
        assert optimum["loss"] == pytest.approx(losses.min(), rel=1e-9)


@pytest.mark.parametrize("call, name", [
    (lambda: parameter_count("not a config"), "config"),
    (lambda: training_flops(small_config(), 0), "tokens"),
    (lambda: six_n_d(0, 10), "num_parameters"),
    (lambda: training_state_bytes(10, 1, dtype=torch.int8), "dtype"),
    (lambda: training_state_bytes(10, 1, optimizer="lion"), "optimizer"),
    (lambda: fit_power_law([1, 2, 3], [1, 1, 1]), "N"),
    (lambda: fit_power_law([1, 2, 3, 4], [1, 1, float("nan"), 1]), "loss"),
    (lambda: fit_chinchilla([1, 2, 3, 4], [1, 2, 3, 4, 5], [1, 1, 1, 1]), "same length"),
    (lambda: bootstrap_fits([1, 2, 3, 4], [2, 1.5, 1.2, 1.1], resamples=0), "resamples"),
    (lambda: compute_optimal(LawFit(E=1, A=1, alpha=0.3), 1e10), "fit"),
    (lambda: compute_optimal(LawFit(**TRUE), -1.0), "compute"),
    (lambda: interval([LawFit(**TRUE)], "alpha", 1.5), "level"),
    (lambda: activation_bytes(replace(small_config(), ffn="swiglu"), 2), "activation_bytes"),
])
def test_bad_arguments_raise_value_error_naming_them(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()
