"""14 — Quantization: how few bits the trained lab model's weights need, and what each trick buys.

Experiments (all on 04's trained lab model: the "quick" preset with --quick, the "full" preset otherwise):
  1. grids: where the uniform int4 and the NF4 levels sit on the model's weights, the error of each, and
     int8 per tensor vs per channel when one weight is an outlier (break it).
  2. bits_and_groups: validation perplexity vs bits (8, 4, 3, 2) and group size for round-to-nearest, GPTQ
     and AWQ (calibrated on training batches), and NF4 with and without double quantization.
  3. memory: the bytes each quantized model really holds (and the GGUF files), against the formula.
  4. speed: a linear layer and the whole model, float32 vs our dequantize-on-the-fly int8 vs torch's
     dynamic int8 quantization (an fbgemm int8 kernel: a peer, not ours).
  5. qat: quantization-aware training at 2 bits against post-training quantization and a float fine-tune.
  6. sparsity: perplexity vs the fraction of weights pruned by magnitude, and the 2:4 pattern.
  7. gguf: export Q8_0 / Q4_0 files, read them back with the gguf package, compare with our model
     (and run llama.cpp when llama-cpp-python is installed).
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import copy
import math
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from demo_cli import demo_parser, print_table, report_findings, start_demo
from plotting import bar, line, panels
from runtime import time_function
from lab import short_schedule, trained_lab_model
from pruning import prune_model
from qat import prepare_qat
from quantization import NF4_CODE, quantize_nf4, quantize_tensor
from quantized_model import QuantizedLinear, linear_layers, model_bytes, quantize_model
from training import train

# Quick and full runs differ in these sizes only.
SIZES = {
    "quick": dict(preset="quick", val_batches=8, calibration_batches=4, bits=(8, 4, 3, 2), group_sizes=(None, 32),
                  qat_steps=40, sparsities=(0.0, 0.3, 0.5, 0.7, 0.9), speed_dim=512, speed_repeats=5),
    "full": dict(preset="full", val_batches=40, calibration_batches=16, bits=(8, 4, 3, 2),
                 group_sizes=(None, 64, 32, 16), qat_steps=300, sparsities=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                                            0.8, 0.9), speed_dim=2048,
                 speed_repeats=10),
}
METHOD_STYLES = {"rtn": {"color": "tab:red"}, "gptq": {"color": "tab:blue"}, "awq": {"color": "tab:green"},
                 "nf4": {"color": "tab:purple"}}
QAT_BITS = 2  # where round-to-nearest loses the most: the room QAT has to recover
# Thresholds of the verdicts, each written beside the claim it decides.
INT8_TARGET = 0.01  # "8-bit: minimal loss": int8 perplexity within 1% of float32 (the target)
MEMORY_RATIO_TARGET = 1.9  # "2x memory savings": at least 1.9x fewer bytes than the float16 model
RETAINED_TARGET = 0.99  # "4-bit: ~99% of performance": fp32 perplexity / 4-bit perplexity >= 0.99
GPTQ_TARGET = 0.5  # GPTQ's 4-bit perplexity increase at most half of round-to-nearest's (the target)
QAT_RECOVERY_TARGET = 0.5  # "QAT recovers the low-bit loss": it removes at least half of the perplexity that RTN
# adds to the float model fine-tuned for the same steps (the fair baseline: both saw the same extra training)


def group_label(group_size) -> str:
    return "per channel" if group_size is None else f"group {group_size}"


@torch.no_grad()
def evaluate(model, batches) -> dict:
    """Perplexity exp(mean cross-entropy) and next-character accuracy over fixed validation batches."""
    model.eval()
    losses, correct, count = [], 0, 0
    for x, y in batches:
        logits = model(x)  # (B, T, V)
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    return {"perplexity": math.exp(sum(losses) / len(losses)), "accuracy": correct / count}


def linear_weights(model) -> torch.Tensor:
    """Every block linear weight of the model, flattened into one vector."""
    return torch.cat([linear.weight.detach().reshape(-1) for *_, linear in linear_layers(model)])


# ---------------------------------------------------------------------------------------------- 1
def grids(run, model) -> dict:
    """The int4 and NF4 levels over the weights (normalised per block of 64), their error, and an outlier."""
    weights = linear_weights(model)
    blocks = weights.reshape(-1, 64)
    normalised = (blocks / blocks.abs().amax(dim=1, keepdim=True)).reshape(-1)  # in [-1, 1]
    matrix = weights.reshape(-1, 64)  # any matrix view works: each method sees the same 64-weight blocks

    def mse(quantized):
        return (quantized.dequantize() - matrix).pow(2).mean().item()

    errors = {"int4 absmax, block 64": mse(quantize_tensor(matrix, 4, "absmax", "channel")),
              "int4 zero-point, block 64": mse(quantize_tensor(matrix, 4, "zeropoint", "channel")),
              "NF4, block 64": mse(quantize_nf4(matrix, 64))}
    layer = linear_layers(model)[0][-1].weight.detach()  # the first block's qkv projection
    spiked = layer.clone()
    spiked[0, 0] = 50 * layer.abs().max()  # one outlier weight
    outlier = {}
    for label, weight in (("trained layer", layer), ("one weight x50", spiked)):
        outlier[label] = {granularity: (quantize_tensor(weight, 8, "absmax", granularity, group_size).dequantize()
                                        - weight)[1:].pow(2).mean().item()  # error of the rows without the spike
                          for granularity, group_size in (("tensor", None), ("channel", None), ("group", 32))}
    blowup = {g: outlier["one weight x50"][g] / outlier["trained layer"][g] for g in outlier["trained layer"]}
    nf4_levels = np.array(NF4_CODE)
    int4_levels = np.arange(-7, 8) / 7
    fig, axes = panels(1, 2, width=6.0, height=4.2,
                       title="4-bit mean squared error per weight, blocks of 64: " + ", ".join(
                           f"{name.split(',')[0]} {value:.2e}" for name, value in errors.items()))
    axes[0].hist(normalised.numpy(), bins=121, color="tab:gray", alpha=0.6, density=True, label="weights / block absmax")
    for index, (levels, color, name) in enumerate(((int4_levels, "tab:red", "int4 absmax levels"),
                                                   (nf4_levels, "tab:purple", "NF4 levels"))):
        axes[0].vlines(levels, 0.0 + index * 0.1, 0.25 + index * 0.1, color=color, linewidth=2, label=name,
                       transform=axes[0].get_xaxis_transform())
    axes[0].set(xlabel="weight / absmax of its block of 64", ylabel="density",
                title=f"{weights.numel():,} block linear weights of the lab model")
    axes[0].legend(loc="upper right")
    labels = ["per tensor", "per channel", "group 32"]
    positions = np.arange(len(labels))
    for offset, (name, values) in zip((-0.2, 0.2), outlier.items()):
        bars = axes[1].bar(positions + offset, list(values.values()), width=0.4, label=name)
        axes[1].bar_label(bars, fmt="%.1e", fontsize=7)
    axes[1].set_xticks(positions, labels)
    axes[1].set_yscale("log")
    axes[1].set(ylabel="int8 mean squared error, other rows (log scale)",
                title=f"int8, one {tuple(layer.shape)} layer: one outlier, per-tensor error x{blowup['tensor']:.0f}")
    axes[1].legend()
    run.save(fig, "grids")
    insights = [
        f"On the lab model's {weights.numel():,} block linear weights (blocks of 64), NF4's mean squared error is "
        f"{errors['NF4, block 64']:.2e} against {errors['int4 absmax, block 64']:.2e} for uniform int4 absmax and "
        f"{errors['int4 zero-point, block 64']:.2e} for int4 zero-point, at the same 4 bits per weight.",
        f"Break it: one weight set to 50x the layer's largest multiplies the int8 error of the OTHER rows by "
        f"{blowup['tensor']:.0f} with one scale per tensor, {blowup['channel']:.2f} per channel and "
        f"{blowup['group']:.2f} per group of 32: the outlier only stretches the grid it shares."]
    return {"mse_block_64": errors, "int8_outlier_mse": outlier, "outlier_error_factor": blowup, "insights": insights}


# ---------------------------------------------------------------------------------------------- 2
def bits_and_groups(run, model, val, calibration, sizes, baseline) -> dict:
    """Perplexity of every (method, bits, group size), plus NF4; the three claims about bits are decided here."""
    rows = []
    for method in ("rtn", "gptq", "awq"):
        for bits in sizes["bits"]:
            for group_size in sizes["group_sizes"]:
                quantized = quantize_model(model, method, bits, group_size, calibration=calibration)
                rows.append({"method": method, "bits": bits, "group_size": group_size, **evaluate(quantized, val),
                             "linear_weight_bytes": model_bytes(quantized)["linear_weights"]})
            print(f"  {method} {bits}-bit: " + ", ".join(f"{group_label(r['group_size'])} {r['perplexity']:.3f}"
                                                       for r in rows[-len(sizes['group_sizes']):]))
    for block, double in ((64, False), (64, True), (32, False)):
        quantized = quantize_model(model, "nf4", 4, block, double_quant=double)
        rows.append({"method": "nf4", "bits": 4, "group_size": block, "double_quant": double,
                     **evaluate(quantized, val), "linear_weight_bytes": model_bytes(quantized)["linear_weights"]})
    int8_absmax = evaluate(quantize_model(model, "rtn", 8, scheme="absmax"), val)
    fp = baseline["perplexity"]

    def find(method, bits, group_size):
        return next(r for r in rows if (r["method"], r["bits"], r["group_size"]) == (method, bits, group_size))

    groups = sizes["group_sizes"]
    fig, axes = panels(1, 2, width=6.2, height=4.5)
    series, styles = {}, {}
    for method in ("rtn", "gptq", "awq"):
        for group_size, dash in ((None, "-"), (groups[-1], "--")):
            label = f"{method.upper()}, {group_label(group_size)}"
            series[label] = [find(method, b, group_size)["perplexity"] for b in sizes["bits"]]
            styles[label] = {**METHOD_STYLES[method], "linestyle": dash}
    line(axes[0], list(sizes["bits"]), series, styles=styles, xlabel="bits per weight (codes)",
         ylabel="validation perplexity", title="perplexity vs bits")
    nf4 = [r for r in rows if r["method"] == "nf4"]
    axes[0].scatter([4] * len(nf4), [r["perplexity"] for r in nf4], color="tab:purple", marker="*", s=70, zorder=3,
                    label="NF4 (block 64, 64 + double quant, 32)")
    axes[0].axhline(fp, color="black", linestyle=":", label=f"float32 ({fp:.3f})")
    axes[0].set_xticks(list(sizes["bits"]))
    axes[0].invert_xaxis()
    axes[0].legend(fontsize=7)
    low_bits = [b for b in sizes["bits"] if b <= 4]
    x_positions = list(range(len(groups)))
    group_series, group_styles = {}, {}
    for bits, dash in zip(low_bits, ("-", "--", ":")):
        for method in ("rtn", "gptq"):
            label = f"{method.upper()} {bits}-bit"
            group_series[label] = [100 * (find(method, bits, g)["perplexity"] / fp - 1) for g in groups]
            group_styles[label] = {**METHOD_STYLES[method], "linestyle": dash}
    line(axes[1], x_positions, group_series, styles=group_styles, xlabel="weights sharing one scale",
         ylabel="perplexity increase over float32 (%)", title="perplexity increase vs group size")
    axes[1].set_yscale("symlog", linthresh=0.1)
    axes[1].set_ylabel("increase over float32 (%, symlog)")
    axes[1].set_xticks(x_positions, [group_label(g) for g in groups])
    rtn4, gptq4 = find("rtn", 4, None), find("gptq", 4, None)
    rtn_increase, gptq_increase = rtn4["perplexity"] - fp, gptq4["perplexity"] - fp
    gptq_ratio = gptq_increase / rtn_increase if rtn_increase > 0 else float("nan")
    fig.suptitle(f"Perplexity increase per channel: 4-bit RTN {100 * rtn_increase / fp:+.2f}%, GPTQ "
                 f"{100 * gptq_increase / fp:+.2f}%; 2-bit RTN "
                 f"{100 * (find('rtn', 2, None)['perplexity'] / fp - 1):+.1f}%, GPTQ "
                 f"{100 * (find('gptq', 2, None)['perplexity'] / fp - 1):+.1f}%", fontsize=12, fontweight="bold")
    run.save(fig, "perplexity_vs_bits")

    int8 = find("rtn", 8, None)
    int8_increase = int8_absmax["perplexity"] / fp - 1
    four_bit = [r for r in rows if r["bits"] == 4]
    retained = {f"{r['method']} {group_label(r['group_size'])}" + (" +DQ" if r.get("double_quant") else ""):
                fp / r["perplexity"] for r in four_bit}
    holding = [name for name, value in retained.items() if value >= RETAINED_TARGET]
    worst = min(retained, key=retained.get)
    accuracy_retained = {f"{r['method']} {group_label(r['group_size'])}": r["accuracy"] / baseline["accuracy"]
                         for r in four_bit if not r.get("double_quant")}
    verdicts = {
        "int8_minimal_loss": {
            "claim": "8-bit: minimal loss",
            "threshold": f"int8 (absmax, per channel, round to nearest) perplexity within {INT8_TARGET:.0%} of float32",
            "measured": f"{int8_absmax['perplexity']:.4f} vs {fp:.4f} ({100 * int8_increase:+.3f}%); zero-point "
                        f"{int8['perplexity']:.4f}",
            "verdict": "holds" if int8_increase <= INT8_TARGET else "fails"},
        "four_bit_99_percent": {
            "claim": "4-bit: ~99% of performance",
            "threshold": f"performance = float32 perplexity / 4-bit perplexity >= {RETAINED_TARGET}; holds if every "
                         f"4-bit variant measured reaches it, depends if some do, fails if none",
            "measured": f"{len(holding)} of {len(retained)} variants; worst {worst} {retained[worst]:.4f}; "
                        f"next-character accuracy retained {min(accuracy_retained.values()):.4f} to "
                        f"{max(accuracy_retained.values()):.4f}",
            "verdict": "holds" if len(holding) == len(retained) else "depends" if holding else "fails"},
        "gptq_halves_rtn_loss": {
            "claim": "target: 4-bit GPTQ's perplexity increase at most half of round-to-nearest's",
            "threshold": f"per channel, zero-point: (GPTQ - fp32) / (RTN - fp32) <= {GPTQ_TARGET}",
            "measured": f"RTN {rtn_increase:+.4f}, GPTQ {gptq_increase:+.4f} (ratio {gptq_ratio:.2f}); with "
                        f"{group_label(groups[-1])}: RTN {find('rtn', 4, groups[-1])['perplexity'] - fp:+.4f}, GPTQ "
                        f"{find('gptq', 4, groups[-1])['perplexity'] - fp:+.4f}",
            "verdict": ("depends" if not rtn_increase > 0  # RTN lost nothing: there is no increase to halve
                        else "holds" if gptq_ratio <= GPTQ_TARGET else "fails")},
    }
    best = {b: min((r for r in rows if r["bits"] == b), key=lambda r: r["perplexity"]) for b in sizes["bits"]}
    insights = [
        f"int8 per channel costs {100 * int8_increase:+.3f}% perplexity ({int8_absmax['perplexity']:.4f} vs "
        f"{fp:.4f}).",
        "Best variant per bit width (perplexity, float32 " + f"{fp:.3f}): " + "; ".join(
            f"{b}-bit {r['method'].upper()} {group_label(r['group_size'])} {r['perplexity']:.3f}"
            for b, r in best.items()) + ".",
        f"GPTQ's 4-bit per-channel increase is {gptq_ratio:.2f}x RTN's ({gptq_increase:+.4f} vs {rtn_increase:+.4f}); "
        f"at 3 bits per channel RTN {find('rtn', 3, None)['perplexity']:.3f}, GPTQ "
        f"{find('gptq', 3, None)['perplexity']:.3f}, AWQ {find('awq', 3, None)['perplexity']:.3f}.",
        "NF4 (block 64) " + f"{nf4[0]['perplexity']:.3f}, with double quantization {nf4[1]['perplexity']:.3f} "
        f"({nf4[0]['linear_weight_bytes']:,} -> {nf4[1]['linear_weight_bytes']:,} bytes of linear weights); "
        f"int4 zero-point group 64 RTN {find('rtn', 4, 64)['perplexity']:.3f}." if 64 in groups else
        f"NF4 (block 64) {nf4[0]['perplexity']:.3f}, with double quantization {nf4[1]['perplexity']:.3f}."]
    return {"float32": baseline, "int8_absmax_per_channel": int8_absmax, "runs": rows, "retained_4bit": retained,
            "gptq_over_rtn_increase_4bit": gptq_ratio, "insights": insights, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- 3
def memory(run, model, gguf_sizes: dict) -> dict:
    """Measured bytes of each variant (and GGUF files) against the bits-per-weight formula."""
    variants = {"float32": model, "float16": copy.deepcopy(model).half(),
                "int8 per channel": quantize_model(model, "rtn", 8, scheme="absmax"),
                "int4 group 32": quantize_model(model, "rtn", 4, 32),
                "NF4 block 64": quantize_model(model, "nf4", 4, 64),
                "NF4 + double quant": quantize_model(model, "nf4", 4, 64, double_quant=True),
                "3-bit group 32": quantize_model(model, "rtn", 3, 32),
                "2-bit group 32": quantize_model(model, "rtn", 2, 32)}
    measured = {name: model_bytes(m) for name, m in variants.items()}
    weights = linear_weights(model).numel()
    # formula: bits per weight = code bits (in their container) + scale and zero bits / group size
    formula = {"float32": 32, "float16": 16, "int8 per channel": 8 + _per_channel_overhead(model), "int4 group 32": 4 + (16 + 8) / 32, "NF4 block 64": 4 + 32 / 64,
               "NF4 + double quant": 4 + 8 / 64 + 32 / (64 * 256), "3-bit group 32": 4 + (16 + 8) / 32,
               "2-bit group 32": 2 + (16 + 8) / 32}
    bits_per_weight = {name: 8 * m["linear_weights"] / weights for name, m in measured.items()}
    total_kib = {name: m["total"] / 1024 for name, m in measured.items()}
    files_kib = {f"GGUF {qtype} file": size / 1024 for qtype, size in gguf_sizes.items()}
    fig, axes = panels(1, 2, width=6.4, height=4.5)
    names = list(total_kib) + list(files_kib)
    colors = ["tab:gray"] * 2 + ["tab:blue"] * (len(total_kib) - 2) + ["tab:orange"] * len(files_kib)
    bar(axes[0], names, [*total_kib.values(), *files_kib.values()], ylabel="bytes held (KiB)", rotate=35,
        annotate_fmt="{:.0f}", color=colors, title="whole model: measured bytes (orange: files on disk)")
    x = np.arange(len(bits_per_weight))
    axes[1].bar(x - 0.2, list(bits_per_weight.values()), width=0.4, label="measured (bytes x 8 / weights)")
    axes[1].bar(x + 0.2, [formula[n] for n in bits_per_weight], width=0.4, label="formula", color="tab:gray", alpha=0.6)
    axes[1].set_xticks(x, list(bits_per_weight), rotation=35, ha="right")
    axes[1].set(ylabel="bits per linear weight", title="linear weights: codes + scales + zeros")
    axes[1].set_yscale("log", base=2)
    axes[1].set_yticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
    axes[1].legend()
    ratio_fp16 = {key: measured["float16"][key] / measured["int8 per channel"][key] for key in ("linear_weights", "total")}
    ratio_fp32 = {key: measured["float32"][key] / measured["int8 per channel"][key] for key in ("linear_weights", "total")}
    fig.suptitle(f"int8 holds {ratio_fp16['linear_weights']:.2f}x fewer linear-weight bytes than float16 "
                 f"({ratio_fp16['total']:.2f}x for the whole model); int4 group 32 "
                 f"{bits_per_weight['int4 group 32']:.2f} bits per weight", fontsize=12, fontweight="bold")
    run.save(fig, "memory")
    both = all(r >= MEMORY_RATIO_TARGET for r in ratio_fp16.values())
    verdicts = {"int8_2x_memory": {
        "claim": "8-bit: 2x memory savings",
        "threshold": f"int8 model bytes <= float16 bytes / {MEMORY_RATIO_TARGET}; holds for linear weights and the "
                     f"whole model, depends if for the linear weights only",
        "measured": f"float16 / int8: linear weights {ratio_fp16['linear_weights']:.2f}x, whole model "
                    f"{ratio_fp16['total']:.2f}x (float32 / int8: {ratio_fp32['linear_weights']:.2f}x, "
                    f"{ratio_fp32['total']:.2f}x)",
        "verdict": "holds" if both else "depends" if ratio_fp16["linear_weights"] >= MEMORY_RATIO_TARGET else "fails"}}
    kept = measured["float32"]["total"] - measured["float32"]["linear_weights"]
    insights = ["Measured bytes per linear weight: " + ", ".join(f"{n} {v:.2f} bits" for n, v in bits_per_weight.items())
                + f". The rest of the model (embeddings, norms, biases: {kept / 1024:.0f} KiB in float32) is not "
                "quantized, so the whole model shrinks less: int8 " + f"{ratio_fp32['total']:.2f}x, int4 group 32 "
                f"{measured['float32']['total'] / measured['int4 group 32']['total']:.2f}x smaller than float32."]
    return {"bytes": measured, "bits_per_linear_weight": bits_per_weight, "formula_bits_per_weight": formula,
            "gguf_file_bytes": gguf_sizes, "float16_over_int8": ratio_fp16, "float32_over_int8": ratio_fp32,
            "insights": insights, "verdicts": verdicts}


def _per_channel_overhead(model) -> float:
    """Formula bits per weight of one float16 scale per output row, averaged over the block linear layers."""
    layers = [linear for *_, linear in linear_layers(model)]
    return sum(16 * m.out_features for m in layers) / sum(m.weight.numel() for m in layers)


# ---------------------------------------------------------------------------------------------- 4
def speed(run, model, val, sizes) -> dict:
    """Milliseconds per call: float32, ours (int8 codes dequantized at every call), torch's dynamic int8 kernel."""
    from torch.ao.quantization import quantize_dynamic  # deprecated in torch 2.13 but still shipped

    dim, repeats = sizes["speed_dim"], sizes["speed_repeats"]
    torch.manual_seed(run.seed)
    layer = nn.Linear(dim, dim).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_int8_layer = quantize_dynamic(nn.Sequential(copy.deepcopy(layer)), {nn.Linear}, dtype=torch.qint8)
        torch_int8_model = quantize_dynamic(copy.deepcopy(model).cpu(), {nn.Linear}, dtype=torch.qint8)
    our_layer = QuantizedLinear(quantize_tensor(layer.weight.detach(), 8, "absmax"), layer.bias)
    our_model = quantize_model(model, "rtn", 8, scheme="absmax")
    results = {}
    for tokens in (1, 64):
        x = torch.randn(tokens, dim)
        with torch.no_grad():
            results[f"linear {dim}x{dim}, {tokens} token(s)"] = {
                name: 1e3 * time_function(lambda f=f: f(x), "cpu", repeats=repeats)
                for name, f in (("float32", layer), ("ours int8 (dequantize per call)", our_layer),
                                ("torch dynamic int8", torch_int8_layer))}
    x = val[0][0].cpu()
    with torch.no_grad():
        cpu_model = copy.deepcopy(model).cpu()
        results[f"lab model, batch {tuple(x.shape)}"] = {
            name: 1e3 * time_function(lambda f=f: f(x), "cpu", repeats=repeats)
            for name, f in (("float32", cpu_model), ("ours int8 (dequantize per call)", our_model.cpu()),
                            ("torch dynamic int8", torch_int8_model))}
        torch_int8_quality = evaluate(torch_int8_model, [(a.cpu(), b.cpu()) for a, b in val])
    fig, axes = panels(1, len(results), width=4.4, height=4.0)
    for ax, (case, times) in zip(axes, results.items()):
        bar(ax, ["float32", "ours int8", "torch int8"], list(times.values()), ylabel="milliseconds per call",
            title=case, annotate_fmt="{:.3g}", color=["tab:gray", "tab:blue", "tab:orange"])
    big = results[f"linear {dim}x{dim}, 1 token(s)"]
    fig.suptitle(f"One token through a {dim}x{dim} layer: torch's int8 kernel "
                 f"{big['float32'] / big['torch dynamic int8']:.2f}x the float32 speed, our dequantize-per-call "
                 f"int8 {big['float32'] / big['ours int8 (dequantize per call)']:.2f}x (CPU, shared cores)",
                 fontsize=12, fontweight="bold")
    fig.tight_layout()
    run.save(fig, "speed")
    insights = ["Speed (CPU, shared cores; float32 time / int8 time): " + "; ".join(
        f"{case}: torch's int8 kernel {t['float32'] / t['torch dynamic int8']:.2f}x, ours "
        f"{t['float32'] / t['ours int8 (dequantize per call)']:.2f}x" for case, t in results.items())
        + ". Ours saves memory only: without an int8 matmul kernel it rebuilds the float weight at every call."]
    return {"milliseconds": results, "torch_dynamic_int8_quality": torch_int8_quality, "insights": insights}


