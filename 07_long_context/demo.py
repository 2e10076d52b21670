"""07 — Long context: what happens past the training length, what windows and sinks cost, and retrieval.

Experiments:
  1. memory_and_time: one attention layer at growing length: full causal attention (torch SDPA, and 03's
     explicit scores), the window as a mask, the window as banded compute; measured peak memory and time,
     beside the formula for the score matrix.
  2. context_collapse: the lab model (04's MiniFormer, RoPE) trained on windows of one length, evaluated on
     documents 1x .. 16x as long with full attention, a sliding window of the training length, and
     attention sinks (4 sinks + the rest of the window), all on the same weights; the attention the first
     token receives.
  3. window_ablation: the model of 2 evaluated with windows 1/8x .. 4x the training length on 4x-long
     documents; and small models trained with each window.
  4. curriculum: at equal tokens, train short then long, long throughout, or short only; evaluate long.
  5. retrieval: 16's key-value lookup; a small reader trained on up to P pairs answers with its full
     context, with a short sliding window, or from the one pair TF-IDF retrieves; accuracy vs distance.
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import ctypes
import random
import string

import numpy as np
import torch
import torch.nn.functional as F

from attention import scaled_dot_product_attention
from data import CharVocab
from demo_cli import demo_parser, print_table, report_findings, start_demo
from lab import char_shakespeare_data, lab_model_config, short_schedule, train_lab_variant
from plotting import line, panels
from retrieval import retrieval_prompt
from runtime import Timer, time_function, track_peak_memory
from sliding_window import attention_score_bytes, banded_attention, sliding_window_mask, with_sliding_window
from synthetic_tasks import END, FORMAT_CHARACTERS, KeyValueTask
from training import train
from transformer import MiniFormer

# Quick and full runs differ in these sizes only (model: overrides of 04's lab model).
SIZES = {
    "quick": dict(train_length=32, steps=40, batch_size=8, model=dict(num_layers=2, embed_dim=64),
                  length_factors=(1, 2, 4), eval_tokens=2048, num_sinks=4,
                  attention_lengths=(256, 512, 1024), attention_window=64,
                  inference_windows=(4, 16, 32, 128), ablation_length=64, ablation_windows=(8, 64),
                  ablation_steps=16, curriculum=dict(short=32, long=128, batch=4, steps=16),
                  reader=dict(max_pairs=4, eval_pairs=8, queries=4, steps=20, window=8, prompts=8)),
    "full": dict(train_length=64, steps=500, batch_size=12, model=dict(),
                 length_factors=(1, 2, 4, 8, 16), eval_tokens=16384, num_sinks=4,
                 attention_lengths=(256, 512, 1024, 2048, 4096), attention_window=64,
                 inference_windows=(8, 16, 32, 64, 128, 256), ablation_length=128,
                 ablation_windows=(4, 16, 64, 128), ablation_steps=200,
                 curriculum=dict(short=64, long=256, batch=4, steps=300),
                 reader=dict(max_pairs=6, eval_pairs=20, queries=8, steps=1200, window=16, prompts=40)),
}
SMALL_MODEL = dict(num_layers=2, embed_dim=64, num_heads=4)  # ablation, curriculum and reader models
COLORS = {"full": "tab:red", "window": "tab:blue", "sinks": "tab:green", "retrieval": "tab:purple"}
# Thresholds of the verdicts, each written beside the claim it decides.
COLLAPSE_RATIO = 1.10  # "performance drops beyond the training length": loss at the longest length > 1.10x the 1x loss
FLAT_RATIO = 1.05  # "a window / sinks keep the loss flat": longest-length loss within 5% of the 1x loss
TRAIN_LONG_MARGIN = 0.05  # "better to train on long sequences": long-trained loss at the long length lower by 0.05 nats
CURRICULUM_TOLERANCE = 0.02  # "curriculum is as good as long throughout": within 0.02 nats at the long length
LINEAR_SLOPE, QUADRATIC_SLOPE = 1.3, 1.7  # log-log slopes of time and memory vs length over the largest lengths
SINK_GAIN = 0.01  # "sinks improve on a plain window": loss at the longest length lower by 0.01 nats
RETRIEVAL_MARGIN = 0.2  # "retrieval beats a short window on far facts": accuracy higher by 0.2 beyond the window


def loss_ratio_verdict(claim, ratio, threshold_text, holds):
    return {"claim": claim, "threshold": threshold_text, "measured": f"{ratio:.3f}",
            "verdict": "holds" if holds else "fails"}


# ---------------------------------------------------------------------------------------------- 1
def validation_windows(run, lengths, eval_tokens: int) -> dict:
    """{length: (x, y)}: about eval_tokens validation targets per length, the same windows for every model."""
    return {length: char_shakespeare_data(length, max(2, eval_tokens // length), run.device,
                                          seed=run.seed + length).batch_fn("val")
            for length in lengths}


@torch.no_grad()
def loss_per_position(model, x, y, chunk: int = 4) -> torch.Tensor:
    """Mean cross-entropy at each position of the windows (T,), a few windows at a time (the sink path
    writes out (B, H, T, T) scores)."""
    model.eval()
    total = 0
    for start in range(0, x.shape[0], chunk):
        logits = model(x[start:start + chunk])  # (b, T, V)
        total = total + F.cross_entropy(logits.transpose(1, 2), y[start:start + chunk], reduction="none").sum(0)
    return (total / x.shape[0]).cpu()


@torch.no_grad()
def first_token_attention(model, x, batch: int = 8) -> dict:
    """Mean attention weight on position 0 from the second half of the queries, per layer, and its ratio to
    the uniform share 1 / (i + 1): StreamingLLM found deep layers of large models put most of it there."""
    model.eval()
    _, weights = model(x[:batch], return_attention=True)  # per layer (B, H, T, T)
    T = x.shape[1]
    queries = torch.arange(T // 2, T)
    uniform = (1.0 / (queries + 1)).mean().item()
    per_layer = [w[:, :, T // 2:, 0].mean().item() for w in weights]
    return {"first_token_weight_per_layer": per_layer, "uniform_share": uniform,
            "ratio_to_uniform_per_layer": [p / uniform for p in per_layer]}


def attention_variants(model, train_length: int, num_sinks: int) -> dict:
    """The same weights with full attention, a window of the training length, and sinks + window."""
    return {"full": model,
            "window": with_sliding_window(model, train_length, compute="banded"),
            "sinks": with_sliding_window(model, train_length - num_sinks, num_sinks=num_sinks)}


def context_collapse(run, data, sizes) -> tuple[dict, MiniFormer]:
    train_length, num_sinks = sizes["train_length"], sizes["num_sinks"]
    lengths = [train_length * f for f in sizes["length_factors"]]
    with Timer(run.device) as timer:
        model, history = train_lab_variant(data, short_schedule(sizes["steps"]), run.seed, run.device,
                                           position="rope", context_length=lengths[-1], **sizes["model"])
    print(f"  trained at {train_length} tokens for {sizes['steps']} steps in {timer.seconds:.1f} s "
          f"(val loss {history.final_val_loss:.3f})")
    windows = validation_windows(run, lengths, sizes["eval_tokens"])
    variants = attention_variants(model, train_length, num_sinks)
    per_length, per_position = {}, {}
    for name, variant in variants.items():
        curves = {length: loss_per_position(variant, *windows[length]) for length in lengths}
        per_length[name] = [curves[length].mean().item() for length in lengths]
        per_position[name] = curves[lengths[-1]]
        print(f"  {name:7s} " + ", ".join(f"{L}: {v:.3f}" for L, v in zip(lengths, per_length[name])))
    ratios = {name: losses[-1] / losses[0] for name, losses in per_length.items()}
    sink_mass = first_token_attention(model, windows[train_length][0])

    fig, axes = panels(1, 2, width=6.0, height=4.3,
                       title=f"Loss at {lengths[-1] // train_length}x the training length / at 1x: "
                             + ", ".join(f"{n} {r:.2f}" for n, r in ratios.items()))
    styles = {name: {"color": COLORS[name]} for name in variants}
    styles["window"]["linewidth"] = 3  # window and sinks nearly coincide: a wide line under a dashed one
    styles["sinks"]["linestyle"] = "--"
    labels = {"full": "full attention", "window": f"window {train_length}",
              "sinks": f"{num_sinks} sinks + window {train_length - num_sinks}"}
    line(axes[0], lengths, {labels[n]: v for n, v in per_length.items()},
         styles={labels[n]: s for n, s in styles.items()}, logx=True,
         xlabel="document length (characters, log scale)", ylabel="validation loss (nats / char)",
         title=f"mean loss over whole documents (RoPE, trained at {train_length})")
    axes[0].set_xticks(lengths, [str(L) for L in lengths])
    axes[0].minorticks_off()
    bin_size = max(1, lengths[-1] // 64)
    centers = np.arange(0, lengths[-1], bin_size) + bin_size / 2
    line(axes[1], centers, {labels[n]: c.view(-1, bin_size).mean(1).numpy() for n, c in per_position.items()},
         styles={labels[n]: s for n, s in styles.items()}, markers=False,
         xlabel=f"position in a {lengths[-1]}-character document", ylabel="loss (nats / char)",
         title=f"loss by position (bins of {bin_size})")
    axes[1].axvline(train_length, color="black", linestyle=":", label=f"training length ({train_length})")
    axes[1].legend()
    run.save(fig, "context_collapse")

    full, window, sinks = ratios["full"], ratios["window"], ratios["sinks"]
    sink_gain = per_length["window"][-1] - per_length["sinks"][-1]
    insights = [f"Past the training length full attention's loss rises: {per_length['full'][0]:.3f} at {train_length} "
                f"-> {per_length['full'][-1]:.3f} nats at {lengths[-1]} ({full:.2f}x); a window of {train_length} "
                f"on the same weights stays at {window:.2f}x and {num_sinks} sinks + window at {sinks:.2f}x.",
                f"Keeping {num_sinks} sink tokens changes the loss at {lengths[-1]} by {-sink_gain:+.4f} nats against the "
                f"plain window: this small model gives the first token "
                f"{sink_mass['first_token_weight_per_layer'][-1]:.3f} of the attention in its last layer "
                f"({sink_mass['ratio_to_uniform_per_layer'][-1]:.1f}x a uniform share; per layer: "
                + ", ".join(f"{r:.1f}x" for r in sink_mass["ratio_to_uniform_per_layer"]) + "), so evicting it costs little."]
    verdicts = {
        "context_collapse": loss_ratio_verdict(
            "context collapse: performance drops beyond the training length (full attention, RoPE)", full,
            f"loss at {lengths[-1] // train_length}x / loss at 1x > {COLLAPSE_RATIO}", full > COLLAPSE_RATIO),
        "window_prevents_collapse": loss_ratio_verdict(
            "a sliding window of the training length keeps the loss flat at any length", window,
            f"loss at {lengths[-1] // train_length}x / loss at 1x <= {FLAT_RATIO}", window <= FLAT_RATIO),
        "sinks_prevent_collapse": loss_ratio_verdict(
            "attention sinks + window keep the loss flat at any length", sinks,
            f"loss at {lengths[-1] // train_length}x / loss at 1x <= {FLAT_RATIO}", sinks <= FLAT_RATIO),
        "sinks_beat_window": {
            "claim": "attention sinks improve on a plain sliding window (StreamingLLM)",
            "threshold": f"loss at {lengths[-1]}: window - sinks >= {SINK_GAIN} nats",
            "measured": f"{sink_gain:+.4f} nats", "verdict": "holds" if sink_gain >= SINK_GAIN else "fails"},
    }
    result = {"lengths": lengths, "loss": per_length, "ratio_longest_to_1x": ratios, "first_token_attention": sink_mass,
              "train_seconds": timer.seconds, "final_val_loss": history.final_val_loss,
              "insights": insights, "verdicts": verdicts}
    return result, model


# ---------------------------------------------------------------------------------------------- 2
def fitted_slope(lengths, values, points: int = 3) -> float:
    """Slope of log(value) vs log(length) over the largest `points` lengths (1 = linear, 2 = quadratic)."""
    x, y = np.log(lengths[-points:]), np.log(np.maximum(values[-points:], 1e-12))
    return float(np.polyfit(x, y, 1)[0])


def release_freed_memory_to_the_os() -> bool:
    """Make glibc serve every allocation above 64 KiB with mmap and unmap it when freed (mallopt
    M_MMAP_THRESHOLD, which also stops the threshold from growing). Without it freed tensors stay in the
    heap, the next call reuses them and the sampled RSS peak reads 0. False where libc is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def memory_and_time(run, sizes) -> dict:
    """One attention layer, B = 1, H = 4, D = 32, at each length: peak extra memory and median time."""
    window, lengths = sizes["attention_window"], list(sizes["attention_lengths"])
    rss_is_exact = run.device.type != "cpu" or release_freed_memory_to_the_os()
    heads, head_dim = 4, 32

    def methods(q, k, v):
        positions = torch.arange(q.shape[2], device=q.device)
        return {
            "full, SDPA (flash kernel)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "full, scores written out (03)": lambda: scaled_dot_product_attention(q, k, v, is_causal=True),
            f"window {window}, SDPA + (T, T) mask": lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=sliding_window_mask(positions, positions, window)),
            f"window {window}, banded": lambda: banded_attention(q, k, v, window),
        }

    seconds, peak = {}, {}
    for length in lengths:
        generator = torch.Generator().manual_seed(run.seed)
        q, k, v = torch.randn(3, 1, heads, length, head_dim, generator=generator).to(run.device).unbind(0)
        for name, fn in methods(q, k, v).items():
            with torch.no_grad():
                seconds.setdefault(name, []).append(time_function(fn, run.device, repeats=3))
                with track_peak_memory(run.device) as stats:
                    fn()
            peak.setdefault(name, []).append(stats["peak_bytes"])
        print(f"  T={length:5d}: " + ", ".join(f"{n.split(',')[0]}/{n.split(',')[1].strip()[:6]} "
                                              f"{s[-1] * 1e3:.1f} ms" for n, s in seconds.items()))
    full_formula = [attention_score_bytes(1, heads, L) for L in lengths]
    banded_formula = [attention_score_bytes(1, heads, L, window) for L in lengths]
    slopes = {name: {"time": fitted_slope(lengths, s), "memory": fitted_slope(lengths, peak[name])}
              for name, s in seconds.items()}
    explicit, banded = "full, scores written out (03)", f"window {window}, banded"
    fig, axes = panels(1, 2, width=6.2, height=4.4,
                       title=f"From T={lengths[0]} to {lengths[-1]}: explicit full attention "
                             f"{seconds[explicit][-1] / seconds[explicit][0]:.0f}x slower, banded window "
                             f"{seconds[banded][-1] / seconds[banded][0]:.0f}x")
    line(axes[0], lengths, {n: np.array(s) * 1e3 for n, s in seconds.items()}, logx=True, logy=True,
         xlabel="sequence length T (tokens, log scale)", ylabel="time per call (ms, log scale)",
         title=f"one attention layer, B=1, H={heads}, D={head_dim} (median of 3)")
    measured = {n: np.maximum(np.array(p), 1) / 2**20 for n, p in peak.items()}
    measured["formula: full scores B H T^2 x 4 B"] = np.array(full_formula) / 2**20
    measured["formula: banded scores B H T 2W x 4 B"] = np.array(banded_formula) / 2**20
    styles = {"formula: full scores B H T^2 x 4 B": {"color": "black", "linestyle": "--", "marker": None},
              "formula: banded scores B H T 2W x 4 B": {"color": "gray", "linestyle": "--", "marker": None}}
    line(axes[1], lengths, measured, styles=styles, logx=True, logy=True,
         xlabel="sequence length T (tokens, log scale)", ylabel="peak extra memory (MiB, log scale)",
         title="measured peak (process RSS, sampled) and formula")
    for ax in axes:
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.minorticks_off()
    run.save(fig, "memory_and_time")
    insights = [f"At T={lengths[-1]} one attention layer takes {seconds[explicit][-1] * 1e3:.1f} ms with explicit "
                f"full scores (peak {peak[explicit][-1] / 2**20:.0f} MiB measured, formula "
                f"{full_formula[-1] / 2**20:.0f} MiB), {seconds['full, SDPA (flash kernel)'][-1] * 1e3:.1f} ms with "
                f"torch's fused SDPA, and {seconds[banded][-1] * 1e3:.1f} ms banded with window {window} (peak "
                f"{peak[banded][-1] / 2**20:.0f} MiB); log-log time slopes over the largest lengths: explicit "
                f"{slopes[explicit]['time']:.2f}, banded {slopes[banded]['time']:.2f}."]
    linear = slopes[banded]["time"] <= LINEAR_SLOPE and slopes[explicit]["time"] >= QUADRATIC_SLOPE
    verdicts = {"window_cost_linear": {
        "claim": "windowed attention costs O(T W) while full attention costs O(T^2)",
        "threshold": f"log-log time slope over the 3 largest lengths: banded <= {LINEAR_SLOPE}, explicit full "
                     f">= {QUADRATIC_SLOPE}",
        "measured": f"banded {slopes[banded]['time']:.2f}, explicit full {slopes[explicit]['time']:.2f}, "
                    f"SDPA full {slopes['full, SDPA (flash kernel)']['time']:.2f}",
        "verdict": "holds" if linear else "fails"}}
    return {"lengths": lengths, "window": window, "seconds": seconds, "peak_bytes": peak,
            "memory_method": stats["method"] + ("" if rss_is_exact else " (freed memory may be reused: peaks low)"),
            "formula_score_bytes": {"full": full_formula, "banded": banded_formula}, "loglog_slopes": slopes,
            "insights": insights, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- 3
def window_ablation(run, model, sizes) -> dict:
    """(a) the trained model of 2 with each window on documents 4x its training length; (b) small models
    trained at ablation_length with each window (banded compute), same seed and batches."""
    train_length = sizes["train_length"]
    eval_length = 4 * train_length
    (x, y), = validation_windows(run, [eval_length], sizes["eval_tokens"]).values()
    inference = {}
    for window in sizes["inference_windows"]:
        windowed = model if window >= eval_length else with_sliding_window(model, window, compute="banded")
        inference[window] = loss_per_position(windowed, x, y).mean().item()
    length = sizes["ablation_length"]
    data = char_shakespeare_data(length, sizes["batch_size"], run.device, run.seed)
    trained = {}
    for window in sizes["ablation_windows"]:
        prepare = None if window >= length else (lambda m, w=window: _swap_attention(m, w))
        with Timer(run.device) as timer:
            small, history = train_lab_variant(data, short_schedule(sizes["ablation_steps"]), run.seed, run.device,
                                               prepare=prepare, position="rope", **SMALL_MODEL)
        trained[window] = {"val_loss": history.final_val_loss, "train_seconds": timer.seconds}
        print(f"  trained with window {window:4d}: val loss {history.final_val_loss:.3f} in {timer.seconds:.1f} s")
    full_loss = trained[max(trained)]["val_loss"]
    close = [w for w, r in trained.items() if r["val_loss"] <= full_loss + 0.02]
    best_inference = min(inference, key=inference.get)
    fig, axes = panels(1, 2, width=5.8, height=4.2,
                       title=f"Best inference window on {eval_length}-char documents: {best_inference}; smallest "
                             f"trained window within 0.02 nats of full: {min(close)}")
    line(axes[0], list(inference), {"same weights, windowed at inference": list(inference.values())}, logx=True,
         xlabel="window W (tokens, log scale)", ylabel="validation loss (nats / char)",
         title=f"model of 2 (trained at {train_length}), {eval_length}-char documents")
    axes[0].axvline(train_length, color="black", linestyle=":", label=f"training length ({train_length})")
    axes[0].legend()
    line(axes[1], list(trained), {"trained with window W": [r["val_loss"] for r in trained.values()]}, logx=True,
         xlabel="window W (tokens, log scale)", ylabel="validation loss (nats / char)",
         title=f"small models trained at {length} for {sizes['ablation_steps']} steps")
    for ax, xs in ((axes[0], list(inference)), (axes[1], list(trained))):
        ax.set_xticks(xs, [str(w) for w in xs])
        ax.minorticks_off()
    run.save(fig, "window_ablation")
    insights = [f"On {eval_length}-character documents the model trained at {train_length} does best with window "
                f"{best_inference} ({inference[best_inference]:.3f} nats; full attention "
                f"{inference[max(inference)]:.3f}); trained at {length} with windows {list(trained)}: val loss "
                + ", ".join(f"{r['val_loss']:.3f}" for r in trained.values()) + "."]
    return {"eval_length": eval_length, "inference_loss": inference, "trained": trained,
            "smallest_window_within_0.02_of_full": min(close), "insights": insights}


def _swap_attention(model, window):
    """prepare() for train_lab_variant: put windowed attention modules (banded) in place of the causal ones,
    keeping their freshly initialised weights."""
    windowed = with_sliding_window(model, window, compute="banded")
    for block, new in zip(model.blocks, windowed.blocks):
        block.attn = new.attn
    return model


# ---------------------------------------------------------------------------------------------- 4
def curriculum(run, sizes) -> dict:
    """Equal tokens per step and in total: long throughout (B x L), short only (4B x L/4 ... ), or the
    curriculum (short for the first half of the steps, then long). Evaluated at both lengths."""
    c = sizes["curriculum"]
    short, long_, batch, steps = c["short"], c["long"], c["batch"], c["steps"]
    factor = long_ // short
    short_data = char_shakespeare_data(short, batch * factor, run.device, run.seed)
    long_data = char_shakespeare_data(long_, batch, run.device, run.seed)
    evaluation = validation_windows(run, [short, long_], sizes["eval_tokens"])
    results = {}
    for name in ("long throughout", "short then long", "short only"):
        torch.manual_seed(run.seed)
        model = MiniFormer(lab_model_config(short_data.vocab.size, context_length=long_, position="rope",
                                            **SMALL_MODEL)).to(run.device)
        short_data.generator.manual_seed(run.seed)
        long_data.generator.manual_seed(run.seed)
        switch = {"long throughout": 0, "short then long": steps // 2, "short only": steps}[name]
        drawn = [0]

        def batch_fn(split, switch=switch, model=model):
            # Training steps run in train mode, evaluation in eval mode: only training draws move the schedule.
            if split == "train" and model.training:
                drawn[0] += 1
                return (short_data if drawn[0] <= switch else long_data).batch_fn("train")
            return long_data.batch_fn(split)

        with Timer(run.device) as timer:
            history = train(model, batch_fn, short_schedule(steps), device=run.device)
        losses = {length: loss_per_position(model, *evaluation[length]).mean().item() for length in (short, long_)}
        results[name] = {"loss_short": losses[short], "loss_long": losses[long_], "train_seconds": timer.seconds,
                         "tokens": history.tokens_seen, "val_curve_steps": history.eval_steps,
                         "val_curve": history.val_loss}
        print(f"  {name:16s} {history.tokens_seen} tokens in {timer.seconds:.1f} s: loss at {short} "
              f"{losses[short]:.3f}, at {long_} {losses[long_]:.3f}")
    names = list(results)
    fig, axes = panels(1, 2, width=5.8, height=4.2,
                       title=f"At equal tokens, loss on {long_}-char documents: " + ", ".join(
                           f"{n} {results[n]['loss_long']:.3f}" for n in names))
    colors = ["tab:blue", "tab:orange", "tab:gray"]
    for color, name in zip(colors, names):
        axes[0].plot(results[name]["val_curve_steps"], results[name]["val_curve"], marker="o", markersize=3,
                     color=color, label=name)
    axes[0].axvline(steps // 2, color="black", linestyle=":", label="curriculum switches to long")
    axes[0].set(xlabel=f"step ({batch * long_} tokens each)", ylabel=f"val loss at {long_} (nats / char)",
                title="validation loss during training")
    axes[0].legend()
    offsets = np.arange(2)
    for i, (color, name) in enumerate(zip(colors, names)):
        values = [results[name]["loss_short"], results[name]["loss_long"]]
        axes[1].bar(offsets + (i - 1) * 0.27, values, width=0.27, color=color, label=name)
        for xpos, value in zip(offsets + (i - 1) * 0.27, values):
            axes[1].annotate(f"{value:.3f}", (xpos, value), ha="center", va="bottom", fontsize=7)
    axes[1].set_xticks(offsets, [f"{short}-char documents", f"{long_}-char documents"])
    axes[1].set(ylabel="validation loss (nats / char)", title="after training")
    low = min(min(r["loss_short"], r["loss_long"]) for r in results.values())
    high = max(max(r["loss_short"], r["loss_long"]) for r in results.values())
    axes[1].set_ylim(low - 0.1 * (high - low + 0.1), high + 0.15 * (high - low + 0.1))
    axes[1].legend(loc="upper right")
    run.save(fig, "curriculum")
    gap = results["short only"]["loss_long"] - results["long throughout"]["loss_long"]
    curriculum_gap = results["short then long"]["loss_long"] - results["long throughout"]["loss_long"]
    insights = [f"At equal tokens ({results['long throughout']['tokens']}), on {long_}-character documents: long "
                f"throughout {results['long throughout']['loss_long']:.3f}, short then long "
                f"{results['short then long']['loss_long']:.3f}, short only {results['short only']['loss_long']:.3f} "
                f"nats ({results['short only']['train_seconds'] / results['long throughout']['train_seconds']:.2f}x "
                f"the training time of long throughout for short only)."]
    verdicts = {
        "train_long_beats_extrapolation": {
            "claim": "extrapolation is hard, better to train on long sequences",
            "threshold": f"short-only loss at {long_} minus long-throughout loss at {long_} >= {TRAIN_LONG_MARGIN} nats",
            "measured": f"{gap:+.3f} nats", "verdict": "holds" if gap >= TRAIN_LONG_MARGIN else "fails"},
        "curriculum_matches_long": {
            "claim": "a short-then-long curriculum is as good as training long throughout, at equal tokens",
            "threshold": f"curriculum loss at {long_} within {CURRICULUM_TOLERANCE} nats of long throughout "
                         f"(better by more: holds too)",
            "measured": f"{curriculum_gap:+.3f} nats",
            "verdict": "holds" if curriculum_gap <= CURRICULUM_TOLERANCE else "fails"},
    }
    return {"short": short, "long": long_, "runs": results, "insights": insights, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- 5
class LookupReader:
    """16's KeyValueTask with one-character keys and values, as character batches for a small lab model.

    Training strings ask several questions about one list ('a:1,b:2|b=2|a=1'): each answer is a target,
    everything else is ignored (-100), so every string carries `queries` signals. Evaluation asks 16's
    single-question prompts, with the asked pair placed at a chosen distance from the question."""

    def __init__(self, max_pairs: int, queries: int, device):
        self.alphabet = string.ascii_lowercase + string.digits
        self.vocab = CharVocab(self.alphabet + "".join(sorted(FORMAT_CHARACTERS)))
        self.tasks = [KeyValueTask(num_pairs=p, key_length=1, value_length=1, alphabet=self.alphabet)
                      for p in range(1, max_pairs + 1)]
        self.queries, self.device = queries, device
        self.length = 4 * max_pairs + 4 * queries - 1  # "k:v," per pair, "|k=v" per question, minus the last comma
        self.end_id = int(self.vocab.encode(END)[0])

    def training_text(self, rng: random.Random) -> tuple[str, list[int]]:
        """A list of pairs and `queries` questions; returns the text and the indices of its answers."""
        pairs, _ = rng.choice(self.tasks).sample(rng).prompt[:-1].split("|")
        table = dict(pair.split(":") for pair in pairs.split(","))
        text, answers = pairs, []
        for _ in range(self.queries):
            key = rng.choice(sorted(table))
            text += f"|{key}="
            answers.append(len(text))
            text += table[key]
        return text, answers

    def batch_fn(self, batch_size: int, seed: int):
        rng = {"train": random.Random(seed), "val": random.Random(seed + 1)}

        def batch(split):
            x = torch.full((batch_size, self.length), self.end_id)
            y = torch.full((batch_size, self.length), -100)
            for row in range(batch_size):
                text, answers = self.training_text(rng[split])
                ids = self.vocab.encode(text)
                x[row, :len(ids) - 1] = ids[:-1]
                y[row, [a - 1 for a in answers]] = ids[answers]
            return x.to(self.device), y.to(self.device)

        return batch

    def prompts_at(self, num_pairs: int, index: int, count: int, seed: int) -> list[str]:
        """`count` single-question prompts of num_pairs pairs whose asked pair is pair number `index`."""
        task, prompts = KeyValueTask(num_pairs, 1, 1, self.alphabet), []
        for example in task.examples(count, seed=seed):
            pieces, key = example.prompt[:-1].split("|")
            pairs = pieces.split(",")  # in random order already
            asked = next(p for p in pairs if p.startswith(key + ":"))
            pairs.remove(asked)
            pairs.insert(index, asked)
            prompts.append(",".join(pairs) + f"|{key}=")
        return prompts

    @torch.no_grad()
    def accuracy(self, model, prompts: list[str]) -> float:
        """Greedy one-character answers checked by 16's KeyValueTask.check (prompts of one length per call)."""
        model.eval()
        ids = torch.stack([self.vocab.encode(p) for p in prompts]).to(self.device)
        answers = model(ids)[:, -1].argmax(-1).tolist()
        return float(np.mean([self.tasks[0].check(p, self.vocab.decode([a])) for p, a in zip(prompts, answers)]))


def ignore_masked_loss(model, x, y):
    """Cross-entropy on the answer positions only (targets -100 elsewhere)."""
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)


def retrieval(run, sizes) -> dict:
    r = sizes["reader"]
    reader = LookupReader(r["max_pairs"], r["queries"], run.device)
    torch.manual_seed(run.seed)
    model = MiniFormer(lab_model_config(reader.vocab.size, context_length=4 * r["eval_pairs"] + 4, position="rope",
                                        **SMALL_MODEL)).to(run.device)
    schedule = short_schedule(r["steps"], learning_rate=5e-3, eval_batches=4)
    with Timer(run.device) as timer:
        history = train(model, reader.batch_fn(32, run.seed), schedule, device=run.device,
                        loss_fn=ignore_masked_loss)
    print(f"  reader trained on up to {r['max_pairs']} pairs, {r['queries']} questions each, {r['steps']} steps in "
          f"{timer.seconds:.1f} s (answer loss {history.final_val_loss:.3f})")
    windowed = with_sliding_window(model, r["window"])
    pairs = r["eval_pairs"]
    distances, accuracy = [], {"full": [], "window": [], "retrieval": []}
    for index in range(pairs):
        prompts = reader.prompts_at(pairs, index, r["prompts"], seed=run.seed + index)
        distances.append(4 * (pairs - index) + 1)  # from the asked key to the '=' that must find it
        accuracy["full"].append(reader.accuracy(model, prompts))
        accuracy["window"].append(reader.accuracy(windowed, prompts))
        accuracy["retrieval"].append(reader.accuracy(model, [retrieval_prompt(p) for p in prompts]))
    order = np.argsort(distances)
    distances = [distances[i] for i in order]
    accuracy = {n: [a[i] for i in order] for n, a in accuracy.items()}
    beyond = [i for i, d in enumerate(distances) if d >= r["window"]]
    trained_span = reader.length
    within_training = [i for i, d in enumerate(distances) if d < trained_span]
    past_training = [i for i, d in enumerate(distances) if d >= trained_span]

    def mean(name, indices):
        return float(np.mean([accuracy[name][i] for i in indices])) if indices else float("nan")

    chance = 1 / len(reader.alphabet)
    labels = {"full": "full context", "window": f"window {r['window']}", "retrieval": "TF-IDF top-1 pair, then read"}
    fig, axes = panels(1, 1, width=8.0, height=4.6,
                       title=f"Accuracy beyond the window: full context {mean('full', beyond):.2f}, window "
                             f"{mean('window', beyond):.2f}, retrieval {mean('retrieval', beyond):.2f}")
    line(axes[0], distances, {labels[n]: a for n, a in accuracy.items()},
         styles={labels[n]: {"color": COLORS[n]} for n in accuracy},
         xlabel="distance from the asked key to the question (characters)", ylabel="answer accuracy",
         title=f"{pairs}-pair lookups, {r['prompts']} prompts per distance; reader trained on <= {r['max_pairs']} pairs")
    axes[0].axhline(chance, color="gray", linestyle="--", label=f"chance (1/{len(reader.alphabet)})")
    axes[0].axvline(r["window"], color=COLORS["window"], linestyle=":", label=f"window ({r['window']})")
    axes[0].axvline(trained_span, color="black", linestyle=":", label=f"longest training string ({trained_span})")
    axes[0].set_ylim(-0.03, 1.05)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    run.save(fig, "retrieval")
    gap = mean("retrieval", beyond) - mean("window", beyond)
    insights = [f"Key-value lookup over {pairs} pairs: beyond the window of {r['window']} characters the windowed "
                f"reader answers {mean('window', beyond):.2f} (chance {chance:.3f}), the full-context reader "
                f"{mean('full', within_training):.2f} within its training span and {mean('full', past_training):.2f} "
                f"past it, and the same reader given only the TF-IDF top pair {mean('retrieval', beyond):.2f}."]
    verdicts = {"retrieval_beats_window": {
        "claim": "retrieval is an alternative to long context: it recovers facts a short window cannot see",
        "threshold": f"mean accuracy beyond the window: retrieval - window >= {RETRIEVAL_MARGIN}",
        "measured": f"retrieval {mean('retrieval', beyond):.2f}, window {mean('window', beyond):.2f}, full context "
                    f"{mean('full', beyond):.2f}",
        "verdict": "holds" if gap >= RETRIEVAL_MARGIN else "fails"}}
    return {"distances": distances, "accuracy": accuracy, "window": r["window"], "chance": chance,
            "longest_training_string": trained_span, "reader_train_seconds": timer.seconds,
            "reader_answer_loss": history.final_val_loss,
            "mean_accuracy_beyond_window": {n: mean(n, beyond) for n in accuracy},
            "full_accuracy_within_and_past_training": [mean("full", within_training), mean("full", past_training)],
            "insights": insights, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- main
def main():
    parser = demo_parser(__doc__)
    args = parser.parse_args()
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if run.quick else "full"]
    data = char_shakespeare_data(sizes["train_length"], sizes["batch_size"], run.device, run.seed)

    print("\n1. memory and time of one attention layer (first: on a heap no training has grown)")
    cost = memory_and_time(run, sizes)
    print(f"\n2. context collapse: train at {sizes['train_length']} on {data.corpus}, evaluate longer")
    collapse, model = context_collapse(run, data, sizes)
    print("\n3. window-size ablation")
    ablation = window_ablation(run, model, sizes)
    print("\n4. context-length curriculum at equal tokens")
    schedule = curriculum(run, sizes)
    print("\n5. retrieval vs long context vs window on key-value lookup")
    lookup = retrieval(run, sizes)

    rows = [{"attention": n, **{f"loss@{L}": v for L, v in zip(collapse["lengths"], losses)},
             "longest/1x": collapse["ratio_longest_to_1x"][n]} for n, losses in collapse["loss"].items()]
    print_table(rows, title="Validation loss (nats/char) of one RoPE model on documents past its training length")
    experiments = (collapse, cost, ablation, schedule, lookup)
    insights, verdicts = report_findings(experiments)
    run.finish({"sizes": sizes, "corpus": data.corpus, "context_collapse": collapse, "memory_and_time": cost,
                "window_ablation": ablation, "curriculum": schedule, "retrieval": lookup,
                "key_insights": insights, "verdicts": verdicts})


if __name__ == "__main__":
    main()
