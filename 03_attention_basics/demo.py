"""03 — attention: what the heads of a trained model look at, why 1/sqrt(d), and what tiling buys.

Experiments: (1) attention maps per head of the lab model (04's MiniFormer, trained once and cached by
04's lab.py); (2) head diversity, trained vs untrained; (3) removing the 1/sqrt(d) scale: softmax
saturation, entropy and gradients vs head size d for random q, k ~ N(0, I), and the trained model read
without it; (4) the lab model trained without 1/sqrt(d) beside the default, same seed and batches;
(5) time and peak memory of naive vs tiled vs torch SDPA attention as the sequence grows (with the
naive score-matrix formula B*H*T^2*bytes drawn beside the measurement).
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import ctypes
import math
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F

from attention import (attention_entropy, naive_score_memory_bytes, scaled_dot_product_attention,
                       tiled_attention)
from data import load_corpus
from demo_cli import demo_parser, print_table, report_findings, start_demo
from plotting import heatmap, line, panels, scatter
import matplotlib.pyplot as plt  # after plotting, which picks the backend
from runtime import time_function, track_peak_memory
from lab import char_shakespeare_data, short_schedule, train_lab_variant, trained_lab_model
from transformer import MiniFormer

SIZES = {  # quick and full differ only in sizes
    "quick": dict(lab_preset="quick", diversity_windows=16, map_length=32, scale_dims=[4, 16, 64, 256, 1024],
                  ablation_steps=60, ablation_model=dict(num_layers=2, embed_dim=64),
                  bench_lengths=[256, 512, 1024], bench_heads=4, bench_head_dim=64, block_size=128,
                  sweep_length=1024, sweep_blocks=[64, 256, 1024]),
    "full": dict(lab_preset="full", diversity_windows=64, map_length=32,
                 scale_dims=[4, 8, 16, 32, 64, 128, 256, 512, 1024],
                 ablation_steps=800, ablation_model=dict(),
                 bench_lengths=[256, 512, 1024, 2048, 4096, 8192], bench_heads=4, bench_head_dim=64,
                 block_size=512, sweep_length=4096, sweep_blocks=[32, 64, 128, 256, 512, 1024, 2048]),
}
# Thresholds of the verdicts, each written beside the claim it decides.
DIVERSE_FACTOR = 10  # "training makes heads diverse": trained JS divergence >= 10x the untrained one
SATURATED_SHARE = 0.5  # "the softmax saturates": at the largest d, >= 50% of rows put > 99% on one key
HARMED_NATS = 0.05  # "training without the scale is harmed": final val loss >= 0.05 nats worse
FLAT_MEMORY_EXPONENT = 0.5  # "never forms the n x n matrix": tiled peak memory grows slower than T^0.5 ...
QUADRATIC_EXPONENT = 1.5  # ... while the naive one grows faster than T^1.5 (last doubling of T)
SDPA_TOLERANCE = 1e-4  # "equal to torch SDPA": largest float32 difference of the outputs


# ---------------------------------------------------------------------------------------------------
# The lab model, its attention weights, and the 1/sqrt(d) switch
# ---------------------------------------------------------------------------------------------------

def set_attention_scale(model, scale):
    """Set every block's attention scale (None = the model's own 1/sqrt(d); 1.0 removes it). Returns the model."""
    for block in model.blocks:
        block.attn.scale = scale
    return model


@torch.no_grad()
def attention_weights(model, idx, scale=None):
    """(logits, [weights (B, H, T, T) per layer]) of 04's model, read with the attention scale `scale`."""
    set_attention_scale(model, scale)
    try:
        return model(idx, return_attention=True)
    finally:
        set_attention_scale(model, None)


def validation_windows(vocab, corpus_text: str, count: int, length: int, device):
    """`count` consecutive non-overlapping windows of the validation text (the last 10%), as ids (count, length)."""
    val_text = corpus_text[int(len(corpus_text) * 0.9):]
    ids = vocab.encode(val_text[:count * length]).view(count, length)
    return ids.to(device)


# ---------------------------------------------------------------------------------------------------
# Experiment 1: attention maps per head
# ---------------------------------------------------------------------------------------------------

def head_statistics(weights):
    """Per head, averaged over windows and query positions: entropy, distance, where the mass goes.

    weights (W, H, T, T) -> dict of (H,) arrays.
    """
    length = weights.shape[-1]
    positions = torch.arange(length, device=weights.device, dtype=weights.dtype)
    distance = (positions[:, None] - positions[None, :]).clamp_min(0)  # (T, T): how far back key j is
    rows = slice(1, None)  # query 0 can only attend to itself: leave it out of every average
    return {
        "entropy_nats": attention_entropy(weights)[..., rows].mean(dim=(0, 2)),
        "mean_distance": (weights * distance).sum(-1)[..., rows].mean(dim=(0, 2)),
        "self_mass": weights.diagonal(dim1=-2, dim2=-1)[..., rows].mean(dim=(0, 2)),
        "previous_mass": weights.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2)),
        "first_token_mass": weights[..., rows, 0].mean(dim=(0, 2)),
    }


def describe_head(stats: dict, head: int) -> str:
    """A short label of a head's pattern, read from its measured statistics."""
    for key, name in (("previous_mass", "previous token"), ("self_mass", "same token"),
                      ("first_token_mass", "first token")):
        if stats[key][head] > 0.4:
            return f"{name} {stats[key][head]:.2f}"
    return f"entropy {stats['entropy_nats'][head]:.2f}, distance {stats['mean_distance'][head]:.1f}"