# ---------------------------------------------------------------------------------------------- 5
def qat(run, trained, val, calibration, sizes, baseline) -> dict:
    """2-bit per-channel: RTN, GPTQ, a float fine-tune then RTN (the control: same extra steps), and QAT."""
    steps, model, data = sizes["qat_steps"], trained.model, trained.data
    schedule = short_schedule(steps, learning_rate=3e-4, min_lr_fraction=0.1, eval_interval=max(1, steps // 4),
                              eval_batches=5)
    histories = {}
    for name, prepare in (("float fine-tune", lambda m: m), ("QAT", lambda m: prepare_qat(m, QAT_BITS))):
        torch.manual_seed(run.seed)
        data.generator.manual_seed(run.seed + 7)  # both see the same batches
        tuned = prepare(copy.deepcopy(model)).train()
        histories[name] = (tuned, train(tuned, data.batch_fn, schedule, device=run.device))
    qat_model = histories["QAT"][0].eval()
    plain = copy.deepcopy(model)
    plain.load_state_dict(qat_model.state_dict())  # QATLinear keeps nn.Linear's parameter names
    converted = quantize_model(plain, "rtn", QAT_BITS)
    x = val[0][0]
    with torch.no_grad():
        forward_gap = (qat_model(x) - converted(x)).abs().max().item()
    results = {"float32": baseline,
               "RTN": evaluate(quantize_model(model, "rtn", QAT_BITS), val),
               "GPTQ": evaluate(quantize_model(model, "gptq", QAT_BITS, calibration=calibration), val),
               "float fine-tune (float32)": evaluate(histories["float fine-tune"][0], val),
               "float fine-tune, then RTN": evaluate(quantize_model(histories["float fine-tune"][0], "rtn", QAT_BITS),
                                                     val),
               "QAT, then RTN": evaluate(converted, val)}
    fp, rtn = baseline["perplexity"], results["RTN"]["perplexity"]
    tuned, control = results["float fine-tune (float32)"]["perplexity"], results["float fine-tune, then RTN"]["perplexity"]
    qat_perplexity = results["QAT, then RTN"]["perplexity"]
    recovered = (control - qat_perplexity) / (control - tuned)  # of the 2-bit loss at equal training
    fig, axes = panels(1, 2, width=6.0, height=4.3)
    names = list(results)
    bar(axes[0], names, [r["perplexity"] for r in results.values()], ylabel="validation perplexity", rotate=25,
        annotate_fmt="{:.3f}",
        color=["tab:gray", "tab:red", "tab:blue", "tab:gray", "tab:olive", "tab:green"],
        title=f"{QAT_BITS}-bit per channel (grey: float32)")
    axes[0].set_ylim(0.9 * min(fp, tuned), None)
    for name, (_, history) in histories.items():
        axes[1].plot(history.eval_steps, history.val_loss, marker="o", label=name)
    axes[1].set(xlabel="fine-tuning step", ylabel="validation loss during training (nats / char)",
                title="QAT's loss is measured through the 2-bit weights")
    axes[1].legend()
    fig.suptitle(f"After {steps} more steps: float {tuned:.2f}, float then {QAT_BITS}-bit RTN {control:.2f}, "
                 f"{QAT_BITS}-bit QAT {qat_perplexity:.2f} ({recovered:.0%} of the {QAT_BITS}-bit loss removed)",
                 fontsize=12, fontweight="bold")
    run.save(fig, "qat")
    verdicts = {"qat_recovers_low_bit_loss": {
        "claim": f"QAT recovers the {QAT_BITS}-bit loss of post-training quantization",
        "threshold": f"with the same extra steps, QAT removes >= {QAT_RECOVERY_TARGET:.0%} of the perplexity that RTN "
                     f"adds to the fine-tuned float model: (RTN(tuned) - QAT) / (RTN(tuned) - tuned) >= "
                     f"{QAT_RECOVERY_TARGET}",
        "measured": f"removed {recovered:.0%}: tuned float {tuned:.3f}, RTN of it {control:.3f}, QAT {qat_perplexity:.3f} "
                    f"(original float {fp:.3f}, its RTN {rtn:.3f}, GPTQ {results['GPTQ']['perplexity']:.3f})",
        "verdict": "holds" if recovered >= QAT_RECOVERY_TARGET else "fails"}}
    insights = [f"At {QAT_BITS} bits per channel: RTN {rtn:.3f}, GPTQ {results['GPTQ']['perplexity']:.3f} (float32 "
                f"{fp:.3f}). {steps} more training steps: float {tuned:.3f}, then RTN {control:.3f}; QAT for the same "
                f"steps {qat_perplexity:.3f}, {recovered:.0%} of that 2-bit loss removed. The QAT model's forward and "
                f"the quantized model's differ by at most {forward_gap:.1e} in the logits."]
    return {"bits": QAT_BITS, "steps": steps, "results": results, "recovered_fraction": recovered,
            "qat_vs_quantized_max_logit_difference": forward_gap,
            "training_val_loss": {n: {"steps": h.eval_steps, "val_loss": h.val_loss} for n, (_, h) in histories.items()},
            "insights": insights, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- 6
def sparsity(run, model, val, sizes, baseline) -> dict:
    """Perplexity vs the fraction of block linear weights set to zero (unstructured magnitude, and 2:4)."""
    curve = {}
    for fraction in sizes["sparsities"]:
        pruned = copy.deepcopy(model)
        measured = prune_model(pruned, fraction)
        curve[fraction] = {"measured_sparsity": measured, **evaluate(pruned, val)}
    two_four = copy.deepcopy(model)
    two_four_result = {"measured_sparsity": prune_model(two_four, pattern="2:4"), **evaluate(two_four, val)}
    fractions = list(curve)
    fig, axes = panels(1, 1, width=7.0, height=4.5)
    line(axes[0], [100 * f for f in fractions], {"unstructured magnitude": [r["perplexity"] for r in curve.values()]},
         xlabel="block linear weights set to zero (%)", ylabel="validation perplexity", title="")
    axes[0].scatter([50], [two_four_result["perplexity"]], color="tab:red", marker="s", zorder=3,
                    label=f"2:4 ({two_four_result['perplexity']:.2f})")
    axes[0].axhline(baseline["perplexity"], color="black", linestyle=":", label=f"dense ({baseline['perplexity']:.2f})")
    axes[0].legend()
    half = curve.get(0.5, {}).get("perplexity", float("nan"))
    axes[0].set_title(f"50% of the weights pruned: unstructured {half:.2f}, 2:4 {two_four_result['perplexity']:.2f}, "
                      f"dense {baseline['perplexity']:.2f}", fontsize=12, fontweight="bold")
    run.save(fig, "sparsity")
    within = 0.0  # the largest sparsity up to which every measured point stays within 1% of dense
    for fraction in fractions:
        if curve[fraction]["perplexity"] > baseline["perplexity"] * 1.01:
            break
        within = fraction
    insights = [f"Magnitude pruning keeps perplexity within 1% of dense up to {100 * within:.0f}% sparsity; "
                f"perplexity at " + ", ".join(f"{100 * f:.0f}%: {r['perplexity']:.2f}" for f, r in curve.items())
                + f". 2:4 (50%) {two_four_result['perplexity']:.2f} vs unstructured 50% {half:.2f}: the fixed "
                + ("pattern costs more than choosing the zeros freely." if two_four_result["perplexity"] > half
                   else "pattern costs no more than choosing the zeros freely.")]
    return {"unstructured": curve, "two_four": two_four_result, "insights": insights}


# ---------------------------------------------------------------------------------------------- 7
def gguf_round_trip(run, trained, val, out_dir) -> dict:
    """Write F32 / Q8_0 / Q4_0 GGUF files, read each back with gguf's reader, compare with our quantized model."""
    try:
        import gguf
        from gguf_export import export_gguf, ggml_quantize, load_gguf, quantize_model_ggml
    except ImportError as error:
        message = f"GGUF export skipped: the gguf package is not installed ({error}); pip install gguf"
        print(f"  {message}")
        return {"skipped": message, "file_bytes": {}, "insights": [message]}
    model = copy.deepcopy(trained.model).cpu()  # files are written and read on the CPU
    val = [(x.cpu(), y.cpu()) for x, y in val]
    results, file_bytes = {}, {}
    weight = linear_layers(model)[0][-1].weight.detach()
    identical = {qtype: bool(np.array_equal(ggml_quantize(weight, qtype).blocks.numpy(), gguf.quants.quantize(
        weight.numpy(), getattr(gguf.GGMLQuantizationType, qtype)))) for qtype in ("Q8_0", "Q4_0")}
    for qtype in ("F32", "Q8_0", "Q4_0"):
        path = export_gguf(model, pathlib.Path(out_dir) / f"lab-{qtype}.gguf", qtype, trained.data.vocab.chars)
        loaded, _ = load_gguf(path)
        ours = model if qtype == "F32" else quantize_model_ggml(model, qtype)
        with torch.no_grad():
            gap = max((loaded(x) - ours(x)).abs().max().item() for x, _ in val[:2])
        file_bytes[qtype] = path.stat().st_size
        results[qtype] = {"file_bytes": file_bytes[qtype], "max_logit_difference_read_back_vs_ours": gap,
                          **evaluate(loaded, val)}
        print(f"  {qtype}: {file_bytes[qtype]:,} bytes, perplexity {results[qtype]['perplexity']:.4f}, read back "
              f"vs ours max |logit difference| {gap:.1e}")
    try:
        import llama_cpp  # noqa: F401
        llama = "llama-cpp-python is installed, but this lab model's character vocabulary has no llama.cpp " \
                "tokenizer, so it is not run"
    except ImportError:
        llama = "llama.cpp comparison skipped: llama-cpp-python is not installed (no prebuilt wheel on this machine)"
    print(f"  {llama}")
    insights = [f"GGUF: our Q8_0 / Q4_0 blocks are byte-identical to gguf.quants ({identical}); files of "
                + ", ".join(f"{q} {b / 1024:.0f} KiB" for q, b in file_bytes.items()) + ", read back by gguf's own "
                "reader into models with perplexity " + ", ".join(f"{q} {r['perplexity']:.4f}" for q, r in results.items())
                + f" (largest logit difference from our model "
                f"{max(r['max_logit_difference_read_back_vs_ours'] for r in results.values()):.1e})."]
    return {"files": results, "file_bytes": file_bytes, "byte_identical_to_gguf_quants": identical,
            "llama_cpp": llama, "insights": insights}


# ---------------------------------------------------------------------------------------------- main
def main():
    parser = demo_parser(__doc__)
    args = parser.parse_args()
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if run.quick else "full"]
    trained = trained_lab_model(sizes["preset"], run.device, run.seed)
    model, data = trained.model, trained.data
    data.generator.manual_seed(run.seed + 1)
    val = [data.batch_fn("val") for _ in range(sizes["val_batches"])]
    data.generator.manual_seed(run.seed + 2)
    calibration = [data.batch_fn("train")[0] for _ in range(sizes["calibration_batches"])]
    baseline = evaluate(model, val)
    print(f"  float32: perplexity {baseline['perplexity']:.4f}, accuracy {baseline['accuracy']:.4f} on "
          f"{sizes['val_batches'] * data.batch_size * data.context_length:,} validation characters")

    print("\n1. grids")
    grid = grids(run, model.cpu())
    model.to(run.device)
    print("\n2. perplexity vs bits and group size")
    bits = bits_and_groups(run, model, val, calibration, sizes, baseline)
    print("\n7. GGUF export and read-back")
    with tempfile.TemporaryDirectory() as folder:
        exported = gguf_round_trip(run, trained, val, folder)
    print("\n3. memory")
    mem = memory(run, model, exported["file_bytes"])
    print("\n4. speed")
    fast = speed(run, model, val, sizes)
    print(f"\n5. quantization-aware training at {QAT_BITS} bits")
    trained_qat = qat(run, trained, val, calibration, sizes, baseline)
    print("\n6. sparsity")
    sparse = sparsity(run, model, val, sizes, baseline)

    rows = [{"method": r["method"], "bits": r["bits"], "scale per": group_label(r["group_size"]) if r["method"] != "nf4"
             else f"block {r['group_size']}" + (" +DQ" if r.get("double_quant") else ""),
             "perplexity": r["perplexity"], "vs fp32 %": 100 * (r["perplexity"] / baseline["perplexity"] - 1),
             "accuracy": r["accuracy"], "linear KiB": r["linear_weight_bytes"] / 1024} for r in bits["runs"]]
    print_table(rows, title=f"Validation perplexity of the '{sizes['preset']}' lab model (float32 "
                            f"{baseline['perplexity']:.4f}), quantized linear layers")
    experiments = (grid, bits, exported, mem, fast, trained_qat, sparse)
    insights, verdicts = report_findings(experiments)
    run.finish({"sizes": sizes, "lab_model": trained.record, "validation_characters":
                sizes["val_batches"] * data.batch_size * data.context_length, "grids": grid,
                "bits_and_groups": bits, "memory": mem, "speed": fast, "qat": trained_qat, "sparsity": sparse,
                "gguf": exported, "key_insights": insights, "verdicts": verdicts})


if __name__ == "__main__":
    main()
