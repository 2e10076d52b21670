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
import lab_paths  # noqa: E402,F401  (puts every NN_topic folder on sys.path)

import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import transformer
from demo_cli import demo_parser, print_table, start_demo
from layers import (FFN_FACTORIES, NORM_FACTORIES, GeluMLP, LayerNorm, RMSNorm, SwiGLU, gelu, glu,
                    silu)
from plotting import line, panels
from runtime import Timer, seed_everything
from training import TrainConfig, train
from lab import char_shakespeare_batches, lab_model_config
from transformer import MiniFormer, register_ffn, register_norm

SIZES = {
    "quick": dict(batch_size=12, train_steps=30, seeds=2, eval_interval=15, eval_batches=4, sweep_steps=20,
                  sweep_eval_batches=4, sweep_lrs=(1e-3, 1.0), timing_repeats=3, timing_calls=3),
    "full": dict(batch_size=12, train_steps=400, seeds=2, eval_interval=50, eval_batches=20, sweep_steps=100,
                 sweep_eval_batches=10, sweep_lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
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
    return seconds


# --- 3. Training at equal parameters ----------------------------------------------------------------------


def train_one(run, batch_fn, generator, vocab_size: int, overrides: dict, config: TrainConfig, seed: int):
    """Train a fresh lab model; the same seed gives the same batch order to every model. -> (model, history)"""
    seed_everything(seed)
    generator.manual_seed(seed)
    model = MiniFormer(lab_model_config(vocab_size, **overrides)).to(run.device)
    history = train(model, batch_fn, config, device=run.device)
    return model, history


def train_combinations(run, batch_fn, generator, vocab_size: int, sizes: dict) -> dict:
    """The four norm x FFN combinations at equal parameters, same data order and schedule, several seeds."""
    steps = sizes["train_steps"]
    seeds = [run.seed + i for i in range(sizes["seeds"])]
    config = TrainConfig(steps=steps, learning_rate=LEARNING_RATE, warmup_steps=max(1, steps // 10),
                         eval_interval=sizes["eval_interval"], eval_batches=sizes["eval_batches"], progress=False)
    results, histories = {}, {}
    for label, overrides in COMBINATIONS.items():
        histories[label] = []
        for seed in seeds:
            model, history = train_one(run, batch_fn, generator, vocab_size, overrides, config, seed)
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
    fig, axes = panels(1, 3, width=5.2, height=3.7,
                       title=f"Equal parameters: the four combinations end within "
                             f"{results[worst]['final_val_loss'] - results[best]['final_val_loss']:.3f} nats "
                             f"(best {best}); a change of seed alone moves one by up to {seed_spread:.3f}")
    window = max(1, steps // 20)
    for index, (label, runs) in enumerate(histories.items()):
        mean_curve = results[label]["val_loss_mean"]
        axes[0].plot(runs[0].eval_steps[:len(mean_curve)], mean_curve, marker="o", markersize=3, label=label)
        finals = results[label]["final_val_loss_per_seed"]
        axes[1].scatter([index] * len(finals), finals, s=25, label=label)
        axes[1].hlines(np.mean(finals), index - 0.3, index + 0.3, color="black", linewidth=1)
        smoothed_norm = moving_average(per_step([h.grad_norm for h in runs]).mean(axis=0), window)
        axes[2].plot(np.arange(len(smoothed_norm)) + window, smoothed_norm, label=label)
    axes[0].set(xlabel="step", ylabel="validation loss (nats/char)",
                title=f"Validation loss, mean of {len(seeds)} seeds")
    axes[1].set_xticks(range(len(histories)), [label.replace(" + ", "\n+ ") for label in histories])
    axes[1].set(ylabel="final validation loss (nats/char)", title=f"After {steps} steps: one dot per seed, bar = mean")
    axes[2].set(xlabel="step", ylabel=f"grad norm ({window}-step mean)", yscale="log",
                title=f"Before clipping: SwiGLU peaks at {spike['SwiGLU']:.0f}, GELU at {spike['GELU']:.0f}")
    axes[0].legend()
    axes[2].legend()
    run.save(fig, "training_equal_parameters")
    return results


# --- 4. Learning-rate sweep -------------------------------------------------------------------------------


def unigram_loss(batch_fn, generator, seed: int, vocab_size: int, batches: int = 200) -> float:
    """Cross-entropy on validation batches of the best context-free predictor (character frequencies of
    training batches): a model above this line has learned nothing about context."""
    generator.manual_seed(seed)
    counts = torch.ones(vocab_size)  # add-one smoothing: no character gets probability 0
    for _ in range(batches):
        counts += torch.bincount(batch_fn("train")[1].flatten().cpu(), minlength=vocab_size)
    log_probs = (counts / counts.sum()).log()
    val_targets = torch.cat([batch_fn("val")[1].flatten().cpu() for _ in range(batches)])
    return -log_probs[val_targets].mean().item()


def learning_rate_sweep(run, batch_fn, generator, vocab_size: int, sizes: dict, grad_clip: float | None,
                        unigram: float) -> dict:
    """Short runs at growing learning rates. Each run ends 'learned' (validation loss at least
    LEARNED_MARGIN below the unigram baseline), 'stalled' (stuck near the unigram level) or 'diverged'
    (the loss blew up: training.train's divergence check)."""
    steps = sizes["sweep_steps"]
    results = {}
    for label, overrides in {**COMBINATIONS, **FRAGILE_REFERENCES}.items():
        rows = []
        for lr in sizes["sweep_lrs"]:
            config = TrainConfig(steps=steps, learning_rate=lr, warmup_steps=max(1, steps // 10), grad_clip=grad_clip,
                                 eval_interval=steps, eval_batches=sizes["sweep_eval_batches"], progress=False)
            _, history = train_one(run, batch_fn, generator, vocab_size, overrides, config, run.seed)
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
        return results[label][key] if results[label][key] is not None else math.inf

    first_to_stall = min(results, key=lambda k: edge(k, "highest_learning_rate_that_learned"))
    first_to_diverge = min(results, key=lambda k: edge(k, "first_diverging_learning_rate"))
    fig, axes = panels(1, 1, width=7.5, height=4.6,
                       title=f"{first_to_stall} stops learning first (above lr "
                             f"{edge(first_to_stall, 'highest_learning_rate_that_learned'):g}); "
                             f"{first_to_diverge} diverges first (lr {edge(first_to_diverge, 'first_diverging_learning_rate'):g})")
    ax = axes[0]
    top = math.log(vocab_size)
    for index, (label, summary) in enumerate(results.items()):
        lrs = [r["learning_rate"] for r in summary["runs"]]
        values = [r["final_val_loss"] for r in summary["runs"]]
        style = {"linestyle": "--"} if label in FRAGILE_REFERENCES else {}
        (handle,) = ax.plot(lrs, values, marker="o", markersize=4, label=label, **style)
        diverged = [r["learning_rate"] for r in summary["runs"] if r["status"] == "diverged"]
        if diverged:  # drawn above the uniform-guess line, nudged apart so markers do not hide each other
            ax.scatter(diverged, [top + 0.04 * index] * len(diverged), marker="X", s=60, color=handle.get_color())
    ax.axhline(unigram, color="grey", linestyle=":", label=f"unigram baseline (measured): {unigram:.2f}")
    ax.axhline(unigram - LEARNED_MARGIN, color="grey", linestyle="-", linewidth=0.6,
               label=f"'learned' = below {unigram - LEARNED_MARGIN:.2f}")
    ax.axhline(top, color="black", linestyle=":", linewidth=0.8, label=f"uniform guess ln V = {top:.2f}; X = diverged")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (AdamW, warmup then cosine)")
    ax.set_ylabel(f"validation loss after {steps} steps (nats/char)")
    clip_text = f"grad clip {grad_clip}" if grad_clip else "no grad clipping"
    ax.set_title(f"{steps} steps per run, {clip_text}; near the grey lines = learned nothing about context")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    run.save(fig, "learning_rate_sweep")
    return results


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
    generator = torch.Generator().manual_seed(args.seed)
    batch_fn, vocab, corpus = char_shakespeare_batches(64, sizes["batch_size"], run.device, generator=generator)
    print(f"\n[3/4] training the lab model on {corpus} ({vocab.size} characters), four combinations")
    training = train_combinations(run, batch_fn, generator, vocab.size, sizes)
    unigram = unigram_loss(batch_fn, generator, args.seed, vocab.size)
    print(f"\n[4/4] learning-rate sweep (unigram baseline {unigram:.3f} nats)")
    sweep = learning_rate_sweep(run, batch_fn, generator, vocab.size, sizes, grad_clip, unigram)

    differences = equivalence["max_abs_difference"]
    print_table([{"layer": name, "max |output diff|": d["output"], "max |input grad diff|": d["input_grad"]}
                 for name, d in differences.items()], "From scratch vs torch built-in (float32)")
    print_table([{"layer": name, "scratch us": s["scratch"] * 1e6, "built-in us": s["builtin"] * 1e6,
                  "scratch / built-in": s["ratio"]} for name, s in speed.items()], "Forward + backward per call")
    print_table([{"combination": label, "params": r["parameters"], "ffn hidden": r["ffn_hidden_size"],
                  "val loss": r["final_val_loss"],
                  "per seed": " ".join(f"{v:.3f}" for v in r["final_val_loss_per_seed"]), "tokens/s": r["tokens_per_second"],
                  "grad norm step 0": r["grad_norm_first_step"], "grad norm max": r["grad_norm_max"],
                  "grad norm max at step": r["grad_norm_max_step"], "grad norm median 2nd half": r["grad_norm_median_second_half"]}
                 for label, r in training.items()], f"Training, {sizes['train_steps']} steps at lr {LEARNING_RATE:g}, mean of {sizes['seeds']} seeds")
    print_table([{"model": label, **{f"lr {r['learning_rate']:g}": f"{r['final_val_loss']:.3f}" if r["status"] == "learned"
                                     else r["status"] for r in s["runs"]}} for label, s in sweep.items()],
                f"Learning-rate sweep: validation loss after {sizes['sweep_steps']} steps")

    gelu_label = "LayerNorm + GELU"
    best = min(training, key=lambda k: training[k]["final_val_loss"])
    swiglu_gain = [training[f"{n} + GELU"]["final_val_loss"] - training[f"{n} + SwiGLU"]["final_val_loss"]
                   for n in ("LayerNorm", "RMSNorm")]
    rms_gain = [training[f"LayerNorm + {f}"]["final_val_loss"] - training[f"RMSNorm + {f}"]["final_val_loss"]
                for f in ("GELU", "SwiGLU")]
    seed_spread = max(max(r["final_val_loss_per_seed"]) - min(r["final_val_loss_per_seed"]) for r in training.values())
    insights = [
        f"Every from-scratch layer equals torch's built-in to within "
        f"{max(max(d.values()) for d in differences.values()):.1e} (float32, outputs and input gradients); "
        f"GELU's tanh formula differs from the exact erf GELU by at most {equivalence['gelu_tanh_max_error']:.1e} "
        f"(at x = {equivalence['gelu_tanh_worst_x']:.2f}).",
        f"Speed: our LayerNorm takes {speed['LayerNorm']['ratio']:.1f}x the time of nn.LayerNorm and our RMSNorm "
        f"{speed['RMSNorm']['ratio']:.1f}x nn.RMSNorm; built-in RMSNorm vs built-in LayerNorm: "
        f"{speed['RMSNorm']['builtin'] / speed['LayerNorm']['builtin']:.2f}x, from scratch: "
        f"{speed['RMSNorm']['scratch'] / speed['LayerNorm']['scratch']:.2f}x. A whole FFN barely notices the "
        f"activation: GELU MLP {speed['GELU MLP (4x)']['ratio']:.2f}x, SwiGLU {speed['SwiGLU (2/3 rule)']['ratio']:.2f}x.",
        f"Equal parameters: SwiGLU with hidden {training['LayerNorm + SwiGLU']['ffn_hidden_size']} (2/3 rule) gives "
        f"{training['LayerNorm + SwiGLU']['parameters']:,} parameters vs {training[gelu_label]['parameters']:,} "
        f"for the 4x GELU MLP.",
        f"After {sizes['train_steps']} steps (mean of {sizes['seeds']} seeds) the best combination is {best} "
        f"(val {training[best]['final_val_loss']:.3f}); the same combination differs by up to {seed_spread:.3f} "
        f"between seeds. SwiGLU minus GELU per seed: " + ", ".join(
            f"{n} " + "/".join(f"{s - g:+.3f}" for s, g in zip(training[f"{n} + SwiGLU"]["final_val_loss_per_seed"],
                                                                 training[f"{n} + GELU"]["final_val_loss_per_seed"]))
            for n in ("LayerNorm", "RMSNorm")) + "; on average: "
        f"{-swiglu_gain[0]:+.3f} with LayerNorm, {-swiglu_gain[1]:+.3f} with RMSNorm; RMSNorm minus LayerNorm: "
        f"{-rms_gain[0]:+.3f} with GELU, {-rms_gain[1]:+.3f} with SwiGLU (nats, negative = better).",
        f"Training speed with our layers (tokens/s): "
        + ", ".join(f"{k} {v['tokens_per_second']:.0f}" for k, v in training.items()) + ".",
        f"Gradient norms (before clipping at 1.0): largest "
        + ", ".join(f"{k} {v['grad_norm_max']:.1f} (step {v['grad_norm_max_step']})" for k, v in training.items())
        + "; median over the second half "
        + ", ".join(f"{k} {v['grad_norm_median_second_half']:.2f}" for k, v in training.items()) + ".",
        f"Learning-rate sweep ({sizes['sweep_steps']} steps): highest learning rate that still learns: "
        + ", ".join(f"{k} {_format_lr(v['highest_learning_rate_that_learned'])}" for k, v in sweep.items())
        + "; first learning rate that diverges: "
        + ", ".join(f"{k} {_format_lr(v['first_diverging_learning_rate'])}" for k, v in sweep.items()) + ".",
    ]
    print("\nKey insights")
    for sentence in insights:
        print(f"  - {sentence}")
    run.finish({"sizes": sizes, "learning_rate": LEARNING_RATE, "sweep_grad_clip": grad_clip, "corpus": corpus,
                "unigram_val_loss": unigram, "equivalence": equivalence, "layer_seconds": speed,
                "training": training, "learning_rate_sweep": sweep, "insights": insights})


if __name__ == "__main__":
    main()