def experiment_attention_maps(run, model, vocab, corpus_text, map_length, head_stats):
    """Heatmaps of every head of every layer on one real passage, titled with the head's measured pattern."""
    val_text = corpus_text[int(len(corpus_text) * 0.9):]
    start = val_text.find("\n", 200) + 1  # a passage that starts at a line
    passage = val_text[start:start + map_length]
    idx = vocab.encode(passage)[None].to(run.device)  # (1, T)
    _, weights_per_layer = attention_weights(model, idx)
    config = model.config
    labels = [{"\n": "¶", " ": "·"}.get(ch, ch) for ch in passage]
    fig, axes = panels(config.num_layers, config.num_heads, width=4.6, height=4.2, constrained=True,
                       title=f"Attention weights of all {config.num_layers * config.num_heads} heads of the trained lab "
                             f"model on a validation passage (titles: pattern measured over validation windows)")
    patterns = []
    for layer, weights in enumerate(weights_per_layer):
        for head in range(config.num_heads):
            index = layer * config.num_heads + head
            pattern = describe_head(head_stats, index)
            patterns.append(pattern)
            heatmap(axes[index], weights[0, head].cpu().numpy(), xlabel="key character" if layer == config.num_layers - 1
                    else "", ylabel="query character" if head == 0 else "", title=f"L{layer} H{head}: {pattern}",
                    colorbar_label="weight (clipped at 0.5)", cmap="magma", vmin=0.0, vmax=0.5,
                    xticklabels=labels, yticklabels=labels)
            axes[index].tick_params(labelsize=6)
    run.save(fig, "attention_maps")
    return {"passage": passage, "head_patterns": patterns}


# ---------------------------------------------------------------------------------------------------
# Experiment 2: head diversity
# ---------------------------------------------------------------------------------------------------

def jensen_shannon(p, q):
    """Jensen-Shannon divergence in nats between attention rows (..., T) -> (...); 0 = identical, log 2 = disjoint."""
    middle = (p + q) / 2

    def kl(a, b):
        return (a * (torch.log(a.clamp_min(1e-30)) - torch.log(b.clamp_min(1e-30)))).sum(-1)

    return 0.5 * kl(p, middle) + 0.5 * kl(q, middle)


@torch.no_grad()
def diversity_of(model, windows):
    """Per-head statistics and the pairwise JS divergence between all heads (averaged over query rows)."""
    _, weights_per_layer = attention_weights(model, windows)
    heads = torch.cat(weights_per_layer, dim=1)[:, :, 1:]  # (W, L*H, T-1, T): query 0 is trivially identical
    count = heads.shape[1]
    divergence = torch.zeros(count, count)
    for a, b in combinations(range(count), 2):
        divergence[a, b] = divergence[b, a] = jensen_shannon(heads[:, a], heads[:, b]).mean().item()
    stats = [head_statistics(w) for w in weights_per_layer]
    merged = {key: torch.cat([s[key] for s in stats]).cpu().numpy() for key in stats[0]}
    return merged, divergence.numpy()


def within_layer_mean(divergence, num_layers, num_heads):
    """Mean JS divergence over the pairs of heads of each layer."""
    means = []
    for layer in range(num_layers):
        block = divergence[layer * num_heads:(layer + 1) * num_heads, layer * num_heads:(layer + 1) * num_heads]
        means.append(float(block[np.triu_indices(num_heads, 1)].mean()))
    return means


