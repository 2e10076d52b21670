"""13 — Scaling laws: a real sweep of small models, the laws fitted to it, and what they say about compute.

Experiments:
  1. counting: for every model of the sweep, parameters and training FLOPs (exact matmul count, checked with
     torch's FlopCounterMode) beside the rule of thumb 6 N D; memory of training state, estimated vs measured.
  2. sweep (Markov): sizes x token budgets of 04's MiniFormer on 16's order-1 Markov text, whose loss floor
     (the entropy of a window) is known exactly; each run has its own cosine schedule and fresh data.
  3. sweep (Shakespeare): the same sizes and budgets on character-level Shakespeare (floor unknown).
  4. fits: L(N) = E + A/N^alpha on the largest budget and L(N, D) = E + A/N^alpha + B/D^beta on all runs,
     with bootstrap intervals, beside the published fits of Kaplan et al. (2020) and Hoffmann et al. (2022).
  5. frontier: loss vs compute for every run, and the compute-optimal N and tokens per parameter of the fit.
  6. sample_efficiency: tokens each size needs to reach one loss (training loss on never-repeated data).
  7. early_stopping: the largest model on all the text vs on a small repeated subset, validated as it trains.
  8. famous_models: parameters, memory and training time of GPT-2 and Llama-2 from the formulas (labelled).
  9. data_parallel: distributed.py's DDP and ZeRO runs on 1 and 2 local processes (gloo): time per step,
     tokens/s, optimizer memory per rank, and the bytes all-reduced per step beside the formula.
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import tempfile
from dataclasses import replace

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ticker import NullFormatter
from torch.utils.flop_counter import FlopCounterMode

from data import CharVocab, load_corpus, random_batch, train_val_split
from distributed import DataParallelSettings, spawn_local
from demo_cli import demo_parser, print_findings, print_table, start_demo
from generate import MarkovChain
from lab import LabData, char_shakespeare_data, lab_model_config, short_schedule, train_lab_variant
from plotting import panels
from runtime import cpu_model_name
from scaling import (LawFit, activation_bytes, bootstrap_fits, compute_optimal, interval,
                     measure_saved_activation_bytes, measured_state_bytes, mixed_precision_training_bytes,
                     parameter_count, six_n_d, training_flops, training_state_bytes)
from training import evaluate, make_optimizer
from transformer import MiniFormer, TransformerConfig

# Quick and full runs differ in these sizes only. Widths of a 2-layer MiniFormer (head size 16, at least 1 head).
SIZES = {
    "quick": dict(widths=(8, 12, 16, 24, 32, 48), steps=(10, 20, 40), batch_size=8, context_length=32,
                  eval_batches=8, resamples=10, early_stop_steps=40, early_stop_subset=2000, parallel_steps=4),
    "full": dict(widths=(8, 12, 16, 24, 32, 48, 64, 96), steps=(50, 100, 200, 400, 800), batch_size=16,
                 context_length=32, eval_batches=40, resamples=100, early_stop_steps=1500, early_stop_subset=20000,
                 parallel_steps=40),
}
NUM_LAYERS = 2
LEARNING_RATE = 2e-3  # one learning rate for every size (no per-size tuning: a caveat of this sweep)
# An order-1 chain over 48 symbols: a 48 x 48 table of peaked rows. (An order-2 chain over 16 symbols, the first
# full run kept in results_order2.json, learned in a sudden drop after a long plateau, which no power law fits.)
MARKOV = dict(alphabet="".join(chr(33 + i) for i in range(48)), order=1, concentration=0.1)

# Published fits, quoted (not measured here). Kaplan: L(N) = (N_c / N)^alpha_N with N non-embedding parameters;
# Chinchilla approach 3: L = E + A/N^alpha + B/D^beta with N all parameters; Besiroglu et al. refit its data.
PUBLISHED = {
    "Kaplan et al. 2020 (arXiv:2001.08361)": dict(alpha=0.076, beta=0.095),
    "Hoffmann et al. 2022, Chinchilla (arXiv:2203.15556)": dict(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28),
    "Besiroglu et al. 2024 replication (arXiv:2404.10102)": dict(E=1.82, A=482.01, alpha=0.3478, B=2085.43,
                                                                 beta=0.3658),
}
# Well-known models (public configurations) for the formula tables.
FAMOUS = {
    "GPT-2 small": dict(vocab_size=50257, context_length=1024, num_layers=12, num_heads=12, embed_dim=768),
    "GPT-2 medium": dict(vocab_size=50257, context_length=1024, num_layers=24, num_heads=16, embed_dim=1024),
    "GPT-2 large": dict(vocab_size=50257, context_length=1024, num_layers=36, num_heads=20, embed_dim=1280),
    "GPT-2 XL": dict(vocab_size=50257, context_length=1024, num_layers=48, num_heads=25, embed_dim=1600),
    "Llama-2-7B": dict(vocab_size=32000, context_length=4096, num_layers=32, num_heads=32, embed_dim=4096,
                       ffn="swiglu", ffn_hidden_size=11008, norm="rmsnorm", position="rope", bias=False,
                       tie_weights=False),
    "Llama-2-13B": dict(vocab_size=32000, context_length=4096, num_layers=40, num_heads=40, embed_dim=5120,
                        ffn="swiglu", ffn_hidden_size=13824, norm="rmsnorm", position="rope", bias=False,
                        tie_weights=False),
    "Llama-2-70B": dict(vocab_size=32000, context_length=4096, num_layers=80, num_heads=64, num_kv_heads=8,
                        embed_dim=8192, ffn="swiglu", ffn_hidden_size=28672, norm="rmsnorm", position="rope",
                        bias=False, tie_weights=False),
}
H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA's H100 SXM datasheet figure, dense bf16
ASSUMED_MFU = 0.4  # a typical model-FLOPs utilisation for large training runs (an assumption, labelled)

# Thresholds of the verdicts, each written beside the claim it decides.
KAPLAN_ALPHA = 0.07  # "loss ~ a + b / N^0.07": holds where 0.07 lies inside the 95% bootstrap interval of alpha
TOKENS_PER_PARAMETER = 20  # "~20 tokens per parameter": holds where the fitted optimum is within a factor ...
TOKENS_FACTOR = 2.0  # ... of 2 of 20 at the largest compute of the sweep
SPEARMAN_LIMIT = -0.8  # "bigger is more sample-efficient": rank correlation of N and tokens-to-target <= -0.8
EARLY_STOP_GAP = 0.02  # "early stopping matters": final val loss exceeds the best seen by more than 0.02 nats
ENTROPY_TOLERANCE = 0.05  # fitted E within 5% of the true floor of the Markov text


def save(run, fig, name: str) -> None:
    """run.save without the crowded minor-tick labels matplotlib puts on log axes spanning under two decades."""
    for ax in fig.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                axis.set_minor_formatter(NullFormatter())
    run.save(fig, name)


def size_overrides(width: int) -> dict:
    """04's lab model shrunk to NUM_LAYERS layers of this width (heads of 16 dims, at least one)."""
    return dict(num_layers=NUM_LAYERS, embed_dim=width, num_heads=max(1, width // 16))


def model_config(vocab_size: int, width: int, context_length: int) -> TransformerConfig:
    return lab_model_config(vocab_size, context_length=context_length, **size_overrides(width))


def markov_data(chain: MarkovChain, context_length: int, batch_size: int, seed: int) -> LabData:
    """Batches sampled afresh from the chain every call (never repeated data): the generator draws a seed."""
    generator = torch.Generator().manual_seed(seed)
    split_salt = {"train": 0, "val": 1}

    def batch_fn(split: str):
        draw = int(torch.randint(0, 2 ** 31, (1,), generator=generator))
        ids = torch.from_numpy(chain.sample_ids(batch_size, context_length + 1, seed=[split_salt[split], draw]))
        return ids[:, :-1], ids[:, 1:]  # (B, T), (B, T)

    return LabData(batch_fn, CharVocab(chain.alphabet), "markov", generator, context_length, batch_size)


# ---------------------------------------------------------------------------------------------- 1
def counting(run, sizes: dict, vocab_size: int) -> dict:
    """Parameters, FLOPs (exact vs FlopCounterMode vs 6ND) and training memory (estimate vs measured)."""
    T, B = sizes["context_length"], sizes["batch_size"]
    rows = []
    for width in sizes["widths"]:
        config = model_config(vocab_size, width, T)
        scratch = replace(config, attention="scratch")  # attention as matmuls FlopCounterMode sees on CPU
        torch.manual_seed(run.seed)
        model = MiniFormer(scratch)
        x = torch.randint(0, vocab_size, (B, T))
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        optimizer = make_optimizer(model, short_schedule(1))
        optimizer.step()
        measured = measured_state_bytes(model, optimizer)
        estimate = training_state_bytes(model.num_parameters(), len(list(model.parameters())))
        saved = measure_saved_activation_bytes(MiniFormer(config),
                                               lambda m, x=x: F.cross_entropy(m(x).flatten(0, 1), x.flatten()))
        N = parameter_count(config, exclude_embeddings=True)
        rows.append({"width": width, "N_non_embedding": N, "N_total": parameter_count(config),
                     "flops_exact": training_flops(scratch, B * T), "flops_counted": int(counter.get_total_flops()),
                     "flops_6ND": six_n_d(N, B * T),
                     "state_bytes_estimate": estimate["total"], "state_bytes_measured": measured["total"],
                     "activation_bytes_estimate": activation_bytes(config, B), "activation_bytes_measured": saved})
    print_table([{k: r[k] for k in ("width", "N_non_embedding", "flops_exact", "flops_counted", "flops_6ND",
                                    "state_bytes_measured", "activation_bytes_measured")} for r in rows],
                "Counting: exact FLOPs vs FlopCounterMode vs 6ND; memory measured")
    N = np.array([r["N_non_embedding"] for r in rows])
    ratio = np.array([r["flops_exact"] / r["flops_6ND"] for r in rows])
    fig, axes = panels(1, 2, width=5.2, title=f"6ND undercounts small models {ratio.max():.1f}x; "
                                              f"{ratio.min():.2f}x at the largest")
    axes[0].plot(N, ratio, "o-", label="exact matmul FLOPs / 6ND")
    axes[0].plot(N, [r["flops_counted"] / r["flops_6ND"] for r in rows], "x", ms=9, label="FlopCounterMode / 6ND")
    axes[0].axhline(1, color="gray", ls="--", lw=1, label="6ND")
    axes[0].set(xscale="log", xlabel="non-embedding parameters N", ylabel="training FLOPs / 6ND",
                title="attention and the head are outside 6N")
    axes[0].legend()
    for key, label, marker in (("state_bytes", "weights+grads+AdamW", "o"), ("activation_bytes", "activations", "s")):
        axes[1].plot(N, [r[f"{key}_measured"] / 1e6 for r in rows], marker, ms=8, mfc="none", label=f"{label} measured")
        axes[1].plot(N, [r[f"{key}_estimate"] / 1e6 for r in rows], "-", label=f"{label} formula")
    axes[1].set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="MB",
                title=f"training memory, batch {B} x {T} tokens, fp32")
    axes[1].legend()
    save(run, fig, "1_counting")
    exact = all(r["flops_exact"] == r["flops_counted"] for r in rows)
    memory_exact = all(r["state_bytes_estimate"] == r["state_bytes_measured"] and
                       r["activation_bytes_estimate"] == r["activation_bytes_measured"] for r in rows)
    insights = [f"Exact matmul FLOPs equal FlopCounterMode for all {len(rows)} sizes: {exact}; 6ND undercounts them "
                f"{ratio.max():.2f}x at N = {N[0]:,} and {ratio.min():.2f}x at N = {N[-1]:,} (attention over "
                f"{T} tokens and the {vocab_size}-symbol head are not in 6N).",
                f"Training-state and activation bytes from the formulas equal the measured tensors: {memory_exact}."]
    return {"rows": rows, "flops_exact_equals_counter": exact, "memory_estimate_equals_measured": memory_exact,
            "insights": insights}


# ---------------------------------------------------------------------------------------------- 2, 3
def sweep(run, data: LabData, sizes: dict, name: str) -> list:
    """Train every width for every budget (its own cosine schedule); final val loss on the same val batches."""
    rows = []
    for width in sizes["widths"]:
        for steps in sizes["steps"]:
            schedule = short_schedule(steps, learning_rate=LEARNING_RATE, eval_interval=steps, eval_batches=1)
            model, history = train_lab_variant(data, schedule, seed=run.seed, device=run.device,
                                               **size_overrides(width))
            data.generator.manual_seed(run.seed + 1)  # the same validation batches for every run
            val_loss = evaluate(model, data.batch_fn, "val", sizes["eval_batches"])
            config = model.config
            tokens = history.tokens_seen
            rows.append({"width": width, "steps": steps, "N": parameter_count(config, exclude_embeddings=True),
                         "N_total": parameter_count(config), "D": tokens, "C_6ND": six_n_d(
                             parameter_count(config, exclude_embeddings=True), tokens),
                         "flops_exact": training_flops(config, tokens), "val_loss": val_loss,
                         "train_seconds": history.train_seconds,
                         "train_loss_curve": history.train_loss})
        print(f"  {name}: width {width} done ({rows[-1]['val_loss']:.3f} at {rows[-1]['D']:,} tokens)")
    return rows


def fits(run, rows: list, sizes: dict, name: str, floor: float | None) -> dict:
    """L(N) on the largest budget and L(N, D) on all runs, each with bootstrap intervals."""
    largest = max(r["steps"] for r in rows)
    top = [r for r in rows if r["steps"] == largest]
    law_n, boot_n = bootstrap_fits([r["N"] for r in top], [r["val_loss"] for r in top],
                                   resamples=sizes["resamples"], seed=run.seed)
    law, boot = bootstrap_fits([r["N"] for r in rows], [r["val_loss"] for r in rows], D=[r["D"] for r in rows],
                               resamples=sizes["resamples"], seed=run.seed)
    result = {"L_of_N": {**law_n.as_dict(), **{f"{k}_95": interval(boot_n, k) for k in ("E", "A", "alpha")}},
              "L_of_N_D": {**law.as_dict(), **{f"{k}_95": interval(boot, k) for k in ("E", "A", "alpha", "B", "beta")}},
              "true_floor": floor}
    predicted = law.predict([r["N"] for r in rows], [r["D"] for r in rows])
    measured = np.array([r["val_loss"] for r in rows])
    result["L_of_N_D"]["rms_log_residual"] = float(np.sqrt(np.mean(np.log(predicted / measured) ** 2)))
    result["_laws"] = (law_n, boot_n, law, boot)
    return result


def draw_sweep(run, rows: list, fit: dict, name: str, label: str, floor: float | None, figure: str) -> None:
    law_n, _, law, _ = fit["_laws"]
    widths = sorted({r["width"] for r in rows})
    steps = sorted({r["steps"] for r in rows})
    colors = dict(zip(widths, matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(widths)))))
    e = fit["L_of_N_D"]
    title = (f"{label}: L = {e['E']:.2f} + {e['A']:.3g}/N^{e['alpha']:.2f} + {e['B']:.3g}/D^{e['beta']:.2f} "
             f"(rms log error {e['rms_log_residual']:.3f})")
    if floor is not None:
        title += f"; true floor {floor:.3f}"
    fig, axes = panels(1, 2, width=5.4, height=4.0, title=title)
    D_grid = np.logspace(np.log10(min(r["D"] for r in rows)) - 0.1, np.log10(max(r["D"] for r in rows)) + 0.3, 50)
    for width in widths:
        runs = [r for r in rows if r["width"] == width]
        axes[0].plot([r["D"] for r in runs], [r["val_loss"] for r in runs], "o", color=colors[width],
                     label=f"N = {runs[0]['N']:,}")
        axes[0].plot(D_grid, law.predict(runs[0]["N"], D_grid), "-", lw=1, color=colors[width])
    axes[0].set(xscale="log", xlabel="training tokens D (log)", ylabel="validation loss (nats/char)",
                title="measured (dots) and fitted L(N, D) (lines)")
    top = [r for r in rows if r["steps"] == steps[-1]]
    N_grid = np.logspace(np.log10(min(r["N"] for r in rows)) - 0.1, np.log10(max(r["N"] for r in rows)) + 0.5, 50)
    for s in steps:
        runs = [r for r in rows if r["steps"] == s]
        axes[1].plot([r["N"] for r in runs], [r["val_loss"] for r in runs], "o", ms=4, alpha=0.35 + 0.65 * (s == steps[-1]),
                     label=f"D = {runs[0]['D']:,}" if s in (steps[0], steps[-1]) else None, color="tab:blue")
    axes[1].plot(N_grid, law_n.predict(N_grid), "-", color="tab:blue",
                 label=f"fit on D = {top[0]['D']:,}: {law_n.E:.2f} + {law_n.A:.3g}/N^{law_n.alpha:.2f}")
    for axis in axes:
        if floor is not None:
            axis.axhline(floor, color="black", ls=":", lw=1.2, label=f"true floor {floor:.3f} (formula)")
        axis.legend(fontsize=7)
    axes[1].set(xscale="log", xlabel="non-embedding parameters N (log)", ylabel="validation loss (nats/char)",
                title="loss vs size (faded: smaller budgets)")
    save(run, fig, figure)


