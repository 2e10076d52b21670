"""10 — Norms and activations: from-scratch LayerNorm / RMSNorm / GELU / SwiGLU inside the lab model.

Four experiments, each drawing one figure:
  1. equivalence: every from-scratch layer against torch's built-in at the lab size (largest difference
     of outputs and input gradients, in units of float32 epsilon) and the activation curves with the
     error of GELU's tanh approximation;
  2. layer speed: forward+backward time of one norm, one activation and one FFN, from scratch vs built-in;
  3. training at equal parameters: {LayerNorm, RMSNorm} x {GELU MLP, SwiGLU with the 2/3 rule} plugged
     into 04's MiniFormer through register_norm / register_ffn: loss curves and gradient norms;
  4. learning-rate sweep: where each combination stops learning or diverges, beside the fragile
     references (no norm at all, and post-norm).
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import transformer
from demo_cli import demo_parser, print_table, report_findings, start_demo
from layers import (FFN_FACTORIES, NORM_FACTORIES, GeluMLP, LayerNorm, RMSNorm, SwiGLU, gelu, glu,
                    silu)
from plotting import line, panels
import matplotlib.pyplot as plt  # after plotting, which picks the backend
from runtime import Timer
from lab import char_shakespeare_data, lab_model_config, short_schedule, train_lab_variant, unigram_loss
from transformer import register_ffn, register_norm

SIZES = {
    "quick": dict(batch_size=8, model=dict(num_layers=2, embed_dim=64), train_steps=30, seeds=2, eval_interval=15,
                  eval_batches=4, sweep_steps=20, sweep_eval_batches=4, sweep_lrs=(1e-3, 1.0), timing_repeats=3,
                  timing_calls=3),
    "full": dict(batch_size=12, model=dict(), train_steps=300, seeds=2, eval_interval=50, eval_batches=20,
                 sweep_steps=100, sweep_eval_batches=10, sweep_lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0),
                 timing_repeats=15, timing_calls=10),
}
LEARNING_RATE = 1e-3  # the lab model's reference learning rate (nanoGPT's CPU setting)
COMBINATIONS = {  # label -> MiniFormer config overrides, all with our from-scratch layers
    "LayerNorm + GELU": dict(norm="scratch_layernorm", ffn="scratch_gelu"),
    "LayerNorm + SwiGLU": dict(norm="scratch_layernorm", ffn="scratch_swiglu"),
    "RMSNorm + GELU": dict(norm="scratch_rmsnorm", ffn="scratch_gelu"),
    "RMSNorm + SwiGLU": dict(norm="scratch_rmsnorm", ffn="scratch_swiglu"),
}
FRAGILE_REFERENCES = {
    "no norm + GELU": dict(norm="none", ffn="scratch_gelu"),
    "post-LayerNorm + GELU": dict(norm="scratch_layernorm", ffn="scratch_gelu", norm_placement="post"),
}
FLOAT32_EPS = torch.finfo(torch.float32).eps
LEARNED_MARGIN = 0.1  # nats below the unigram baseline that count as "learned something about context"
# Thresholds of the verdicts, each written beside the claim it decides.
EQUAL_WITHIN_EPS = 16  # "equal to the built-in": no output or input gradient differs by more float32 eps
GELU_TANH_TOLERANCE = 1e-3  # "close approximation": largest |exact - tanh| GELU
EQUAL_PARAMETERS_FRACTION = 0.01  # "the same parameters": FFN weights within 1%
FASTER_RATIO = 0.9  # "faster": at most 0.9x the time
SAME_LOSS_NATS = 0.02  # "trains as well": final validation losses within 0.02 nats


def register_scratch_layers() -> None:
    """Plug layers.py's LayerNorm, RMSNorm, GeluMLP and SwiGLU into 04's MiniFormer by name."""
    for name, factory in NORM_FACTORIES.items():
        register_norm(name, factory)
    for name, factory in FFN_FACTORIES.items():
        register_ffn(name, factory)


def per_step(series: list) -> np.ndarray:
    """Stack per-step lists of several runs, cut to the shortest (a diverged run stops early). -> (runs, steps)"""
    length = min(len(values) for values in series)
    return np.array([values[:length] for values in series], dtype=float)


def moving_average(values, window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


# --- 1. Equivalence with torch's built-ins ------------------------------------------------------------


def compare_with_builtins(run, batch_size: int) -> dict:
    """Largest |ours - built-in| of outputs and input gradients at the lab size (B, 64, 128), float32."""
    E, T, device = 128, 64, run.device
    generator = torch.Generator().manual_seed(run.seed)
    stream = (3.0 * torch.randn(batch_size, T, E, generator=generator) + 1.0).to(device)  # (B, T, E), off-centre
    hidden = torch.randn(batch_size, T, 4 * E, generator=generator).to(device)  # (B, T, 4E) FFN pre-activations
    layer_norm, rms_norm, swiglu = LayerNorm(E).to(device), RMSNorm(E).to(device), SwiGLU(E).to(device)
    with torch.no_grad():  # random gains and shifts so that they take part in the comparison
        for p in [*layer_norm.parameters(), *rms_norm.parameters()]:
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=generator).to(device))
    builtin_layer_norm = nn.LayerNorm(E).to(device)
    builtin_layer_norm.load_state_dict(layer_norm.state_dict())
    builtin_rms_norm = nn.RMSNorm(E, eps=1e-5).to(device)
    builtin_rms_norm.load_state_dict(rms_norm.state_dict())

    def swiglu_with_builtin_silu(x):  # the closed form, with F.silu in place of ours
        return swiglu.down(F.silu(swiglu.gate(x)) * swiglu.up(x))

    pairs = {
        "LayerNorm": (layer_norm, builtin_layer_norm, stream),
        "RMSNorm": (rms_norm, builtin_rms_norm, stream),
        "GELU exact": (gelu, F.gelu, hidden),
        "GELU tanh": (partial(gelu, approximate="tanh"), partial(F.gelu, approximate="tanh"), hidden),
        "SiLU": (silu, F.silu, hidden),
        "GLU": (glu, F.glu, hidden),
        "SwiGLU FFN": (swiglu, swiglu_with_builtin_silu, stream),
    }
    differences = {}
    for name, (ours, reference, inputs) in pairs.items():
        results = []
        for layer in (ours, reference):
            x = inputs.clone().requires_grad_(True)
            y = layer(x)
            upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
            (grad,) = torch.autograd.grad(y, x, upstream)
            results.append((y.detach(), grad))
        (y, grad), (y_ref, grad_ref) = results
        differences[name] = {"output": (y - y_ref).abs().max().item(), "input_grad": (grad - grad_ref).abs().max().item()}

    # Break it: what small mistakes would change (the tests catch each one).
    centred = stream - stream.mean(-1, keepdim=True)
    with_unbiased_variance = centred / (stream.var(-1, keepdim=True, unbiased=True) + 1e-5).sqrt()
    plain = LayerNorm(E).to(device)
    constant_rows = torch.full((4, E), 3.0, device=device)
    plain.eps = 0.0
    nan_fraction_without_eps = plain(constant_rows).isnan().float().mean().item()
    plain.eps = 1e-5
    parameters = {name: sum(p.numel() for p in layer.parameters()) for name, layer in
                  {"gelu_mlp_4x": GeluMLP(E, bias=False), "swiglu_two_thirds": SwiGLU(E),
                   "swiglu_4x": SwiGLU(E, hidden_size=4 * E)}.items()}
    break_it = {"unbiased_variance_relative_change": ((plain(stream) - with_unbiased_variance).abs()
                                                      / plain(stream).abs()).median().item(),
                "nan_fraction_constant_row_eps_0": nan_fraction_without_eps,
                "nan_fraction_constant_row_eps_1e-5": plain(constant_rows).isnan().float().mean().item(),
                "ffn_parameters_without_bias": parameters}

    grid = torch.linspace(-6.0, 6.0, 24001, dtype=torch.float64)
    tanh_error = (gelu(grid) - gelu(grid, approximate="tanh")).abs()
    worst = int(tanh_error.argmax())
    silu_curve = silu(grid)
    result = {"max_abs_difference": differences, "break_it": break_it,
              "gelu_tanh_max_error": tanh_error.max().item(), "gelu_tanh_worst_x": grid[worst].item(),
              "silu_minimum": silu_curve.min().item(), "silu_argmin": grid[int(silu_curve.argmin())].item()}

    fig, axes = panels(1, 3, width=4.6, height=3.6,
                       title=f"Every from-scratch layer matches torch within "
                             f"{max(max(d.values()) for d in differences.values()) / FLOAT32_EPS:.0f} float32 eps; "
                             f"tanh-GELU is off by at most {result['gelu_tanh_max_error']:.1e}")
    x_plot = grid[(grid >= -5) & (grid <= 3)]
    line(axes[0], x_plot, {"ReLU (for comparison)": torch.relu(x_plot), "GELU exact": gelu(x_plot),
                           "GELU tanh": gelu(x_plot, "tanh"), "SiLU = x sigmoid(x)": silu(x_plot)},
         xlabel="x", ylabel="activation(x)", title="Smooth gates dip below 0, ReLU does not", markers=False,
         styles={"ReLU (for comparison)": {"linestyle": ":", "color": "grey"}, "GELU tanh": {"linestyle": "--"}})
    line(axes[1], grid, {"|GELU exact - GELU tanh| (computed, float64)": tanh_error.clamp_min(1e-12)},
         xlabel="x", ylabel="absolute difference", logy=True, markers=False,
         title=f"tanh approximation: worst {result['gelu_tanh_max_error']:.1e} at x={result['gelu_tanh_worst_x']:.2f}")
    names = list(differences)
    positions = np.arange(len(names))
    for offset, key, label in ((-0.2, "output", "output"), (0.2, "input_grad", "input gradient")):
        values = [differences[n][key] / FLOAT32_EPS for n in names]
        axes[2].bar(positions + offset, values, width=0.4, label=label)
    axes[2].set_xticks(positions, names, rotation=35, ha="right")
    axes[2].set_ylabel("max |ours - torch| in float32 eps (1.19e-7)")
    axes[2].set_title(f"Ours vs torch built-ins, input ({batch_size}, 64, 128/512)")
    axes[2].legend()
    run.save(fig, "equivalence_and_activations")

    largest = max(max(d.values()) for d in differences.values())
    weights = parameters["swiglu_two_thirds"], parameters["gelu_mlp_4x"]
    result["insights"] = [
        f"Every from-scratch layer equals torch's built-in to within {largest:.1e} = {largest / FLOAT32_EPS:.1f} "
        f"float32 eps (outputs and input gradients, input ({batch_size}, 64, 128)); GELU's tanh formula differs "
        f"from the exact erf GELU by at most {result['gelu_tanh_max_error']:.1e} (at x = "
        f"{result['gelu_tanh_worst_x']:.2f}); SiLU's minimum is {result['silu_minimum']:.3f} at x = "
        f"{result['silu_argmin']:.2f}.",
        f"The 2/3 rule: SwiGLU with h = {SwiGLU(E).down.in_features} has {weights[0]:,} FFN weights vs {weights[1]:,} "
        f"for the 4x GELU MLP; without the rule (h = 4E) {parameters['swiglu_4x']:,}.",
    ]
    result["verdicts"] = {
        "layers_equal_builtins": {
            "claim": "LayerNorm, RMSNorm, GELU (both), SiLU, GLU, SwiGLU equal torch's built-ins",
            "threshold": f"largest difference of outputs and input gradients <= {EQUAL_WITHIN_EPS} float32 eps",
            "measured": f"{largest / FLOAT32_EPS:.1f} eps ({largest:.1e})",
            "verdict": "holds" if largest <= EQUAL_WITHIN_EPS * FLOAT32_EPS else "fails"},
        "gelu_tanh_close": {
            "claim": "the tanh GELU is a close approximation of the exact GELU",
            "threshold": f"max |exact - tanh| over [-6, 6] <= {GELU_TANH_TOLERANCE:g}",
            "measured": f"{result['gelu_tanh_max_error']:.1e}",
            "verdict": "holds" if result["gelu_tanh_max_error"] <= GELU_TANH_TOLERANCE else "fails"},
        "swiglu_two_thirds_parameters": {
            "claim": "SwiGLU with the 2/3 rule has the parameters of a 4x GELU MLP",
            "threshold": f"FFN weights within {EQUAL_PARAMETERS_FRACTION:.0%} of the GELU MLP's",
            "measured": f"{weights[0]:,} vs {weights[1]:,} ({weights[0] / weights[1] - 1:+.2%})",
            "verdict": "holds" if abs(weights[0] / weights[1] - 1) <= EQUAL_PARAMETERS_FRACTION else "fails"},
    }
    return result


# --- 2. Speed of one layer -------------------------------------------------------------------------------


def time_layers(run, batch_size: int, repeats: int, calls: int) -> dict:
    """Forward+backward seconds per call of each from-scratch layer and its built-in twin at the lab size."""
    E, T, device = 128, 64, run.device
    config = lab_model_config(vocab_size=65)  # 04's GELU MLP and SwiGLU use torch's F.gelu / F.silu
    swiglu_config = lab_model_config(vocab_size=65, ffn="swiglu")
    stream = torch.randn(batch_size, T, E, device=device)  # (B, T, E)
    hidden = torch.randn(batch_size, T, 4 * E, device=device)  # (B, T, 4E)
    pairs = {
        "LayerNorm": (LayerNorm(E), nn.LayerNorm(E), stream),
        "RMSNorm": (RMSNorm(E), nn.RMSNorm(E, eps=1e-5), stream),
        "GELU exact": (gelu, F.gelu, hidden),
        "GELU tanh": (partial(gelu, approximate="tanh"), partial(F.gelu, approximate="tanh"), hidden),
        "SiLU": (silu, F.silu, hidden),
        "GELU MLP (4x)": (GeluMLP(E), transformer.TorchGeluMLP(config), stream),
        "SwiGLU (2/3 rule)": (SwiGLU(E, bias=True), transformer.TorchSwiGLU(swiglu_config), stream),
    }

    def forward_backward(layer, inputs):
        if isinstance(layer, nn.Module):
            layer.to(device)
        x = inputs.clone().requires_grad_(True)
        upstream = torch.ones_like(layer(x))

        def step():
            for _ in range(calls):
                layer(x).backward(upstream)  # gradients accumulate identically for both versions
        return step

    seconds = {}
    for name, (ours, builtin, inputs) in pairs.items():
        steps = {"scratch": forward_backward(ours, inputs), "builtin": forward_backward(builtin, inputs)}
        samples = {key: [] for key in steps}
        for step in steps.values():  # warm-up: first calls allocate and pick kernels
            step()
        for _ in range(repeats):  # interleaved, so both versions see the same machine load
            for key, step in steps.items():
                with Timer(device) as timer:
                    step()
                samples[key].append(timer.seconds / calls)
        # The minimum: other processes on the machine can only add time, never remove it.
        seconds[name] = {key: min(values) for key, values in samples.items()}
        seconds[name]["ratio"] = seconds[name]["scratch"] / seconds[name]["builtin"]

    fig, axes = panels(1, 1, width=8.0, height=4.2)
    names = list(seconds)
    positions = np.arange(len(names))
    ax = axes[0]
    ax.barh(positions - 0.2, [seconds[n]["scratch"] * 1e6 for n in names], height=0.4, label="from scratch (layers.py)")
    ax.barh(positions + 0.2, [seconds[n]["builtin"] * 1e6 for n in names], height=0.4, label="torch built-in")
    for p, n in zip(positions, names):
        ax.annotate(f"{seconds[n]['ratio']:.2f}x", (seconds[n]["scratch"] * 1e6, p - 0.2), xytext=(3, -3),
                    textcoords="offset points", fontsize=7)
    ax.set_yticks(positions, names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("forward + backward time per call (microseconds, log scale)")
    ax.set_title(f"From-scratch LayerNorm costs {seconds['LayerNorm']['ratio']:.1f}x the built-in kernel; in a full FFN "
                 f"the difference is {seconds['GELU MLP (4x)']['ratio']:.2f}x\n(input ({batch_size}, 64, 128), "
                 f"activations at ({batch_size}, 64, 512); label = scratch / built-in)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    run.save(fig, "layer_speed")

    rms_over_layer_norm = {kind: seconds["RMSNorm"][kind] / seconds["LayerNorm"][kind] for kind in ("scratch", "builtin")}
    faster = {kind: ratio <= FASTER_RATIO for kind, ratio in rms_over_layer_norm.items()}
    insights = [
        f"Speed (forward + backward per call): our LayerNorm takes {seconds['LayerNorm']['ratio']:.1f}x the time of "
        f"nn.LayerNorm and our RMSNorm {seconds['RMSNorm']['ratio']:.2f}x nn.RMSNorm; exact GELU "
        f"{seconds['GELU exact']['ratio']:.1f}x, tanh GELU {seconds['GELU tanh']['ratio']:.1f}x, SiLU "
        f"{seconds['SiLU']['ratio']:.1f}x the built-ins; a whole FFN barely notices: GELU MLP "
        f"{seconds['GELU MLP (4x)']['ratio']:.2f}x, SwiGLU {seconds['SwiGLU (2/3 rule)']['ratio']:.2f}x.",
        f"RMSNorm / LayerNorm time: {rms_over_layer_norm['scratch']:.2f}x from scratch, "
        f"{rms_over_layer_norm['builtin']:.2f}x for torch's built-ins.",
    ]
    verdicts = {"rmsnorm_faster": {
        "claim": "RMSNorm is faster than LayerNorm",
        "threshold": f"RMSNorm takes <= {FASTER_RATIO}x LayerNorm's time (forward + backward); 'depends' when it "
                     f"holds for one implementation only",
        "measured": f"from scratch {rms_over_layer_norm['scratch']:.2f}x, torch built-ins "
                    f"{rms_over_layer_norm['builtin']:.2f}x",
        "verdict": "holds" if all(faster.values()) else "depends" if any(faster.values()) else "fails"}}
    return {"seconds": seconds, "rmsnorm_over_layernorm": rms_over_layer_norm, "insights": insights,
            "verdicts": verdicts}


# --- 3. Training at equal parameters ----------------------------------------------------------------------


def train_combinations(run, data, sizes: dict) -> dict:
    """The four norm x FFN combinations at equal parameters, same data order and schedule, several seeds."""
    steps = sizes["train_steps"]
    seeds = [run.seed + i for i in range(sizes["seeds"])]
    schedule = short_schedule(steps, learning_rate=LEARNING_RATE, eval_interval=sizes["eval_interval"],
                              eval_batches=sizes["eval_batches"])
    results, histories = {}, {}
    for label, overrides in COMBINATIONS.items():
        histories[label] = []
        for seed in seeds:
            model, history = train_lab_variant(data, schedule, seed, run.device, **sizes["model"], **overrides)
            histories[label].append(history)
            print(f"  trained {label}, seed {seed}: val loss {history.final_val_loss:.3f}, "
                  f"{history.tokens_per_second:.0f} tokens/s")
        runs = histories[label]
        final = [h.final_val_loss for h in runs]
        results[label] = {
            "parameters": model.num_parameters(), "ffn_hidden_size": model.blocks[0].ffn.down.in_features,
            "seeds": seeds, "final_val_loss_per_seed": final, "final_val_loss": float(np.mean(final)),
            "final_train_loss": float(np.mean([h.eval_train_loss[-1] for h in runs])),
            "tokens_per_second": float(np.mean([h.tokens_per_second for h in runs])),
            "grad_norm_first_step": float(np.mean([h.grad_norm[0] for h in runs])),
            "grad_norm_max": max(max(h.grad_norm) for h in runs),
            "grad_norm_max_step": int(np.argmax(np.max(per_step([h.grad_norm for h in runs]), axis=0))),
            "grad_norm_median_second_half": float(np.median([g for h in runs for g in h.grad_norm[steps // 2:]])),
            "val_loss_mean": per_step([h.val_loss for h in runs]).mean(axis=0).tolist(),
            "diverged": any(h.diverged for h in runs)}

    best = min(results, key=lambda k: results[k]["final_val_loss"])
    worst = max(results, key=lambda k: results[k]["final_val_loss"])
    seed_spread = max(max(r["final_val_loss_per_seed"]) - min(r["final_val_loss_per_seed"]) for r in results.values())
    spike = {ffn: max(r["grad_norm_max"] for label, r in results.items() if label.endswith(ffn))
             for ffn in ("GELU", "SwiGLU")}
    fig, axes = panels(1, 3, width=5.2, height=4.2, constrained=True,
                       title=f"After {steps} steps the four combinations end within "
                             f"{results[worst]['final_val_loss'] - results[best]['final_val_loss']:.3f} nats "
                             f"(best {best}); a change of seed alone moves one by up to {seed_spread:.3f}")
    window = max(1, steps // 20)
    for index, (label, runs) in enumerate(histories.items()):
        color = f"C{index}"
        mean_curve = results[label]["val_loss_mean"]
        axes[0].plot(runs[0].eval_steps[:len(mean_curve)], mean_curve, marker="o", markersize=3, label=label, color=color)
        finals = results[label]["final_val_loss_per_seed"]
        axes[1].scatter([index] * len(finals), finals, s=25, label=label, color=color)
        axes[1].hlines(np.mean(finals), index - 0.3, index + 0.3, color="black", linewidth=1)
        norms = per_step([h.grad_norm for h in runs])  # (seeds, steps)
        raw = norms.max(axis=0)  # the largest seed at each step: a one-step spike stays visible
        axes[2].plot(np.arange(len(raw)), raw, color=color, linewidth=0.6, alpha=0.45)
        smoothed = moving_average(norms.mean(axis=0), window)
        axes[2].plot(np.arange(len(smoothed)) + window - 1, smoothed, color=color, linewidth=1.6, label=label)
    axes[2].plot([], [], color="grey", linewidth=0.6, alpha=0.6, label="thin: raw, largest seed per step")
    axes[2].plot([], [], color="grey", linewidth=1.6, label=f"thick: {window}-step mean of the seeds")
    axes[0].set(xlabel="step", ylabel="validation loss (nats/char)",
                title=f"Validation loss, mean of {len(seeds)} seeds")
    axes[1].set_xticks(range(len(histories)), [label.replace(" + ", "\n+ ") for label in histories])
    axes[1].set(ylabel="final validation loss (nats/char)", title=f"After {steps} steps: one dot per seed, bar = mean")
    axes[2].set(xlabel="step", ylabel="gradient norm before clipping (log scale)", yscale="log",
                title=f"Largest gradient norm: SwiGLU {spike['SwiGLU']:.1f}, GELU {spike['GELU']:.1f}")
    axes[0].legend()
    axes[2].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    run.save(fig, "training_equal_parameters")

    # Paired by seed: every combination saw the same batches from the same initial seed.
    swiglu_minus_gelu = {norm: [s - g for s, g in zip(results[f"{norm} + SwiGLU"]["final_val_loss_per_seed"],
                                                      results[f"{norm} + GELU"]["final_val_loss_per_seed"])]
                         for norm in ("LayerNorm", "RMSNorm")}
    rms_minus_layer = {ffn: results[f"RMSNorm + {ffn}"]["final_val_loss"] - results[f"LayerNorm + {ffn}"]["final_val_loss"]
                       for ffn in ("GELU", "SwiGLU")}
    paired = [d for values in swiglu_minus_gelu.values() for d in values]
    mean_swiglu_gain = -float(np.mean(paired))
    gelu_label, swiglu_label = "LayerNorm + GELU", "LayerNorm + SwiGLU"
    insights = [
        f"Equal parameters: SwiGLU with hidden {results[swiglu_label]['ffn_hidden_size']} (2/3 rule) gives a lab model "
        f"of {results[swiglu_label]['parameters']:,} parameters vs {results[gelu_label]['parameters']:,} with the 4x "
        f"GELU MLP.",
        f"After {steps} steps (mean of {len(seeds)} seeds): " + ", ".join(
            f"{k} {v['final_val_loss']:.3f}" for k, v in sorted(results.items(), key=lambda kv: kv[1]["final_val_loss"]))
        + f"; one combination moves by up to {seed_spread:.3f} between seeds. SwiGLU minus GELU per seed: "
        + ", ".join(f"{n} " + " / ".join(f"{d:+.3f}" for d in values) for n, values in swiglu_minus_gelu.items())
        + "; RMSNorm minus LayerNorm: " + ", ".join(f"{f} {d:+.3f}" for f, d in rms_minus_layer.items())
        + " (nats, negative = better).",
        "Gradient norms before clipping at 1.0: largest " + ", ".join(
            f"{k} {v['grad_norm_max']:.1f} (step {v['grad_norm_max_step']})" for k, v in results.items())
        + "; median over the second half " + ", ".join(
            f"{k} {v['grad_norm_median_second_half']:.2f}" for k, v in results.items()) + ".",
        "Training speed with our layers (tokens/s, shared cores): " + ", ".join(
            f"{k} {v['tokens_per_second']:.0f}" for k, v in results.items()) + ".",
    ]
    all_better = all(d < 0 for d in paired)
    verdicts = {
        "rmsnorm_trains_as_well": {
            "claim": "RMSNorm trains as well as LayerNorm",
            "threshold": f"final validation losses within {SAME_LOSS_NATS} nats, with GELU and with SwiGLU",
            "measured": "RMSNorm minus LayerNorm " + ", ".join(f"{f} {d:+.3f}" for f, d in rms_minus_layer.items()),
            "verdict": "holds" if all(abs(d) <= SAME_LOSS_NATS for d in rms_minus_layer.values()) else "fails"},
        "swiglu_beats_gelu": {
            "claim": "SwiGLU beats a GELU MLP at equal parameters",
            "threshold": "holds: mean gain larger than the largest seed-to-seed spread; depends: better in every "
                         "seed-paired run but by less than that spread; fails otherwise",
            "measured": f"mean gain {mean_swiglu_gain:+.3f} nats, better in {sum(d < 0 for d in paired)} of "
                        f"{len(paired)} paired runs, seed spread {seed_spread:.3f}",
            "verdict": "holds" if all_better and mean_swiglu_gain > seed_spread else "depends" if all_better else "fails"},
    }
    return {"combinations": results, "seed_spread": seed_spread, "swiglu_minus_gelu_per_seed": swiglu_minus_gelu,
            "rmsnorm_minus_layernorm": rms_minus_layer, "insights": insights, "verdicts": verdicts}


# --- 4. Learning-rate sweep -------------------------------------------------------------------------------


def learning_rate_sweep(run, data, sizes: dict, grad_clip: float | None, unigram: float) -> dict:
    """Short runs at growing learning rates. Each run ends 'learned' (validation loss at least
    LEARNED_MARGIN below the unigram baseline), 'stalled' (stuck near the unigram level) or 'diverged'
    (the loss blew up: training.train's divergence check)."""
    steps = sizes["sweep_steps"]
    results = {}
    for label, overrides in {**COMBINATIONS, **FRAGILE_REFERENCES}.items():
        rows = []
        for lr in sizes["sweep_lrs"]:
            schedule = short_schedule(steps, learning_rate=lr, grad_clip=grad_clip, eval_interval=steps,
                                      eval_batches=sizes["sweep_eval_batches"])
            _, history = train_lab_variant(data, schedule, run.seed, run.device, **sizes["model"], **overrides)
            val = float("nan") if history.diverged else history.final_val_loss
            status = "diverged" if history.diverged else ("learned" if val < unigram - LEARNED_MARGIN else "stalled")
            rows.append({"learning_rate": lr, "final_val_loss": val, "status": status,
                         "max_grad_norm": max(history.grad_norm), "steps_run": len(history.train_loss)})
        learned = [r for r in rows if r["status"] == "learned"]
        diverged = [r for r in rows if r["status"] == "diverged"]
        results[label] = {
            "runs": rows,
            "best_learning_rate": min(learned, key=lambda r: r["final_val_loss"])["learning_rate"] if learned else None,
            "best_val_loss": min(r["final_val_loss"] for r in learned) if learned else float("nan"),
            "highest_learning_rate_that_learned": max(r["learning_rate"] for r in learned) if learned else None,
            "first_diverging_learning_rate": diverged[0]["learning_rate"] if diverged else None,
        }
        print(f"  swept {label}: " + ", ".join(f"{r['learning_rate']:g}->{r['status']}" for r in rows))

    def edge(label, key):
        """The model's learning-rate edge; a model that never learned stalls at 0, one that never diverged at inf."""
        if results[label][key] is not None:
            return results[label][key]
        return 0.0 if key == "highest_learning_rate_that_learned" else math.inf

    def first(key):
        """(the lowest learning rate of `key` over all models, the models that share it)"""
        lowest = min(edge(k, key) for k in results)
        return lowest, [k for k in results if edge(k, key) == lowest]

    def sentence(key, what, where):
        lowest, models = first(key)
        who = f"all {len(results)}" if len(models) == len(results) else " and ".join(models)
        if lowest == 0:
            return f"{who} learn at no lr of the grid"
        if not math.isfinite(lowest):
            return f"none {what} in the range"
        return f"{who} {what} first ({where} lr {lowest:g})"

    stall_text = sentence("highest_learning_rate_that_learned", "stop learning", "above")
    diverge_text = sentence("first_diverging_learning_rate", "diverge", "at")
    # Diverged runs have no loss: they are marked in a strip above the loss axis, one row per model.
    fig, (strip, ax) = plt.subplots(2, 1, figsize=(9.5, 5.6), sharex=True,
                                    gridspec_kw={"height_ratios": [1.2, 4], "hspace": 0.08})
    fig.suptitle(f"{stall_text}; {diverge_text}", fontsize=12, fontweight="bold")
    labels = list(results)
    for index, (label, summary) in enumerate(results.items()):
        kept = [r for r in summary["runs"] if r["status"] != "diverged"]
        style = {"linestyle": "--"} if label in FRAGILE_REFERENCES else {}
        (handle,) = ax.plot([r["learning_rate"] for r in kept], [r["final_val_loss"] for r in kept], marker="o",
                            markersize=4, label=label, **style)
        diverged = [r["learning_rate"] for r in summary["runs"] if r["status"] == "diverged"]
        strip.scatter(diverged, [index] * len(diverged), marker="X", s=50, color=handle.get_color())
    strip.set_yticks(range(len(labels)), labels, fontsize=6)
    strip.set_ylim(len(labels) - 0.5, -0.5)
    strip.set_title(f"{steps} steps per run, {f'grad clip {grad_clip}' if grad_clip else 'no grad clipping'}; "
                    f"X = diverged (no loss to plot)", fontsize=9)
    strip.grid(axis="y", alpha=0.3)
    ax.axhline(unigram, color="grey", linestyle=":", label=f"unigram baseline (measured): {unigram:.2f}")
    ax.axhline(unigram - LEARNED_MARGIN, color="grey", linestyle="-", linewidth=0.6,
               label=f"'learned' = below {unigram - LEARNED_MARGIN:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (AdamW, warmup then cosine)")
    ax.set_ylabel(f"validation loss after {steps} steps\n(nats/char)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    run.save(fig, "learning_rate_sweep")

    earliest, first_models = first("first_diverging_learning_rate")
    insights = [
        f"Learning-rate sweep ({steps} steps): highest learning rate that still learns: "
        + ", ".join(f"{k} {_format_lr(v['highest_learning_rate_that_learned'])}" for k, v in results.items())
        + "; first learning rate that diverges: "
        + ", ".join(f"{k} {_format_lr(v['first_diverging_learning_rate'])}" for k, v in results.items()) + "."]
    verdicts = {"one_combination_diverges_first": {
        "claim": "in a learning-rate sweep one combination diverges first",
        "threshold": "exactly one model has the lowest diverging learning rate of the grid; 'depends' when that "
                     "model is one of the fragile references (no norm, post-norm) and not a pre-norm combination",
        "measured": ", ".join(f"{k} {_format_lr(results[k]['first_diverging_learning_rate'])}" for k in results),
        "verdict": ("fails" if len(first_models) != 1 or not math.isfinite(earliest)
                    else "holds" if first_models[0] in COMBINATIONS else "depends")}}
    return {"models": results, "insights": insights, "verdicts": verdicts}


def _format_lr(learning_rate) -> str:
    return "none in the range" if learning_rate is None else f"{learning_rate:g}"


# --- Main -------------------------------------------------------------------------------------------------


def main():
    parser = demo_parser(__doc__)
    parser.add_argument("--sweep-grad-clip", type=float, default=1.0,
                        help="gradient clipping of the learning-rate sweep (0 = off)")
    args = parser.parse_args()
    if args.sweep_grad_clip < 0:
        raise ValueError(f"--sweep-grad-clip must be >= 0, got {args.sweep_grad_clip}")
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if args.quick else "full"]
    grad_clip = args.sweep_grad_clip or None
    register_scratch_layers()

    print("\n[1/4] from-scratch layers vs torch built-ins")
    equivalence = compare_with_builtins(run, sizes["batch_size"])
    print("\n[2/4] time per layer (forward + backward)")
    speed = time_layers(run, sizes["batch_size"], sizes["timing_repeats"], sizes["timing_calls"])
    data = char_shakespeare_data(64, sizes["batch_size"], run.device, args.seed)
    print(f"\n[3/4] training the lab model on {data.corpus} ({data.vocab.size} characters), four combinations")
    training = train_combinations(run, data, sizes)
    unigram = unigram_loss(data, seed=args.seed)
    print(f"\n[4/4] learning-rate sweep (unigram baseline {unigram:.3f} nats)")
    sweep = learning_rate_sweep(run, data, sizes, grad_clip, unigram)

    differences = equivalence["max_abs_difference"]
    print_table([{"layer": name, "max |output diff|": d["output"], "max |input grad diff|": d["input_grad"]}
                 for name, d in differences.items()], "From scratch vs torch built-in (float32)")
    print_table([{"layer": name, "scratch us": s["scratch"] * 1e6, "built-in us": s["builtin"] * 1e6,
                  "scratch / built-in": s["ratio"]} for name, s in speed["seconds"].items()], "Forward + backward per call")
    print_table([{"combination": label, "params": r["parameters"], "ffn hidden": r["ffn_hidden_size"],
                  "val loss": r["final_val_loss"],
                  "per seed": " ".join(f"{v:.3f}" for v in r["final_val_loss_per_seed"]), "tokens/s": r["tokens_per_second"],
                  "grad norm step 0": r["grad_norm_first_step"], "grad norm max": r["grad_norm_max"],
                  "grad norm max at step": r["grad_norm_max_step"], "grad norm median 2nd half": r["grad_norm_median_second_half"]}
                 for label, r in training["combinations"].items()],
                f"Training, {sizes['train_steps']} steps at lr {LEARNING_RATE:g}, mean of {sizes['seeds']} seeds")
    print_table([{"model": label, **{f"lr {r['learning_rate']:g}": f"{r['final_val_loss']:.3f}" if r["status"] == "learned"
                                     else r["status"] for r in s["runs"]}} for label, s in sweep["models"].items()],
                f"Learning-rate sweep: validation loss after {sizes['sweep_steps']} steps")

    experiments = (equivalence, speed, training, sweep)
    insights, verdicts = report_findings(experiments)
    run.finish({"sizes": sizes, "learning_rate": LEARNING_RATE, "sweep_grad_clip": grad_clip, "corpus": data.corpus,
                "unigram_val_loss": unigram, "equivalence": equivalence, "layer_seconds": speed,
                "training": training, "learning_rate_sweep": sweep, "key_insights": insights, "verdicts": verdicts})


if __name__ == "__main__":
    main()