def experiment_head_diversity(run, model, untrained, windows):
    """Do the heads of a layer look at different things? Trained vs the same model at initialisation."""
    config = model.config
    trained_stats, trained_div = diversity_of(model, windows)
    init_stats, init_div = diversity_of(untrained, windows)
    length = windows.shape[1]
    uniform_entropy = float(np.mean([math.log(i + 1) for i in range(1, length)]))  # causal uniform, rows 1..T-1
    names = [f"L{layer}H{head}" for layer in range(config.num_layers) for head in range(config.num_heads)]
    trained_layer_div = within_layer_mean(trained_div, config.num_layers, config.num_heads)
    init_layer_div = within_layer_mean(init_div, config.num_layers, config.num_heads)

    fig, axes = panels(1, 3, width=5.8, height=4.8, constrained=True,
                       title=f"Mean JS divergence between two heads of a layer: {np.mean(trained_layer_div):.3f} nats "
                             f"trained vs {np.mean(init_layer_div):.4f} at initialisation")
    colors = [plt.get_cmap("tab10")(i) for i in range(config.num_layers)]
    for layer in range(config.num_layers):
        picked = slice(layer * config.num_heads, (layer + 1) * config.num_heads)
        scatter(axes[0], trained_stats["mean_distance"][picked], trained_stats["entropy_nats"][picked],
                xlabel="mean attention distance (characters back)", ylabel="mean row entropy (nats)",
                labels=names[picked], color=colors[layer], label=f"trained, layer {layer}")
    scatter(axes[0], init_stats["mean_distance"], init_stats["entropy_nats"], xlabel="mean attention distance "
            "(characters back)", ylabel="mean row entropy (nats)", marker="x", color="grey",
            label=f"untrained (all {len(names)} heads overlap)")
    axes[0].axhline(uniform_entropy, color="black", linestyle="--", linewidth=1,
                    label=f"formula: uniform causal attention {uniform_entropy:.2f}")
    axes[0].set_title("each trained head: how far and how spread")
    axes[0].legend(loc="lower right")
    heatmap(axes[1], trained_div, xlabel="head", ylabel="head", title="pairwise JS divergence, trained heads",
            colorbar_label="nats (max 0.69)", xticklabels=names, yticklabels=names, cmap="viridis")
    layer_labels = [f"layer {layer}" for layer in range(config.num_layers)]
    positions = np.arange(config.num_layers)
    for offset, values, label, color in ((-0.2, trained_layer_div, "trained", "C0"),
                                         (0.2, init_layer_div, "untrained", "grey")):
        bars = axes[2].bar(positions + offset, values, width=0.4, label=label, color=color)
        axes[2].bar_label(bars, fmt="%.2g", fontsize=7)
    axes[2].set_yscale("log")
    axes[2].set_xticks(positions, layer_labels)
    axes[2].set_ylabel("mean JS divergence between heads (nats)")
    axes[2].set_title("diversity within each layer (log scale)")
    axes[2].legend()
    run.save(fig, "head_diversity")

    trained_js, untrained_js = float(np.mean(trained_layer_div)), float(np.mean(init_layer_div))
    untrained_gap = float(max(abs(e - uniform_entropy) for e in init_stats["entropy_nats"]))
    most_local = int(np.argmax(trained_stats["previous_mass"]))
    near, far = int(np.argmin(trained_stats["mean_distance"])), int(np.argmax(trained_stats["mean_distance"]))
    sharp, flat = int(np.argmin(trained_stats["entropy_nats"])), int(np.argmax(trained_stats["entropy_nats"]))
    insights = [
        f"Mean JS divergence between two heads of a layer: {trained_js:.3f} nats trained (per layer "
        + " / ".join(f"{v:.3f}" for v in trained_layer_div) + f") vs {untrained_js:.2g} at initialisation, where "
        f"every head's mean row entropy is within {untrained_gap:.5f} nats of uniform causal attention "
        f"({uniform_entropy:.3f} nats).",
        f"Trained heads differ in reach and sharpness: mean attention distance from "
        f"{trained_stats['mean_distance'][near]:.1f} characters ({names[near]}) to "
        f"{trained_stats['mean_distance'][far]:.1f} ({names[far]}); entropy from "
        f"{trained_stats['entropy_nats'][sharp]:.2f} nats ({names[sharp]}) to {trained_stats['entropy_nats'][flat]:.2f}"
        f" ({names[flat]}); the largest previous-character share is {trained_stats['previous_mass'][most_local]:.2f} "
        f"({names[most_local]}), the largest first-token share {trained_stats['first_token_mass'].max():.2f}.",
    ]
    verdicts = {"heads_diverse": {
        "claim": "trained heads specialise: heads of a layer attend differently (head diversity)",
        "threshold": f"mean within-layer JS divergence trained >= {DIVERSE_FACTOR}x untrained",
        "measured": f"{trained_js:.3f} vs {untrained_js:.2g} nats ({trained_js / max(untrained_js, 1e-12):.0f}x)",
        "verdict": "holds" if trained_js >= DIVERSE_FACTOR * untrained_js else "fails"}}
    return {
        "uniform_causal_entropy_nats": uniform_entropy,
        "untrained_max_entropy_gap_to_uniform_nats": untrained_gap,
        "trained": {"heads": names, **{k: v.tolist() for k, v in trained_stats.items()},
                    "within_layer_js_nats": trained_layer_div},
        "untrained": {**{k: v.tolist() for k, v in init_stats.items()}, "within_layer_js_nats": init_layer_div},
        "mean_within_layer_js_trained": trained_js,
        "mean_within_layer_js_untrained": untrained_js,
        "insights": insights, "verdicts": verdicts,
    }


# ---------------------------------------------------------------------------------------------------
# Experiment 3: removing the 1/sqrt(d) scale
# ---------------------------------------------------------------------------------------------------

def softmax_statistics(head_dim: int, scale, num_keys: int, num_queries: int, generator, device):
    """Random q, k ~ N(0, I_d): score std, row entropy, max weight, softmax Jacobian norm, gradient to q and k.

    The Jacobian of a softmax row p is diag(p) - p p^T; its Frobenius norm goes to 0 as p becomes one-hot.
    The gradient that reaches q is scale * (that Jacobian applied to the upstream scores) times k, so without
    the scale a larger factor (and keys of norm sqrt(d)) competes with the shrinking Jacobian: both are measured.
    """
    q = torch.randn(num_queries, head_dim, generator=generator).to(device).requires_grad_(True)
    k = torch.randn(num_keys, head_dim, generator=generator).to(device).requires_grad_(True)
    v = torch.randn(num_keys, head_dim, generator=generator).to(device)
    upstream = torch.randn(num_queries, head_dim, generator=generator).to(device)
    output, weights = scaled_dot_product_attention(q, k, v, scale=scale, return_weights=True)
    (output * upstream).sum().backward()
    used_scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = (q @ k.T).detach() * used_scale
    return {
        "score_std": scores.std().item(),
        "entropy_nats": attention_entropy(weights).mean().item(),
        "max_weight": weights.max(dim=-1).values.mean().item(),
        "saturated_rows": (weights.max(dim=-1).values > 0.99).float().mean().item(),
        "grad_rms": torch.cat([q.grad.flatten(), k.grad.flatten()]).pow(2).mean().sqrt().item(),
        "jacobian_norm": softmax_jacobian_norm(weights.detach()).mean().item(),
    }