def exponents_figure(run, results: dict) -> None:
    """Our exponents with 95% intervals beside the published ones."""
    fig, axes = panels(1, 1, width=8.0, height=4.0,
                       title="Exponents fitted here (95% bootstrap) beside published fits (quoted values)")
    ax = axes[0]
    labels, values, lows, highs, colors = [], [], [], [], []
    for name, fit in results.items():
        for key in ("alpha", "beta"):
            labels.append(f"{name}\n{key} (ours)")
            values.append(fit["L_of_N_D"][key])
            low, high = fit["L_of_N_D"][f"{key}_95"]
            lows.append(max(0.0, values[-1] - low))  # a skewed bootstrap can leave the fit outside its interval
            highs.append(max(0.0, high - values[-1]))
            colors.append("tab:blue" if key == "alpha" else "tab:orange")
    for source, fit in PUBLISHED.items():
        for key in ("alpha", "beta"):
            labels.append(f"{source.split(' (')[0].replace(' 2022, Chinchilla', ' 2022').replace(' replication', '')}"
                          f"\n{key}{'_N' if 'Kaplan' in source and key == 'alpha' else ''}"
                          f"{'_D' if 'Kaplan' in source and key == 'beta' else ''} (published)")
            values.append(fit[key])
            lows.append(0)
            highs.append(0)
            colors.append("lightsteelblue" if key == "alpha" else "navajowhite")
    x = np.arange(len(labels))
    ax.bar(x, values, color=colors, yerr=[lows, highs], capsize=4, edgecolor="gray")
    ax.axhline(KAPLAN_ALPHA, color="red", ls="--", lw=1, label=f"{KAPLAN_ALPHA} (the claim's exponent)")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("exponent (alpha on N, beta on D)")
    ax.legend()
    save(run, fig, "4_exponents")


# ---------------------------------------------------------------------------------------------- 5
def frontier(run, rows_by_data: dict, fits_by_data: dict) -> dict:
    """Loss vs compute for every run, the fitted optimum N_opt(C) and tokens per parameter with intervals."""
    fig, axes = panels(1, 2, width=5.4, height=4.0)
    out = {}
    for (name, rows), color in zip(rows_by_data.items(), ("tab:green", "tab:purple")):
        _, _, law, boot = fits_by_data[name]["_laws"]
        C = np.array([r["C_6ND"] for r in rows], dtype=float)
        order = np.argsort(C)
        best = np.minimum.accumulate(np.array([r["val_loss"] for r in rows])[order])
        axes[0].scatter(C, [r["val_loss"] for r in rows], s=12, color=color, alpha=0.5, label=f"{name} runs")
        axes[0].plot(C[order], best, "-", color=color, label=f"{name} best loss so far (measured frontier)")
        C_grid = np.logspace(np.log10(C.min()), np.log10(C.max()), 30)
        optimum = compute_optimal(law, C_grid)
        axes[0].plot(C_grid, optimum["loss"], "--", color=color, label=f"{name} fitted optimum")
        boot_ratio = np.array([compute_optimal(f, C.max())["tokens_per_parameter"] for f in boot])
        ratio_band = [np.percentile(np.array([compute_optimal(f, C_grid)["tokens_per_parameter"] for f in boot]),
                                    q, axis=0) for q in (2.5, 97.5)]
        axes[1].plot(C_grid, optimum["tokens_per_parameter"], "-", color=color, label=f"{name} fit")
        axes[1].fill_between(C_grid, *ratio_band, color=color, alpha=0.2, label=f"{name} 95% bootstrap")
        exponent = law.beta / (law.alpha + law.beta)
        boot_exponent = np.array([f.beta / (f.alpha + f.beta) for f in boot])
        out[name] = {"C_max": float(C.max()), "tokens_per_parameter_at_C_max": float(compute_optimal(law, C.max())[
                         "tokens_per_parameter"]),
                     "tokens_per_parameter_95": [float(np.percentile(boot_ratio, 2.5)),
                                                 float(np.percentile(boot_ratio, 97.5))],
                     "N_opt_at_C_max": float(compute_optimal(law, C.max())["N_opt"]),
                     "N_opt_exponent": exponent, "N_opt_exponent_95": [float(np.percentile(boot_exponent, 2.5)),
                                                                       float(np.percentile(boot_exponent, 97.5))]}
    chinchilla = PUBLISHED["Hoffmann et al. 2022, Chinchilla (arXiv:2203.15556)"]
    published = LawFit(**chinchilla)
    C_all = np.logspace(np.log10(min(v["C_max"] for v in out.values())) - 3, np.log10(max(v["C_max"] for v in out.values())), 30)
    axes[1].plot(C_all, compute_optimal(published, C_all)["tokens_per_parameter"], ":", color="black",
                 label="Chinchilla published fit (formula)")
    axes[1].axhline(TOKENS_PER_PARAMETER, color="red", ls="--", lw=1, label="20 tokens per parameter")
    axes[0].set(xscale="log", xlabel="training compute C = 6ND (FLOPs, log)", ylabel="validation loss (nats/char)",
                title="every run, and the fitted compute-optimal loss")
    axes[1].set(xscale="log", yscale="log", xlabel="training compute C = 6ND (FLOPs, log)",
                ylabel="optimal tokens per parameter D/N (log)", title="where the fitted optimum sits")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    summary = ", ".join(f"{k}: {v['tokens_per_parameter_at_C_max']:.0f}" for k, v in out.items())
    fig.suptitle(f"Fitted compute-optimal tokens per parameter at this sweep's largest compute: {summary}",
                 fontsize=11, fontweight="bold")
    save(run, fig, "5_frontier")
    return out