def softmax_jacobian_norm(weights):
    """||diag(p) - p p^T||_F per row, from the closed form sum p^2 - 2 sum p^3 + (sum p^2)^2: (..., T) -> (...)."""
    square_sum = weights.pow(2).sum(-1)
    return (square_sum - 2 * weights.pow(3).sum(-1) + square_sum.pow(2)).clamp_min(0).sqrt()


def experiment_scale(run, model, windows, head_dims):
    """Entropy, saturation and gradient size vs d with and without 1/sqrt(d); the trained model without it."""
    num_keys = 64
    generator = torch.Generator().manual_seed(run.seed)
    rows = []
    for head_dim in head_dims:
        scaled = softmax_statistics(head_dim, None, num_keys, 256, generator, run.device)
        unscaled = softmax_statistics(head_dim, 1.0, num_keys, 256, generator, run.device)
        rows.append({"d": head_dim, "score_std_scaled": scaled["score_std"], "score_std_unscaled": unscaled["score_std"],
                     "entropy_scaled": scaled["entropy_nats"], "entropy_unscaled": unscaled["entropy_nats"],
                     "max_weight_scaled": scaled["max_weight"], "max_weight_unscaled": unscaled["max_weight"],
                     "saturated_unscaled": unscaled["saturated_rows"],
                     "jacobian_scaled": scaled["jacobian_norm"], "jacobian_unscaled": unscaled["jacobian_norm"],
                     "grad_rms_scaled": scaled["grad_rms"], "grad_rms_unscaled": unscaled["grad_rms"]})
    # The trained model read with scale 1 instead of 1/sqrt(d): sharper maps and a worse loss.
    config = model.config
    logits, weights = attention_weights(model, windows)
    logits_unscaled, weights_unscaled = attention_weights(model, windows, scale=1.0)
    targets = windows[:, 1:]

    def loss_of(values):
        return F.cross_entropy(values[:, :-1].reshape(-1, values.shape[-1]), targets.reshape(-1)).item()

    trained = {
        "head_dim": config.head_dim,
        "entropy_per_layer_scaled": [attention_entropy(w)[..., 1:].mean().item() for w in weights],
        "entropy_per_layer_unscaled": [attention_entropy(w)[..., 1:].mean().item() for w in weights_unscaled],
        "val_loss_scaled": loss_of(logits),
        "val_loss_unscaled": loss_of(logits_unscaled),
    }

    dims = [r["d"] for r in rows]
    fig, axes = panels(1, 5, width=4.3, height=4.2, constrained=True,
                       title=f"Random q, k ~ N(0, I): at d={dims[-1]} without 1/sqrt(d), "
                             f"{100 * rows[-1]['saturated_unscaled']:.0f}% of softmax rows put >99% on one key, yet the "
                             f"gradient reaching q and k is {rows[-1]['grad_rms_unscaled'] / rows[-1]['grad_rms_scaled']:.0f}x "
                             f"larger than with it")
    line(axes[0], dims, {"with 1/sqrt(d)": [r["score_std_scaled"] for r in rows],
                         "without (scale 1)": [r["score_std_unscaled"] for r in rows],
                         "formula: sqrt(d)": [math.sqrt(d) for d in dims]},
         xlabel="head dimension d", ylabel="std of scores q.k*scale", title="score spread", logx=True, logy=True,
         styles={"formula: sqrt(d)": {"linestyle": "--", "marker": "", "color": "black"}})
    line(axes[1], dims, {"with 1/sqrt(d)": [r["entropy_scaled"] for r in rows],
                         "without (scale 1)": [r["entropy_unscaled"] for r in rows],
                         f"formula: uniform log({num_keys})": [math.log(num_keys)] * len(dims)},
         xlabel="head dimension d", ylabel="mean row entropy (nats)", title=f"entropy over {num_keys} random keys",
         logx=True, styles={f"formula: uniform log({num_keys})": {"linestyle": "--", "marker": "", "color": "black"}})
    line(axes[2], dims, {"with 1/sqrt(d)": [r["jacobian_scaled"] for r in rows],
                         "without (scale 1)": [r["jacobian_unscaled"] for r in rows]},
         xlabel="head dimension d", ylabel="softmax Jacobian norm ||diag(p) - pp^T||", logx=True, logy=True,
         title="softmax Jacobian (per row)")
    line(axes[3], dims, {"with 1/sqrt(d)": [r["grad_rms_scaled"] for r in rows],
                         "without (scale 1)": [r["grad_rms_unscaled"] for r in rows]},
         xlabel="head dimension d", ylabel="RMS of dLoss/dq and dLoss/dk", logx=True, logy=True,
         title="gradient reaching q and k")
    layers = np.arange(config.num_layers)
    axes[4].bar(layers - 0.2, trained["entropy_per_layer_scaled"], width=0.4, label="with 1/sqrt(d) (as trained)")
    axes[4].bar(layers + 0.2, trained["entropy_per_layer_unscaled"], width=0.4, label="scale removed", color="C3")
    axes[4].set_xticks(layers, [f"layer {i}" for i in layers])
    axes[4].set_ylabel("mean row entropy (nats)")
    axes[4].set_title(f"trained model, d={config.head_dim}: val loss\n{trained['val_loss_scaled']:.3f} -> "
                      f"{trained['val_loss_unscaled']:.3f} when read without it")
    axes[4].set_ylim(0, 1.35 * max(trained["entropy_per_layer_scaled"] + trained["entropy_per_layer_unscaled"]))
    axes[4].legend(loc="upper right")
    run.save(fig, "scale_saturation")

    last = rows[-1]
    jacobian_smaller = [r["d"] for r in rows if r["jacobian_unscaled"] < r["jacobian_scaled"]]
    gradient_smaller = [r["d"] for r in rows if r["grad_rms_unscaled"] < r["grad_rms_scaled"]]
    insights = [
        f"Random q, k ~ N(0, I_d) against {num_keys} keys: without 1/sqrt(d) the score std is "
        f"{last['score_std_unscaled']:.1f} at d={last['d']} (formula sqrt(d) = {math.sqrt(last['d']):.1f}); "
        f"{100 * last['saturated_unscaled']:.0f}% of softmax rows put >99% on one key (d={rows[0]['d']}: "
        f"{100 * rows[0]['saturated_unscaled']:.1f}%); row entropy {last['entropy_unscaled']:.2f} vs "
        f"{last['entropy_scaled']:.2f} nats with the scale (uniform log {num_keys} = {math.log(num_keys):.2f}).",
        f"The softmax Jacobian norm without the scale is smaller than with it only for d in {jacobian_smaller} "
        f"(d={last['d']}: {last['jacobian_unscaled']:.3f} vs {last['jacobian_scaled']:.3f}; d={rows[0]['d']}: "
        f"{rows[0]['jacobian_unscaled']:.3f} vs {rows[0]['jacobian_scaled']:.3f}); the gradient reaching q and k "
        f"grows without it, from {rows[0]['grad_rms_unscaled']:.2f} at d={rows[0]['d']} to "
        f"{last['grad_rms_unscaled']:.2f} at d={last['d']}, while it stays at "
        f"{min(r['grad_rms_scaled'] for r in rows):.2f}-{max(r['grad_rms_scaled'] for r in rows):.2f} with it: "
        f"saturation shrinks the Jacobian, but the unscaled logits multiply the gradient by more.",
        f"Reading the trained model (d={trained['head_dim']}) without the scale drops the mean attention entropy per "
        f"layer from " + "/".join(f"{e:.2f}" for e in trained["entropy_per_layer_scaled"]) + " to "
        + "/".join(f"{e:.2f}" for e in trained["entropy_per_layer_unscaled"]) + f" nats and raises val loss from "
        f"{trained['val_loss_scaled']:.3f} to {trained['val_loss_unscaled']:.3f}.",
    ]
    saturated = last["saturated_unscaled"] >= SATURATED_SHARE and last["entropy_unscaled"] < last["entropy_scaled"]
    verdicts = {
        "no_scale_saturates_softmax": {
            "claim": "removing 1/sqrt(d) saturates the softmax and lowers its entropy",
            "threshold": f"at the largest d, >= {SATURATED_SHARE:.0%} of rows put > 99% on one key and the entropy "
                         f"is below the scaled one",
            "measured": f"d={last['d']}: {last['saturated_unscaled']:.1%} saturated, entropy "
                        f"{last['entropy_unscaled']:.2f} vs {last['entropy_scaled']:.2f} nats",
            "verdict": "holds" if saturated else "fails"},
        "no_scale_shrinks_gradient": {
            "claim": "without 1/sqrt(d) the gradient through the attention weights vanishes",
            "threshold": "holds: the gradient reaching q and k is smaller without the scale at every d measured; "
                         "depends: at some d; fails: at none",
            "measured": f"smaller without the scale at d in {gradient_smaller or 'none'}; softmax Jacobian smaller "
                        f"at d in {jacobian_smaller or 'none'}",
            "verdict": ("holds" if len(gradient_smaller) == len(rows) else "depends" if gradient_smaller
                        else "fails")},
    }
    return {"random_qk": rows, "num_keys": num_keys, "trained_model": trained, "insights": insights,
            "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------------
# Experiment 4: the lab model trained without 1/sqrt(d), beside the default
# ---------------------------------------------------------------------------------------------------

def experiment_scale_training(run, data, steps: int, model_overrides: dict, windows):
    """Train the lab model twice from the same seed on the same batches: with 1/sqrt(d) (the default) and with
    scale 1 in every block. Does the model without the scale stop learning?"""
    schedule = short_schedule(steps)
    variants = {"with 1/sqrt(d)": None, "without (scale 1)": 1.0}
    histories, results = {}, {}
    for label, scale in variants.items():
        model, history = train_lab_variant(data, schedule, run.seed, run.device,
                                           prepare=lambda m, scale=scale: set_attention_scale(m, scale),
                                           **model_overrides)
        model.eval()
        _, weights = model(windows, return_attention=True)  # read with the scale it was trained with
        histories[label] = history
        results[label] = {"final_val_loss": history.final_val_loss, "val_loss": history.val_loss,
                          "eval_steps": history.eval_steps, "diverged": history.diverged,
                          "grad_norm_median": float(np.median(history.grad_norm)),
                          "grad_norm_max": float(max(history.grad_norm)),
                          "entropy_per_layer": [attention_entropy(w)[..., 1:].mean().item() for w in weights],
                          "train_seconds": history.train_seconds}
        print(f"  {label:18s}: val loss {history.final_val_loss:.3f} after {steps} steps "
              f"({history.train_seconds:.0f} s)")
    head_dim = model.config.head_dim
    scaled, unscaled = results["with 1/sqrt(d)"], results["without (scale 1)"]
    gap = unscaled["final_val_loss"] - scaled["final_val_loss"]

    fig, axes = panels(1, 3, width=5.0, height=4.0, constrained=True,
                       title=f"Trained without 1/sqrt(d) (d={head_dim}, same seed and batches): val loss "
                             f"{unscaled['final_val_loss']:.3f} vs {scaled['final_val_loss']:.3f} with it after {steps} steps")
    line(axes[0], scaled["eval_steps"], {label: r["val_loss"] for label, r in results.items()},
         xlabel="step", ylabel="validation loss (nats/char)", title="validation loss")
    for label, history in histories.items():
        axes[1].plot(np.arange(len(history.grad_norm)), history.grad_norm, linewidth=0.7, label=label)
    axes[1].set(xlabel="step", ylabel="gradient norm before clipping (log scale)", yscale="log",
                title="whole-model gradient norm, every step")
    axes[1].legend()
    layers = np.arange(len(scaled["entropy_per_layer"]))
    axes[2].bar(layers - 0.2, scaled["entropy_per_layer"], width=0.4, label="with 1/sqrt(d)")
    axes[2].bar(layers + 0.2, unscaled["entropy_per_layer"], width=0.4, label="without (scale 1)", color="C1")
    axes[2].set_xticks(layers, [f"layer {i}" for i in layers])
    axes[2].set(ylabel="mean row entropy (nats)", title="attention entropy of each trained model")
    axes[2].set_ylim(0, 1.3 * max(scaled["entropy_per_layer"] + unscaled["entropy_per_layer"]))
    axes[2].legend(loc="upper right")
    run.save(fig, "scale_training")

    insights = [
        f"Trained from the same seed on the same batches for {steps} steps (d={head_dim}), the model without "
        f"1/sqrt(d) reaches val loss {unscaled['final_val_loss']:.3f} vs {scaled['final_val_loss']:.3f} with it "
        f"({gap:+.3f} nats); median gradient norm {unscaled['grad_norm_median']:.2f} vs "
        f"{scaled['grad_norm_median']:.2f}; its attention entropy per layer "
        + "/".join(f"{e:.2f}" for e in unscaled["entropy_per_layer"]) + " vs "
        + "/".join(f"{e:.2f}" for e in scaled["entropy_per_layer"]) + " nats."]
    verdicts = {"no_scale_stops_learning": {
        "claim": "without 1/sqrt(d) the attention weights stop learning (the model trains worse)",
        "threshold": f"the model trained with scale 1 ends >= {HARMED_NATS} nats above the default, or diverges",
        "measured": f"d={head_dim}, {steps} steps: {unscaled['final_val_loss']:.3f} vs {scaled['final_val_loss']:.3f} "
                    f"({gap:+.3f} nats)",
        "verdict": "holds" if unscaled["diverged"] or gap >= HARMED_NATS else "fails"}}
    return {"steps": steps, "head_dim": head_dim, "variants": results, "val_loss_gap_nats": gap,
            "insights": insights, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------------
# Experiment 5: naive vs tiled vs SDPA, time and memory vs sequence length
# ---------------------------------------------------------------------------------------------------

def release_freed_memory():
    """Ask glibc to give freed heap memory back to the OS, so the next RSS-based peak starts clean (CPU)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sdpa_backend_name(q, k, v) -> str:
    """Which kernel torch's SDPA dispatches to for these inputs, read from the profiler's op names."""
    from torch.profiler import profile
    with profile() as profiler:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    names = {event.name for event in profiler.events()}
    kernels = sorted(n for n in names if n.startswith("aten::_scaled_dot_product") or n.startswith("aten::_flash")
                     or n.startswith("aten::_efficient"))
    return ", ".join(kernels) or "math (composite ops)"


def attention_methods(device, block_size):
    """name -> fn(q, k, v); on CUDA also SDPA forced onto the flash backend."""
    methods = {
        "naive (03 scaled_dot_product_attention)": lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True),
        f"tiled (03 tiled_attention, block {block_size})":
            lambda q, k, v: tiled_attention(q, k, v, is_causal=True, block_size=block_size),
        "torch SDPA (default dispatch)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        methods["torch SDPA (flash backend forced)"] = flash
    return methods


def measure(fn, q, k, v, device):
    """(median forward ms over 3 runs, peak extra memory in MiB of one run, how memory was measured)."""
    release_freed_memory()
    with track_peak_memory(device) as memory:
        fn(q, k, v)
    seconds = time_function(lambda: fn(q, k, v), device, repeats=3, warmup=1)
    return 1000 * seconds, memory["peak_bytes"] / 2**20, memory["method"]


def growth_exponent(lengths, values) -> float:
    """p in value ~ T^p, from the last two points (log-log slope); NaN when a value is not positive."""
    if values[-1] <= 0 or values[-2] <= 0:
        return float("nan")
    return math.log(values[-1] / values[-2]) / math.log(lengths[-1] / lengths[-2])


@torch.no_grad()
def experiment_scaling(run, lengths, num_heads, head_dim, block_size, sweep_length, sweep_blocks):
    """Forward time and peak memory of causal attention (B=1) for each method and sequence length,
    and of the tiled attention for each block size at one length."""
    dtype = torch.float16 if run.device.type == "cuda" else torch.float32  # flash kernels need half precision
    element_bytes = torch.tensor([], dtype=dtype).element_size()
    methods = attention_methods(run.device, block_size)
    generator = torch.Generator().manual_seed(run.seed)
    rows = []
    backend = ""
    for length in lengths:
        q, k, v = (torch.randn(1, num_heads, length, head_dim, generator=generator).to(run.device, dtype)
                   for _ in range(3))
        if not backend:
            backend = sdpa_backend_name(q, k, v)
        reference = F.scaled_dot_product_attention(q, k, v, is_causal=True).float()
        for name, fn in methods.items():
            max_error = (fn(q, k, v).float() - reference).abs().max().item()
            milliseconds, peak_mib, memory_method = measure(fn, q, k, v, run.device)
            rows.append({"method": name, "T": length, "ms": milliseconds, "peak_MiB": peak_mib,
                         "formula_scores_MiB": naive_score_memory_bytes(1, num_heads, length,
                                                                        bytes_per_element=element_bytes) / 2**20,
                         "max_abs_diff_vs_sdpa": max_error})
        del q, k, v, reference
    q, k, v = (torch.randn(1, num_heads, sweep_length, head_dim, generator=generator).to(run.device, dtype)
               for _ in range(3))
    sweep = []
    for block in sweep_blocks:
        milliseconds, peak_mib, _ = measure(lambda q, k, v: tiled_attention(q, k, v, is_causal=True, block_size=block),
                                            q, k, v, run.device)
        sweep.append({"block_size": block, "T": sweep_length, "ms": milliseconds, "peak_MiB": peak_mib,
                      "formula_tile_MiB": naive_score_memory_bytes(1, num_heads, block, bytes_per_element=element_bytes)
                      / 2**20})

    exponents = {name: growth_exponent(lengths, [r["peak_MiB"] for r in rows if r["method"] == name])
                 for name in methods}
    naive_name, tiled_name, sdpa_name = list(methods)[:3]
    fig, axes = panels(1, 3, width=5.6, height=4.8, constrained=True,
                       title=f"Over the last doubling of T, peak memory grows as T^{exponents[naive_name]:.1f} (naive), "
                             f"T^{exponents[tiled_name]:.1f} (tiled), T^{exponents[sdpa_name]:.1f} (SDPA)\n"
                             f"causal forward, B=1, H={num_heads}, d={head_dim}, {str(dtype).replace('torch.', '')}")
    time_series = {name: [r["ms"] for r in rows if r["method"] == name] for name in methods}
    line(axes[0], lengths, time_series, xlabel="sequence length T (tokens)", ylabel="forward time (ms, median of 3)",
         title="time", logx=True, logy=True)
    memory_series = {name: [max(r["peak_MiB"], 1e-2) for r in rows if r["method"] == name] for name in methods}
    formula_label = f"formula: naive scores B*H*T^2*{element_bytes} bytes"
    memory_series[formula_label] = [r["formula_scores_MiB"] for r in rows if r["method"] == next(iter(methods))]
    line(axes[1], lengths, memory_series, xlabel="sequence length T (tokens)", ylabel="peak extra memory (MiB)",
         title=f"peak memory ({memory_method})",
         logx=True, logy=True, styles={formula_label: {"linestyle": "--", "marker": "", "color": "black"}})
    for ax in axes[:2]:
        ax.set_xticks(lengths, [str(t) for t in lengths])
        ax.minorticks_off()
    blocks = [r["block_size"] for r in sweep]
    tile_formula = f"formula: one score tile H*b^2*{element_bytes} bytes"
    line(axes[2], blocks, {"time (ms)": [r["ms"] for r in sweep],
                           "peak memory (MiB)": [max(r["peak_MiB"], 1e-2) for r in sweep],
                           tile_formula: [r["formula_tile_MiB"] for r in sweep]},
         xlabel="block size b (tokens)", ylabel="ms  |  MiB", title=f"tiled attention at T={sweep_length}: block size",
         logx=True, logy=True, styles={tile_formula: {"linestyle": "--", "marker": "", "color": "black"}})
    axes[2].set_xticks(blocks, [str(b) for b in blocks])
    axes[2].minorticks_off()
    run.save(fig, "naive_vs_tiled_vs_sdpa")

    longest = lengths[-1]
    at_longest = {r["method"]: r for r in rows if r["T"] == longest}
    naive, tiled, sdpa = at_longest[naive_name], at_longest[tiled_name], at_longest[sdpa_name]
    fastest = min(sweep, key=lambda r: r["ms"])
    slowest = max(sweep, key=lambda r: r["ms"])
    max_error = max(r["max_abs_diff_vs_sdpa"] for r in rows)
    insights = [
        f"At T={longest}: naive {naive['ms']:.0f} ms / {naive['peak_MiB']:.0f} MiB (formula for the score matrix "
        f"alone {naive['formula_scores_MiB']:.0f} MiB), tiled {tiled['ms']:.0f} ms / {tiled['peak_MiB']:.0f} MiB, "
        f"SDPA {sdpa['ms']:.0f} ms / {sdpa['peak_MiB']:.1f} MiB ({backend}); over the last doubling of T peak memory "
        f"grows as T^{exponents[naive_name]:.1f} (naive), T^{exponents[tiled_name]:.1f} (tiled), "
        f"T^{exponents[sdpa_name]:.1f} (SDPA).",
        f"Tiled at T={sweep_length}: block {fastest['block_size']} is fastest ({fastest['ms']:.0f} ms), block "
        f"{slowest['block_size']} slowest ({slowest['ms']:.0f} ms); peak memory goes from {sweep[0]['peak_MiB']:.1f} MiB "
        f"(block {sweep[0]['block_size']}) to {sweep[-1]['peak_MiB']:.0f} MiB (block {sweep[-1]['block_size']}).",
    ]
    flat, quadratic = exponents[tiled_name], exponents[naive_name]
    verdicts = {
        "tiled_never_forms_score_matrix": {
            "claim": "tiled attention with the online softmax never forms the n x n matrix",
            "threshold": f"over the last doubling of T, tiled peak memory grows slower than T^{FLAT_MEMORY_EXPONENT} "
                         f"while naive grows faster than T^{QUADRATIC_EXPONENT}",
            "measured": f"tiled T^{flat:.2f}, naive T^{quadratic:.2f} (T {lengths[-2]} -> {longest})",
            "verdict": "holds" if flat < FLAT_MEMORY_EXPONENT and quadratic > QUADRATIC_EXPONENT else "fails"},
        "equal_to_sdpa": {
            "claim": "naive and tiled attention equal torch's SDPA",
            "threshold": f"largest |difference| of the outputs <= {SDPA_TOLERANCE:g} ({str(dtype).replace('torch.', '')})",
            "measured": f"{max_error:.1e} over T = {lengths[0]} ... {longest}",
            "verdict": "holds" if max_error <= SDPA_TOLERANCE else "fails"},
    }
    return {"rows": rows, "block_sweep": sweep, "memory_growth_exponent": exponents, "sdpa_backend": backend,
            "dtype": str(dtype), "memory_method": memory_method, "num_heads": num_heads, "head_dim": head_dim,
            "block_size": block_size, "insights": insights, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------------

def main():
    parser = demo_parser(__doc__)
    args = parser.parse_args()
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if run.quick else "full"]

    print(f"\n[1/5] the lab model (preset '{sizes['lab_preset']}', trained once and cached by 04's lab.py) ...")
    lab = trained_lab_model(sizes["lab_preset"], run.device, run.seed)
    model, vocab = lab.model, lab.data.vocab
    torch.manual_seed(run.seed)
    untrained = MiniFormer(model.config).to(run.device).eval()  # the same architecture before any training
    corpus_text, _ = load_corpus(lab.data.corpus)
    windows = validation_windows(vocab, corpus_text, sizes["diversity_windows"], model.config.context_length, run.device)
    training = {key: lab.record[key] for key in ("preset", "corpus", "steps", "val_loss", "train_seconds",
                                                 "tokens_per_second", "parameters", "from_cache")}
    print(f"  {lab.data.corpus}: val loss {lab.record['val_loss']:.3f} after {lab.record['steps']} steps")

    print("[2/5] attention maps and head diversity ...")
    diversity = experiment_head_diversity(run, model, untrained, windows)
    trained_stats = {key: np.array(value) for key, value in diversity["trained"].items() if key != "heads"}
    maps = experiment_attention_maps(run, model, vocab, corpus_text, sizes["map_length"], trained_stats)
    print("[3/5] removing the 1/sqrt(d) scale ...")
    scale = experiment_scale(run, model, windows, sizes["scale_dims"])
    print(f"[4/5] training the lab model without 1/sqrt(d), {sizes['ablation_steps']} steps, beside the default ...")
    data = char_shakespeare_data(model.config.context_length, 12, run.device, run.seed)
    scale_training = experiment_scale_training(run, data, sizes["ablation_steps"], sizes["ablation_model"], windows)
    print("[5/5] naive vs tiled vs SDPA as the sequence grows ...")
    scaling = experiment_scaling(run, sizes["bench_lengths"], sizes["bench_heads"], sizes["bench_head_dim"],
                                 sizes["block_size"], sizes["sweep_length"], sizes["sweep_blocks"])

    trained = diversity["trained"]
    print_table([{"head": name, "pattern": p, "entropy_nats": e, "mean_distance": d,
                  "previous_mass": prev, "first_token_mass": first}
                 for name, p, e, d, prev, first in zip(trained["heads"], maps["head_patterns"], trained["entropy_nats"],
                                                       trained["mean_distance"], trained["previous_mass"],
                                                       trained["first_token_mass"])],
                title="Heads of the trained lab model (validation windows)")
    print_table([{k: r[k] for k in ("d", "score_std_unscaled", "entropy_scaled", "entropy_unscaled",
                                    "max_weight_unscaled", "saturated_unscaled", "jacobian_scaled", "jacobian_unscaled",
                                    "grad_rms_scaled", "grad_rms_unscaled")} for r in scale["random_qk"]],
                title=f"Softmax over {scale['num_keys']} random keys, with and without 1/sqrt(d)")
    print_table(scaling["block_sweep"], title="Tiled attention: block size trade-off")
    print_table(scaling["rows"], title=f"Causal attention forward, B=1 H={scaling['num_heads']} d={scaling['head_dim']} "
                                       f"({scaling['dtype']}); SDPA ran: {scaling['sdpa_backend']}")

    experiments = (diversity, scale, scale_training, scaling)
    insights, verdicts = report_findings(experiments, first_insights=[
        f"The lab model ('{training['preset']}' preset) reached val loss {training['val_loss']:.3f} on "
        f"{training['corpus']} after {training['steps']} steps."])
    run.finish({"sizes": sizes, "training": training, "attention_maps": maps, "head_diversity": diversity,
                "scale": scale, "scale_training": scale_training, "scaling": scaling, "key_insights": insights,
                "verdicts": verdicts})


if __name__ == "__main__":
    main()