# ---------------------------------------------------------------------------------------------- 6
def sample_efficiency(run, rows_by_data: dict) -> dict:
    """Tokens each size needs to reach the smallest model's final training loss (largest budget, smoothed)."""
    fig, axes = panels(1, len(rows_by_data), width=5.0, height=3.8)
    out = {}
    for ax, (name, rows) in zip(axes, rows_by_data.items()):
        largest = max(r["steps"] for r in rows)
        top = sorted((r for r in rows if r["steps"] == largest), key=lambda r: r["N"])
        tokens_per_step = top[0]["D"] / largest
        window = max(3, largest // 20)
        smooth = {r["N"]: np.convolve(r["train_loss_curve"], np.ones(window) / window, mode="valid") for r in top}
        target = smooth[top[0]["N"]][-1]
        needed = {}
        for r in top:
            curve = smooth[r["N"]]
            hits = np.nonzero(curve <= target)[0]
            needed[r["N"]] = float((hits[0] + window) * tokens_per_step) if hits.size else float("nan")
            ax.plot((np.arange(curve.size) + window) * tokens_per_step, curve, lw=1, label=f"N = {r['N']:,}")
        ax.axhline(target, color="black", ls=":", lw=1, label="target: smallest model's final loss")
        ax.set(xscale="log", xlabel="tokens seen (log)", ylabel=f"training loss, {window}-step mean",
               title=f"{name}: larger models reach the target sooner")
        ax.legend(fontsize=6)
        sizes = np.array(list(needed))
        tokens = np.array([needed[n] for n in sizes])
        ranks_n, ranks_t = np.argsort(np.argsort(sizes)), np.argsort(np.argsort(np.nan_to_num(tokens, nan=np.inf)))
        spearman = float(np.corrcoef(ranks_n, ranks_t)[0, 1])
        out[name] = {"target_loss": float(target), "tokens_to_target": {str(int(n)): t for n, t in needed.items()},
                     "spearman_N_vs_tokens": spearman}
    save(run, fig, "6_sample_efficiency")
    return out


# ---------------------------------------------------------------------------------------------- 7
def early_stopping(run, sizes: dict) -> dict:
    """The largest model on all of the training text vs on a small subset it sees many times."""
    text, _ = load_corpus("auto")
    vocab = CharVocab(text)
    train_ids, val_ids = train_val_split(vocab.encode(text), val_fraction=0.1)
    T, B, steps = sizes["context_length"], sizes["batch_size"], sizes["early_stop_steps"]
    width = max(sizes["widths"])
    fig, axes = panels(1, 1, width=6.0, height=4.0)
    out = {}
    for label, train_part in (("all text (one pass)", train_ids), (f"{sizes['early_stop_subset']:,} chars, repeated",
                                                                   train_ids[:sizes["early_stop_subset"]])):
        generator = torch.Generator().manual_seed(run.seed)
        splits = {"train": train_part, "val": val_ids}
        data = LabData(lambda split, s=splits, g=generator: random_batch(s[split], B, T, generator=g, device=run.device),
                       vocab, "shakespeare", generator, T, B)
        schedule = short_schedule(steps, learning_rate=LEARNING_RATE, eval_interval=max(1, steps // 20),
                                  eval_batches=sizes["eval_batches"] // 2)
        _, history = train_lab_variant(data, schedule, seed=run.seed, device=run.device, **size_overrides(width))
        val = np.array(history.val_loss)
        out[label] = {"eval_steps": history.eval_steps, "val_loss": history.val_loss, "best": float(val.min()),
                      "final": float(val[-1]), "gap": float(val[-1] - val.min()),
                      "epochs": history.tokens_seen / len(train_part)}
        axes[0].plot(np.array(history.eval_steps) * B * T, val, "o-", ms=3,
                     label=f"{label}: best {val.min():.3f}, final {val[-1]:.3f}")
    gaps = {k: v["gap"] for k, v in out.items()}
    axes[0].set(xlabel="training tokens", ylabel="validation loss (nats/char)",
                title=f"Repeating {sizes['early_stop_subset']:,} chars: val loss ends "
                      f"{list(gaps.values())[1]:.3f} above its best; one pass: {list(gaps.values())[0]:.3f}")
    axes[0].legend()
    save(run, fig, "7_early_stopping")
    return out


# ---------------------------------------------------------------------------------------------- 8
def famous_models(run, measured_flops_per_second: float) -> list:
    """Closed-form parameters, memory and time for well-known configurations (formulas, not measurements)."""
    rows = []
    for name, settings in FAMOUS.items():
        config = TransformerConfig(**settings)
        N = parameter_count(config)
        tokens = TOKENS_PER_PARAMETER * N
        activations = 34 * config.context_length * config.embed_dim * config.num_layers  # bytes, one sequence
        rows.append({"model": name, "parameters": N, "weights_bf16_GB": 2 * N / 1e9,
                     "training_state_GB": mixed_precision_training_bytes(N) / 1e9,
                     "activations_per_sequence_GB": activations / 1e9,
                     "train_flops_20_tokens_per_param": float(six_n_d(N, tokens)),
                     "H100_days_at_40pct_MFU": six_n_d(N, tokens) / (H100_BF16_DENSE_FLOPS * ASSUMED_MFU) / 86400,
                     "this_cpu_years": six_n_d(N, tokens) / measured_flops_per_second / 86400 / 365})
    print_table(rows, "Well-known models (formulas: 16 B/param mixed-precision AdamW; activations 34 s h L bytes, "
                      "bf16 with flash attention; 6ND at 20 tokens/param)")
    fig, axes = panels(1, 2, width=5.4, height=4.0,
                       title="Formula: training state needs 8x the bf16 weights; time grows as N^2 at 20 tokens/param")
    names = [r["model"] for r in rows]
    x = np.arange(len(rows))
    for offset, key, label in ((-0.27, "weights_bf16_GB", "weights bf16"), (0, "training_state_GB", "training state "
                                "(16 B/param)"), (0.27, "activations_per_sequence_GB", "activations, 1 sequence")):
        axes[0].bar(x + offset, [r[key] for r in rows], width=0.27, label=label)
    axes[0].set_xticks(x, names, rotation=35, ha="right")
    axes[0].set(yscale="log", ylabel="GB (formula, log)", title="memory")
    axes[0].axhline(80, color="red", ls="--", lw=1, label="one 80 GB GPU")
    axes[0].legend(fontsize=7)
    axes[1].bar(x, [r["H100_days_at_40pct_MFU"] for r in rows], color="tab:gray")
    axes[1].set_xticks(x, names, rotation=35, ha="right")
    axes[1].set(yscale="log", ylabel="days on one H100 at 40% MFU (formula, log)",
                title=f"training on 20 tokens/param (this CPU: x{H100_BF16_DENSE_FLOPS * ASSUMED_MFU / measured_flops_per_second:,.0f} longer)")
    save(run, fig, "8_famous_models")
    return rows


# ---------------------------------------------------------------------------------------------- 9
def data_parallel(run, sizes: dict) -> dict:
    """DDP and ZeRO on 1 and 2 local processes: speed, optimizer bytes per rank, all-reduce bytes vs formula."""
    out = {}
    for world_size in (1, 2):
        with tempfile.TemporaryDirectory() as folder:  # checkpoints and rank records: not kept
            runs = [DataParallelSettings(strategy=strategy, steps=sizes["parallel_steps"], global_batch_size=16,
                                         context_length=sizes["context_length"], seed=run.seed,
                                         out_dir=f"{folder}/{strategy}") for strategy in ("ddp", "zero")]
            results = spawn_local(runs, world_size)
        for settings, records in zip(runs, results):
            N = records[0]["num_parameters"]
            out[f"{settings.strategy} x {world_size}"] = {
                "world_size": world_size, "strategy": settings.strategy, "num_parameters": N,
                "seconds_per_step": max(r["seconds_per_step"] for r in records),
                "tokens_per_second": min(r["tokens_per_second"] for r in records),
                "optimizer_bytes_per_rank": [r["optimizer_bytes"] for r in records],
                "allreduce_bytes_per_step_measured": records[0]["allreduce_bytes_per_step"],
                "allreduce_payload_formula": 4 * N,
                "ring_bytes_sent_per_rank_formula": 2 * (world_size - 1) / world_size * 4 * N}
    print_table([{"run": k, "ms/step": 1000 * v["seconds_per_step"], "tokens/s": v["tokens_per_second"],
                  "optimizer bytes/rank": max(v["optimizer_bytes_per_rank"]),
                  "all-reduced bytes/step": int(v["allreduce_bytes_per_step_measured"]),
                  "formula 4N": v["allreduce_payload_formula"]} for k, v in out.items()],
                "Data parallel on this machine (gloo, shared cores)")
    fig, axes = panels(1, 2, width=5.0, height=3.8)
    labels = list(out)
    axes[0].bar(labels, [v["tokens_per_second"] for v in out.values()], color="tab:blue")
    axes[0].set(ylabel="tokens per second (global batch)", title="speed: 2 processes on 2 shared cores")
    axes[1].bar(labels, [max(v["optimizer_bytes_per_rank"]) / 1e6 for v in out.values()], color="tab:orange")
    axes[1].set(ylabel="AdamW state on the largest rank (MB)", title="ZeRO keeps about 1/W of the optimizer state")
    zero2, ddp2 = out["zero x 2"], out["ddp x 2"]
    share = max(zero2["optimizer_bytes_per_rank"]) / max(ddp2["optimizer_bytes_per_rank"])
    fig.suptitle(f"2 processes: ZeRO's largest rank holds {100 * share:.0f}% of DDP's optimizer state; "
                 f"DDP all-reduces {ddp2['allreduce_bytes_per_step_measured'] / 1e6:.2f} MB/step (= 4N)",
                 fontsize=11, fontweight="bold")
    save(run, fig, "9_data_parallel")
    insights = [f"Data parallel, 2 processes: ZeRO's largest rank keeps {100 * share:.0f}% of DDP's AdamW state; DDP "
                f"all-reduces {ddp2['allreduce_bytes_per_step_measured']:,.0f} bytes per step (formula 4N = "
                f"{ddp2['allreduce_payload_formula']:,}); tokens/s 1 -> 2 processes: "
                f"{out['ddp x 1']['tokens_per_second']:,.0f} -> {ddp2['tokens_per_second']:,.0f} (2 shared cores)."]
    return {"runs": out, "insights": insights}


# ---------------------------------------------------------------------------------------------- verdicts
def verdicts(fits_by_data: dict, optimum: dict, efficiency: dict, stopping: dict) -> dict:
    inside = {k: f["L_of_N"]["alpha_95"][0] <= KAPLAN_ALPHA <= f["L_of_N"]["alpha_95"][1] for k, f in fits_by_data.items()}
    alphas = {k: f"{f['L_of_N']['alpha']:.3f} [{f['L_of_N']['alpha_95'][0]:.3f}, {f['L_of_N']['alpha_95'][1]:.3f}]"
              for k, f in fits_by_data.items()}
    ratio_ok = {k: 1 / TOKENS_FACTOR <= v["tokens_per_parameter_at_C_max"] / TOKENS_PER_PARAMETER <= TOKENS_FACTOR
                for k, v in optimum.items()}
    spearman = {k: v["spearman_N_vs_tokens"] for k, v in efficiency.items()}
    gaps = {k: v["gap"] for k, v in stopping.items()}
    one_pass, repeated = list(gaps.values())

    def combine(flags):
        return "holds" if all(flags) else "fails" if not any(flags) else "depends"

    return {
        "loss_a_plus_b_over_N_0.07": {
            "claim": "loss ~ a + b / N^0.07",
            "measured": "alpha of L(N) = E + A/N^alpha, 95% bootstrap: " + "; ".join(f"{k} {v}" for k, v in alphas.items()),
            "threshold": f"holds where {KAPLAN_ALPHA} lies inside the 95% interval",
            "verdict": combine(list(inside.values()))},
        "chinchilla_20_tokens_per_parameter": {
            "claim": "~20 tokens per parameter is compute-optimal",
            "measured": "fitted D/N at the sweep's largest compute: " + "; ".join(
                f"{k} {v['tokens_per_parameter_at_C_max']:.1f} [{v['tokens_per_parameter_95'][0]:.1f}, "
                f"{v['tokens_per_parameter_95'][1]:.1f}]" for k, v in optimum.items()),
            "threshold": f"within a factor {TOKENS_FACTOR:g} of {TOKENS_PER_PARAMETER}",
            "verdict": combine(list(ratio_ok.values()))},
        "bigger_models_more_sample_efficient": {
            "claim": "bigger models are more sample-efficient",
            "measured": "Spearman(N, tokens to reach the smallest model's final loss): " + "; ".join(
                f"{k} {v:.2f}" for k, v in spearman.items()),
            "threshold": f"holds where the rank correlation <= {SPEARMAN_LIMIT}",
            "verdict": combine([v <= SPEARMAN_LIMIT for v in spearman.values()])},
        "optimal_size_depends_on_budget": {
            "claim": "the optimal size depends on the (compute) budget",
            "measured": "exponent of N_opt ~ C^a: " + "; ".join(
                f"{k} {v['N_opt_exponent']:.2f} [{v['N_opt_exponent_95'][0]:.2f}, {v['N_opt_exponent_95'][1]:.2f}]"
                for k, v in optimum.items()),
            "threshold": "holds where the 95% interval of the exponent excludes 0",
            "verdict": combine([v["N_opt_exponent_95"][0] > 0 for v in optimum.values()])},
        "early_stopping_matters": {
            "claim": "early stopping matters",
            "measured": f"final minus best val loss: one pass {one_pass:.3f}, repeated subset {repeated:.3f} nats",
            "threshold": f"matters where the gap > {EARLY_STOP_GAP} nats",
            "verdict": combine([one_pass > EARLY_STOP_GAP, repeated > EARLY_STOP_GAP])},
    }


def main():
    args = demo_parser(__doc__.splitlines()[0]).parse_args()
    run = start_demo(args, __file__)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    sizes = SIZES["quick" if args.quick else "full"]
    chain = MarkovChain.random(MARKOV["alphabet"], MARKOV["order"], MARKOV["concentration"], seed=run.seed)
    floor = float(chain.conditional_entropies(sizes["context_length"]).mean())
    print(f"Markov text: entropy rate {chain.entropy_rate():.4f} nats/symbol, floor of a {sizes['context_length']}-symbol "
          f"window {floor:.4f}")

    counts = counting(run, sizes, len(MARKOV["alphabet"]))
    markov = markov_data(chain, sizes["context_length"], sizes["batch_size"], run.seed)
    shakespeare = char_shakespeare_data(sizes["context_length"], sizes["batch_size"], run.device, run.seed)
    rows_by_data = {"Markov": sweep(run, markov, sizes, "Markov"),
                    "Shakespeare": sweep(run, shakespeare, sizes, shakespeare.corpus)}
    fits_by_data = {"Markov": fits(run, rows_by_data["Markov"], sizes, "Markov", floor),
                    "Shakespeare": fits(run, rows_by_data["Shakespeare"], sizes, "Shakespeare", None)}
    draw_sweep(run, rows_by_data["Markov"], fits_by_data["Markov"], "Markov", "Markov text", floor, "2_sweep_markov")
    draw_sweep(run, rows_by_data["Shakespeare"], fits_by_data["Shakespeare"], "Shakespeare",
               f"{shakespeare.corpus.capitalize()} characters", None, "3_sweep_shakespeare")
    exponents_figure(run, fits_by_data)
    optimum = frontier(run, rows_by_data, fits_by_data)
    efficiency = sample_efficiency(run, rows_by_data)
    stopping = early_stopping(run, sizes)
    all_rows = [r for rows in rows_by_data.values() for r in rows]
    flops_per_second = sum(r["flops_exact"] for r in all_rows) / sum(r["train_seconds"] for r in all_rows)
    famous = famous_models(run, flops_per_second)
    parallel = data_parallel(run, sizes)

    for fit in fits_by_data.values():
        fit.pop("_laws")
    markov_fit = fits_by_data["Markov"]["L_of_N_D"]
    e_error = abs(markov_fit["E"] - floor) / floor
    results_verdicts = verdicts(fits_by_data, optimum, efficiency, stopping)
    results_verdicts["fitted_E_is_the_true_entropy"] = {
        "claim": "the fitted irreducible loss E is the entropy of the text (Markov: known exactly)",
        "measured": f"E = {markov_fit['E']:.3f} [{markov_fit['E_95'][0]:.3f}, {markov_fit['E_95'][1]:.3f}] vs "
                    f"floor {floor:.3f} ({100 * e_error:.1f}% off)",
        "threshold": f"holds within {100 * ENTROPY_TOLERANCE:.0f}% of the floor",
        "verdict": "holds" if e_error <= ENTROPY_TOLERANCE else "fails"}
    insights = counts.pop("insights") + parallel.pop("insights") + [
        f"{name}: L(N, D) = {f['L_of_N_D']['E']:.3f} + {f['L_of_N_D']['A']:.3g}/N^{f['L_of_N_D']['alpha']:.3f} + "
        f"{f['L_of_N_D']['B']:.3g}/D^{f['L_of_N_D']['beta']:.3f} (rms log error {f['L_of_N_D']['rms_log_residual']:.3f})"
        for name, f in fits_by_data.items()] + [
        f"Measured training throughput over the sweep: {flops_per_second / 1e9:.2f} GFLOP/s (exact matmul FLOPs) on "
        f"{cpu_model_name()} (shared cores)."]
    print_findings(insights, results_verdicts)
    for rows in rows_by_data.values():  # keep every 10th point of the training curves
        for r in rows:
            r["train_loss_curve"] = r["train_loss_curve"][::10]
    run.finish({"sizes": sizes, "markov": {**MARKOV, "entropy_rate": chain.entropy_rate(), "window_floor": floor},
                "learning_rate": LEARNING_RATE, "num_layers": NUM_LAYERS, "published_fits": PUBLISHED,
                "counting": counts, "sweep": rows_by_data, "fits": fits_by_data, "compute_optimal": optimum,
                "sample_efficiency": efficiency, "early_stopping": stopping, "famous_models": famous, "data_parallel": parallel,
                "flops_per_second": flops_per_second, "key_insights": insights, "verdicts": results_verdicts})


if __name__ == "__main__":
    main()
