"""09 — MHA, GQA, MQA, MLA: how much KV cache each costs, and what it costs in quality and speed.

Experiments:
  1. cache_bytes: KV-cache bytes per token, formula beside what the caches measurably hold, for the lab-size
     variants (fp32) and for Llama-2-7B, Llama-3-8B, Mistral-7B and DeepSeek-V2 (bf16; their attention
     layers built on torch's "meta" device, which runs the real code on shapes without allocating memory).
  2. quality_vs_cache (the key figure): the lab model at 8 heads with 8, 4, 2, 1 KV heads and MLA at two
     latent ranks, parameters held equal (the FFN width absorbs the difference), same seed and batches:
     validation loss against cache bytes per token; a second seed of MHA measures the seed-to-seed spread.
  3. decode_vs_context: time per generated token and cache memory against the cached context length, for
     MHA, GQA, MQA and MLA on its naive and absorbed paths (random weights: speed does not depend on them).
  4. conversion: experiment 2's trained 8-head MHA converted to GQA-2 and MQA by mean-pooling, first head
     and random init, before and after a short uptraining, beside MHA given the same extra steps and the
     GQA-2 / MQA models trained from scratch.
  5. progression: basic -> SDPA -> KV cache -> GQA -> MLA without RoPE -> MLA with decoupled RoPE ->
     absorbed MLA, on one lab size (RoPE everywhere except stage 5, which uses learned positions):
     validation loss, training and decode tokens/s, cache bytes per token.
  6. break_it: RoPE on the whole key makes absorption wrong; the absorbed path with SDPA's default scale;
     04's ConcatKVCache handed MLA's latent.
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: E402,F401  (puts every NN_topic folder on sys.path)

import math  # noqa: E402
import statistics  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from demo_cli import demo_parser, print_table, start_demo  # noqa: E402
from gqa import (PUBLISHED_CONFIGS, convert_to_gqa, held_bytes, kv_cache_bytes_per_token,  # noqa: E402
                 mla_cache_bytes_per_token)
from lab import char_shakespeare_data, lab_model_config, short_schedule, train_lab_variant  # noqa: E402
from lab import fixed_validation_windows, unigram_loss, validation_loss  # noqa: E402
from mla import LatentKVCache, MultiHeadLatentAttention, register_mla, use_absorbed_path  # noqa: E402
from plotting import bar, line, panels  # noqa: E402
from positional_embeddings import apply_rope  # noqa: E402
from runtime import Timer, time_function  # noqa: E402
from training import train  # noqa: E402
from transformer import AttentionContext, CausalSelfAttention, ConcatKVCache, MiniFormer, TransformerConfig  # noqa: E402

# Quick and full runs differ in these sizes only.
SIZES = {
    "quick": dict(steps=10, val_batches=4, uptrain_steps=4, timing_steps=4, contexts=(64, 256), decode_steps=2,
                  repeats=1),
    "full": dict(steps=200, val_batches=12, uptrain_steps=60, timing_steps=10, contexts=(64, 256, 1024, 4096),
                 decode_steps=4, repeats=1),
}
NUM_HEADS = 8  # the 8-head lab variant: head dim 128 / 8 = 16
ROPE_HEAD_DIM = 8  # DeepSeek-V2's ratio: d_rope = d_h / 2
MLA_RANKS = (32, 64)  # d_c = 2 d_h and 4 d_h (DeepSeek-V2: 512 = 4 d_h)
GQA_KV_HEADS = (8, 4, 2, 1)
UPTRAIN_LR = 3e-4  # between the end (1e-4) and the peak (1e-3) of the schedule the model was trained with
# Verdict thresholds, written where they are used:
KEEPS_MOST_QUALITY = 0.95  # GQA keeps "most of the quality": >= 95% of MHA's loss reduction below the unigram level
COLORS = {"MHA": "tab:red", "GQA-4": "tab:orange", "GQA-2": "tab:green", "MQA": "tab:blue",
          "MLA-32": "tab:purple", "MLA-64": "tab:brown"}


def kv_label(kv_heads: int) -> str:
    return {NUM_HEADS: "MHA", 1: "MQA"}.get(kv_heads, f"GQA-{kv_heads}")


def gqa_overrides(kv_heads: int, position: str = "rope") -> dict:
    return dict(num_heads=NUM_HEADS, num_kv_heads=kv_heads, position=position)


def mla_overrides(kv_rank: int, position: str = "rope") -> dict:
    rope = ROPE_HEAD_DIM if position == "rope" else 0
    return dict(num_heads=NUM_HEADS, position=position, attention_module=register_mla(kv_rank, rope))


def with_equal_parameters(vocab_size: int, target: int, overrides: dict) -> dict:
    """overrides plus the FFN width that brings the parameter count to `target` (within one hidden unit:
    each hidden unit of the GELU MLP costs 2E + 1 parameters in every layer)."""
    config = lab_model_config(vocab_size, **overrides)
    count = MiniFormer(config).num_parameters()
    per_unit = config.num_layers * (2 * config.embed_dim + 1)
    return {**overrides, "ffn_hidden_size": 4 * config.embed_dim + round((target - count) / per_unit)}


@torch.no_grad()
def measured_bytes_per_token(model, x) -> float:
    """Prefill x (B, T) into the model's cache and divide what the cache holds by B * T."""
    cache = model.new_cache()
    model(x, kv_cache=cache)
    return held_bytes(cache) / x.numel()


def formula_bytes_per_token(model, bytes_per_element: int = 4) -> int:
    config, attention = model.config, model.blocks[0].attn
    if isinstance(attention, MultiHeadLatentAttention):
        return mla_cache_bytes_per_token(config.num_layers, attention.kv_rank, attention.rope_head_dim,
                                         bytes_per_element)
    return kv_cache_bytes_per_token(config.num_layers, config.kv_heads, config.head_dim, bytes_per_element)


# ---------------------------------------------------------------------------------------------- 1
@torch.no_grad()
def published_measured_bytes(published, tokens: int = 16) -> int:
    """Bytes per token that the attention layers of a published shape hand their cache, in bf16, run on the
    meta device (real code, shapes only, no memory)."""
    mla = published.kv_rank is not None
    config = TransformerConfig(vocab_size=8, context_length=tokens, num_layers=published.num_layers,
                               num_heads=published.num_heads, embed_dim=published.hidden_size,
                               num_kv_heads=None if mla else published.num_kv_heads, position="rope", bias=False)
    with torch.device("meta"):
        if mla:
            layers = [MultiHeadLatentAttention(config, i, published.kv_rank, published.rope_head_dim,
                                               published.query_rank, published.head_dim, published.head_dim)
                      for i in range(published.num_layers)]
        else:
            layers = [CausalSelfAttention(config, i) for i in range(published.num_layers)]
        x = torch.empty(1, tokens, published.hidden_size, dtype=torch.bfloat16)
    cache = LatentKVCache() if mla else ConcatKVCache()
    context = AttentionContext(offset=0, kv_cache=cache)
    for layer in layers:
        layer.to(torch.bfloat16)(x, context)
    cache.advance(tokens)
    return held_bytes(cache) // tokens


def cache_bytes(run, lab_rows: list) -> dict:
    """Bytes per token, formula and measured: lab-size variants (fp32) and published configs (bf16)."""
    published = []
    for config in PUBLISHED_CONFIGS:
        published.append({"model": config.name, "attention": config.attention, "layers": config.num_layers,
                          "heads": config.num_heads, "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
                          "kv_rank": config.kv_rank, "rope_head_dim": config.rope_head_dim,
                          "formula_bytes": config.cache_bytes_per_token(2),
                          "measured_bytes": published_measured_bytes(config), "source": config.source})
    by_name = {row["model"]: row for row in published}
    deepseek = next(c for c in PUBLISHED_CONFIGS if c.name == "DeepSeek-V2")
    deepseek_as_mha = kv_cache_bytes_per_token(deepseek.num_layers, deepseek.num_heads, deepseek.head_dim, 2)
    ratio_v2_vs_llama2 = by_name["Llama-2-7B"]["measured_bytes"] / by_name["DeepSeek-V2"]["measured_bytes"]
    fig, axes = panels(1, 2, width=6.4, height=4.4,
                       title=f"Bytes per token: MQA caches {lab_rows[0]['measured_bytes'] / lab_rows[3]['measured_bytes']:.0f}x "
                             f"less than MHA here; DeepSeek-V2's MLA {ratio_v2_vs_llama2:.1f}x less than Llama-2-7B")
    for ax, rows, key, unit in ((axes[0], lab_rows, "variant", "fp32"), (axes[1], published, "model", "bf16")):
        positions = np.arange(len(rows))
        ax.bar(positions - 0.2, [r["formula_bytes"] for r in rows], width=0.4, label="formula", color="lightgray",
               edgecolor="black")
        ax.bar(positions + 0.2, [r["measured_bytes"] for r in rows], width=0.4, label="measured (held by the cache)",
               color="tab:blue")
        for p, r in zip(positions, rows):
            ax.annotate(f"{r['measured_bytes']:,.0f}", (p + 0.2, r["measured_bytes"]), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
        labels = [f"{r[key]}\n{r.get('attention', '')}".strip() for r in rows]
        ax.set_xticks(positions, labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(f"KV-cache bytes per token, all layers ({unit}, log scale)")
        ax.legend(loc="upper right")
    axes[0].set_title("lab size: 4 layers, 8 heads of 16 dims")
    axes[1].set_title("published configurations")
    run.save(fig, "cache_bytes")
    return {"lab": lab_rows, "published": published, "deepseek_v2_as_mha_bytes": deepseek_as_mha,
            "deepseek_v2_mla_vs_own_mha": deepseek_as_mha / by_name["DeepSeek-V2"]["formula_bytes"],
            "llama2_over_deepseek_v2": ratio_v2_vs_llama2}


# ---------------------------------------------------------------------------------------------- 2
def train_variant(data, sizes, run, windows, label, seed=None, **overrides):
    schedule = short_schedule(sizes["steps"], eval_interval=sizes["steps"], eval_batches=2)  # we evaluate ourselves
    model, history = train_lab_variant(data, schedule, seed=run.seed if seed is None else seed, device=run.device,
                                       **overrides)
    result = {"val_loss": validation_loss(model, windows), "train_tokens_per_second": history.tokens_per_second,
              "train_seconds": history.train_seconds, "parameters": model.num_parameters(),
              "diverged": history.diverged}
    print(f"  {label:28s} params {result['parameters']:,}  val loss {result['val_loss']:.4f}  "
          f"{result['train_tokens_per_second']:,.0f} tok/s")
    return result, model.eval()


def gqa_equal_quality_bytes(gqa_points: list, loss: float) -> tuple[float, str]:
    """The cache bytes GQA needs to reach `loss`: interpolated (log bytes, linear loss) on the frontier of the
    GQA points (best loss at <= bytes). Returns (bytes, how): 'interpolated', 'at MQA' (MQA is already as
    good), or 'beyond MHA' (no GQA point is as good: the MHA bytes are a lower bound)."""
    points = sorted(gqa_points)  # (bytes, loss) by bytes
    frontier, best = [], math.inf
    for size, value in points:
        best = min(best, value)
        frontier.append((size, best))
    if loss >= frontier[0][1]:
        return frontier[0][0], "at MQA"
    if loss < frontier[-1][1]:
        return frontier[-1][0], "beyond MHA"
    for (b0, l0), (b1, l1) in zip(frontier, frontier[1:]):
        if l1 <= loss <= l0 and l1 < l0:
            fraction = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(b0) + fraction * (math.log(b1) - math.log(b0))), "interpolated"
    return frontier[-1][0], "beyond MHA"


def quality_vs_cache(run, sizes, data, windows, unigram: float) -> tuple[dict, dict]:
    """Train the 8-head lab variants at equal parameters; validation loss against cache bytes per token."""
    target = MiniFormer(lab_model_config(data.vocab.size, **gqa_overrides(NUM_HEADS))).num_parameters()
    variants = {kv_label(h): gqa_overrides(h) for h in GQA_KV_HEADS}
    variants.update({f"MLA-{r}": mla_overrides(r) for r in MLA_RANKS})
    results, models = {}, {}
    x_probe = windows[0][0]
    for label, overrides in variants.items():
        overrides = with_equal_parameters(data.vocab.size, target, overrides)
        results[label], models[label] = train_variant(data, sizes, run, windows, label, **overrides)
        results[label]["ffn_hidden_size"] = overrides["ffn_hidden_size"]
        results[label]["measured_bytes"] = measured_bytes_per_token(models[label], x_probe)
        results[label]["formula_bytes"] = formula_bytes_per_token(models[label])
    second_seed, _ = train_variant(data, sizes, run, windows, "MHA, second seed", seed=run.seed + 1,
                                   **with_equal_parameters(data.vocab.size, target, gqa_overrides(NUM_HEADS)))
    spread = abs(second_seed["val_loss"] - results["MHA"]["val_loss"])

    mha, gqa2 = results["MHA"], results["GQA-2"]
    retained = (unigram - gqa2["val_loss"]) / (unigram - mha["val_loss"])
    cache_ratio = mha["measured_bytes"] / gqa2["measured_bytes"]
    gqa_verdict = "holds" if retained >= KEEPS_MOST_QUALITY else "fails"
    gqa_points = [(results[kv_label(h)]["measured_bytes"], results[kv_label(h)]["val_loss"]) for h in GQA_KV_HEADS]
    mla_compare = {}
    for rank in MLA_RANKS:
        row = results[f"MLA-{rank}"]
        equal_bytes, how = gqa_equal_quality_bytes(gqa_points, row["val_loss"])
        mla_compare[f"MLA-{rank}"] = {"mla_bytes": row["measured_bytes"], "gqa_bytes_at_equal_loss": equal_bytes,
                                      "how": how, "gqa_over_mla_bytes": equal_bytes / row["measured_bytes"]}
    smaller = [c["gqa_over_mla_bytes"] > 1 for c in mla_compare.values()]
    mla_verdict = "holds" if all(smaller) else ("fails" if not any(smaller) else "depends")

    fig, axes = panels(1, 1, width=8.0, height=5.0,
                       title=f"At equal parameters, GQA-2 (4x smaller cache) keeps {retained:.0%} of MHA's gain;\n"
                             + "GQA at the loss of " + ", ".join(f"{k} needs {v['gqa_over_mla_bytes']:.2f}x its bytes"
                                                                 for k, v in mla_compare.items()))
    ax = axes[0]
    gqa_labels = [kv_label(h) for h in GQA_KV_HEADS]
    ax.plot([results[k]["measured_bytes"] for k in gqa_labels], [results[k]["val_loss"] for k in gqa_labels],
            color="gray", linewidth=1, zorder=1, label="GQA family (8 heads, 8/4/2/1 KV heads)")
    for label, row in results.items():
        marker = "s" if label.startswith("MLA") else "o"
        ax.scatter(row["measured_bytes"], row["val_loss"], s=60, marker=marker, color=COLORS[label], zorder=3,
                   label=f"{label}: {row['measured_bytes']:,.0f} B, loss {row['val_loss']:.3f}")
    ax.errorbar(mha["measured_bytes"] * 1.08, mha["val_loss"], yerr=spread, color="tab:red", capsize=4,
                label=f"seed-to-seed spread of MHA ({spread:.3f})", fmt="none")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="KV-cache bytes per token, all 4 layers (fp32, log scale)",
           ylabel="validation loss (nats / char)",
           title=f"{sizes['steps']} steps each, same seed and batches, "
                 f"{results['MHA']['parameters']:,} parameters (+- one FFN unit)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.subplots_adjust(top=0.82)  # room for the two-line title
    run.save(fig, "quality_vs_cache")
    summary = {"variants": results, "mha_second_seed": second_seed, "seed_spread": spread, "unigram_loss": unigram,
               "gqa2_quality_retained": retained, "gqa2_cache_ratio": cache_ratio, "mla_vs_gqa": mla_compare,
               "verdicts": {
                   "gqa_keeps_most_quality_with_4x_smaller_cache": {
                       "verdict": gqa_verdict, "retained": retained, "cache_ratio": cache_ratio,
                       "threshold": f"GQA-2 keeps >= {KEEPS_MOST_QUALITY:.0%} of MHA's loss reduction below the "
                                    f"unigram loss ({unigram:.3f})",
                       "loss_gap": gqa2["val_loss"] - mha["val_loss"], "seed_spread": spread},
                   "mla_smaller_cache_than_gqa_at_equal_quality": {
                       "verdict": mla_verdict, "threshold": "for every MLA rank, GQA's frontier needs more bytes "
                                                            "(> 1x) at MLA's validation loss",
                       "ratios": {k: v["gqa_over_mla_bytes"] for k, v in mla_compare.items()}}}}
    return summary, models


# ---------------------------------------------------------------------------------------------- 3
@torch.no_grad()
def seconds_per_decoded_token(model, context: int, steps: int, repeats: int, seed: int) -> tuple[float, int]:
    """Prefill `context` random tokens, then time `steps` single-token forwards; the median over repeats
    of the mean time per step, and the bytes the cache holds at the end."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=generator).to(device)
    new_tokens = torch.randint(0, model.config.vocab_size, (1, steps), generator=generator).to(device)
    times, held = [], 0
    for _ in range(repeats):
        cache = model.new_cache()
        model(prompt, kv_cache=cache)
        with Timer(device) as timer:
            for i in range(steps):
                model(new_tokens[:, i:i + 1], kv_cache=cache)
        times.append(timer.seconds / steps)
        held = held_bytes(cache)
    return statistics.median(times), held


def decode_vs_context(run, sizes, vocab_size: int) -> dict:
    """Time per token and cache memory against the cached context length (random weights, batch 1)."""
    contexts = list(sizes["contexts"])
    longest = contexts[-1] + sizes["decode_steps"]
    variants = {kv_label(h): gqa_overrides(h) for h in (8, 2, 1)}
    variants["MLA-64 naive"] = variants["MLA-64 absorbed"] = mla_overrides(64)
    results = {}
    for label, overrides in variants.items():
        torch.manual_seed(run.seed)
        model = MiniFormer(lab_model_config(vocab_size, context_length=longest, **overrides)).to(run.device).eval()
        if label.startswith("MLA"):
            use_absorbed_path(model, label.endswith("absorbed"))
        rows = [seconds_per_decoded_token(model, T, sizes["decode_steps"], sizes["repeats"], run.seed)
                for T in contexts]
        results[label] = {"ms_per_token": [1000 * s for s, _ in rows],
                          "cache_megabytes": [held / 2**20 for _, held in rows],
                          "formula_megabytes": [formula_bytes_per_token(model) * (T + sizes["decode_steps"])
                                                / 2**20 for T in contexts]}
        print(f"  {label:16s} ms/token at " + ", ".join(f"{T}: {ms:.2f}" for T, ms in
                                                          zip(contexts, results[label]["ms_per_token"])))
    styles = {"MHA": {"color": COLORS["MHA"]}, "GQA-2": {"color": COLORS["GQA-2"]}, "MQA": {"color": COLORS["MQA"]},
              "MLA-64 naive": {"color": COLORS["MLA-64"], "linestyle": "--"},
              "MLA-64 absorbed": {"color": COLORS["MLA-64"]}}
    last = {k: v["ms_per_token"][-1] for k, v in results.items()}
    fig, axes = panels(1, 2, width=6.2, height=4.4,
                       title=f"At {contexts[-1]} cached tokens: naive MLA {last['MLA-64 naive']:.1f} ms/token, absorbed "
                             f"{last['MLA-64 absorbed']:.1f}, MHA {last['MHA']:.1f}, MQA {last['MQA']:.1f}")
    line(axes[0], contexts, {k: v["ms_per_token"] for k, v in results.items()}, styles=styles, logx=True, logy=True,
         xlabel="tokens already in the cache (log scale)", ylabel="ms per generated token (log scale)",
         title=f"decode, batch 1, {run.device.type}, lab size at 8 heads")
    measured = {k: v["cache_megabytes"] for k, v in results.items() if k != "MLA-64 absorbed"}
    marker_styles = {k: {**styles[k], "linestyle": "none", "marker": "o", "markersize": 6} for k in measured}
    line(axes[1], contexts, measured, styles=marker_styles, logx=True, logy=True,
         xlabel="tokens already in the cache (log scale)", ylabel="cache memory (MiB, fp32, log scale)",
         title="markers: measured bytes held; dotted: formula")
    for label, row in results.items():
        if label != "MLA-64 absorbed":
            axes[1].plot(contexts, row["formula_megabytes"], linestyle=":", color=styles[label]["color"], linewidth=1)
    run.save(fig, "decode_vs_context")
    return {"contexts": contexts, "variants": results,
            "naive_over_absorbed_at_longest": last["MLA-64 naive"] / last["MLA-64 absorbed"],
            "mha_over_mqa_at_longest": last["MHA"] / last["MQA"]}


# ---------------------------------------------------------------------------------------------- 4
def conversion(run, sizes, data, windows, key_models: dict, key_results: dict) -> dict:
    """The key figure's trained 8-head MHA -> GQA-2 (a 4x smaller cache) and MQA by three methods; validation
    loss before and after a short uptraining, beside MHA given the same extra steps and GQA trained from scratch."""
    source = key_models["MHA"]
    schedule = short_schedule(sizes["uptrain_steps"], learning_rate=UPTRAIN_LR, eval_interval=sizes["uptrain_steps"],
                              eval_batches=2)

    def uptrain(model):
        data.generator.manual_seed(run.seed + 7)  # the same uptraining batches for every model
        torch.manual_seed(run.seed)
        train(model, data.batch_fn, schedule, device=run.device)
        return validation_loss(model, windows)

    original = validation_loss(source, windows)
    continued_model = MiniFormer(source.config).to(run.device)
    continued_model.load_state_dict(source.state_dict())
    continued = uptrain(continued_model)
    rows = {}
    for kv_heads in (2, 1):
        for method in ("mean", "first", "random"):
            converted = convert_to_gqa(source, kv_heads, method, seed=run.seed)
            before = validation_loss(converted, windows)
            after = uptrain(converted)
            label = f"{kv_label(kv_heads)} {method}"
            rows[label] = {"kv_heads": kv_heads, "method": method, "before": before, "after": after,
                           "from_scratch": key_results[kv_label(kv_heads)]["val_loss"]}
            print(f"  {label:14s} val loss {before:.3f} -> {after:.3f} after {sizes['uptrain_steps']} steps")
    best_before = {kv: min((r for r in rows.values() if r["kv_heads"] == kv), key=lambda r: r["before"])["method"]
                   for kv in (2, 1)}
    fig, axes = panels(1, 1, width=8.5, height=4.8,
                       title=f"Best start: {best_before[2]} for GQA-2 ({rows[f'GQA-2 {best_before[2]}']['before']:.2f}), "
                             f"{best_before[1]} for MQA ({rows[f'MQA {best_before[1]}']['before']:.2f}), MHA "
                             f"{original:.2f}; after {sizes['uptrain_steps']} steps mean-pooled: "
                             f"{rows['GQA-2 mean']['after']:.2f}, {rows['MQA mean']['after']:.2f}")
    ax = axes[0]
    positions = np.arange(len(rows))
    ax.bar(positions - 0.2, [r["before"] for r in rows.values()], width=0.4, color="lightgray", edgecolor="black",
           label="converted, before uptraining")
    ax.bar(positions + 0.2, [r["after"] for r in rows.values()], width=0.4, color="tab:blue",
           label=f"after {sizes['uptrain_steps']} uptraining steps (lr {UPTRAIN_LR:g})")
    for p, r in zip(positions, rows.values()):
        for offset, key in ((-0.2, "before"), (0.2, "after")):
            ax.annotate(f"{r[key]:.2f}", (p + offset, r[key]), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
    ax.axhline(original, color="tab:red", linestyle="--", label=f"MHA as trained ({original:.3f})")
    ax.axhline(continued, color="tab:red", linestyle=":", label=f"MHA + the same uptraining ({continued:.3f})")
    for kv_heads in (2, 1):
        ax.axhline(key_results[kv_label(kv_heads)]["val_loss"], color=COLORS[kv_label(kv_heads)], linestyle="-.",
                   linewidth=1, label=f"{kv_label(kv_heads)} trained from scratch, {sizes['steps']} steps "
                                      f"({key_results[kv_label(kv_heads)]['val_loss']:.3f})")
    values = [r[k] for r in rows.values() for k in ("before", "after")] + [original, continued]
    ax.set_ylim(min(values) - 0.05, max(values) + 0.1)
    ax.set_xticks(positions, list(rows), fontsize=8)
    ax.set(ylabel="validation loss (nats / char)",
           title=f"the key figure's 8-head MHA ({sizes['steps']} steps) converted; random = fresh KV weights")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    run.save(fig, "conversion")
    return {"mha_val_loss": original,
            "mha_continued_val_loss": continued, "uptrain_steps": sizes["uptrain_steps"], "uptrain_lr": UPTRAIN_LR,
            "rows": rows}


# ---------------------------------------------------------------------------------------------- 5
@torch.no_grad()
def decode_tokens_per_second(model, use_cache: bool, repeats: int, seed: int) -> float:
    """Greedy decode from a 1-token prompt to the full context (never refilling the cache), batch 1."""
    new_tokens = model.config.context_length - 1
    prompt = torch.randint(0, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.to(next(model.parameters()).device)
    seconds = time_function(lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache,
                                                   cache_factory=model.new_cache),
                            next(model.parameters()).device, repeats=repeats)
    return new_tokens / seconds


def progression(run, sizes, data, windows, key_models: dict, key_results: dict) -> dict:
    """The nanoGPT -> MLA study's stages on one lab size (8 heads, equal parameters)."""
    target = key_results["MHA"]["parameters"]
    x_probe = windows[0][0]
    stages = []

    def stage(name, model, result, use_cache, note=""):
        row = {"stage": name, "val_loss": validation_loss(model, windows),
               "train_tokens_per_second": result["train_tokens_per_second"],
               "decode_tokens_per_second": decode_tokens_per_second(model, use_cache, sizes["repeats"], run.seed),
               "cache_bytes_per_token": measured_bytes_per_token(model, x_probe) if use_cache else None,
               "parameters": model.num_parameters(), "note": note}
        stages.append(row)
        print(f"  {name:28s} loss {row['val_loss']:.4f}  train {row['train_tokens_per_second']:,.0f} tok/s  "
              f"decode {row['decode_tokens_per_second']:,.0f} tok/s  cache {row['cache_bytes_per_token']} B/token")

    # Stage 1 is stage 2's weights on 03's from-scratch attention kernel (the same function: 04 tests them
    # equal), so only its speed needs measuring: a short training run gives its training tokens/s.
    timing_schedule = short_schedule(sizes["timing_steps"], eval_interval=sizes["timing_steps"], eval_batches=1)
    _, timing = train_lab_variant(data, timing_schedule, seed=run.seed, device=run.device,
                                  **with_equal_parameters(data.vocab.size, target,
                                                          {**gqa_overrides(8), "attention": "scratch"}))
    basic_model = MiniFormer(replace(key_models["MHA"].config, attention="scratch")).to(run.device).eval()
    basic_model.load_state_dict(key_models["MHA"].state_dict())
    stage("1 basic", basic_model, {"train_tokens_per_second": timing.tokens_per_second}, False,
          f"03's from-scratch attention, no cache (stage 2's weights; training speed from {sizes['timing_steps']} steps)")
    stage("2 SDPA", key_models["MHA"], key_results["MHA"], False, "torch SDPA, no cache (the key figure's MHA)")
    stage("3 KV cache", key_models["MHA"], key_results["MHA"], True, "stage 2's model, decoded with 04's ConcatKVCache")
    stage("4 GQA-2", key_models["GQA-2"], key_results["GQA-2"], True, "2 KV heads for 8 query heads (key figure's)")
    plain, plain_model = train_variant(data, sizes, run, windows, "MLA-64 without RoPE",
                                       **with_equal_parameters(data.vocab.size, target, mla_overrides(64, "learned")))
    stage("5 MLA-64, no RoPE", plain_model, plain, True, "latent cache, learned positions instead of RoPE, naive path")
    rope_model = key_models["MLA-64"]
    stage("6 MLA-64 + decoupled RoPE", rope_model, key_results["MLA-64"], True,
          "the key figure's MLA-64 model, naive path")
    stage("7 absorbed MLA-64", use_absorbed_path(rope_model, True), key_results["MLA-64"], True,
          "stage 6's weights on the absorbed path (trained on the naive one)")
    use_absorbed_path(rope_model, False)
    fig, axes = panels(1, 4, width=3.9, height=4.6,
                       title=f"Progression at equal parameters: cache {stages[2]['cache_bytes_per_token']:,.0f} -> "
                             f"{stages[-1]['cache_bytes_per_token']:,.0f} B/token, loss {stages[1]['val_loss']:.3f} -> "
                             f"{stages[-1]['val_loss']:.3f}")
    names = [s["stage"].split(" ", 1)[0] for s in stages]
    colors = ["tab:gray", "tab:gray", "tab:red", "tab:green", "tab:purple", "tab:brown", "tab:brown"]
    bar(axes[0], names, [s["val_loss"] for s in stages], ylabel="validation loss (nats / char)",
        title="quality", annotate_fmt="{:.3f}", color=colors)
    axes[0].set_ylim(min(s["val_loss"] for s in stages) * 0.97, max(s["val_loss"] for s in stages) * 1.02)
    bar(axes[1], names, [s["train_tokens_per_second"] for s in stages], ylabel="training tokens / s",
        title="training speed", annotate_fmt="{:,.0f}", color=colors)
    bar(axes[2], names, [s["decode_tokens_per_second"] for s in stages], ylabel="decode tokens / s (batch 1)",
        title=f"decode, {data.context_length - 1} tokens", annotate_fmt="{:,.0f}", color=colors)
    bar(axes[3], names, [s["cache_bytes_per_token"] or 0 for s in stages], ylabel="cache bytes per token (fp32)",
        title="cache (0 = no cache)", annotate_fmt="{:,.0f}", color=colors)
    for ax in axes:
        ax.set_xlabel("stage (see the table)")
    fig.tight_layout()
    run.save(fig, "progression")
    return {"stages": stages}


# ---------------------------------------------------------------------------------------------- 6
@torch.no_grad()
def rope_blocks_absorption(seed: int, length: int = 32, head_dim: int = 16, kv_rank: int = 32) -> dict:
    """Why the RoPE key is decoupled: rotate the whole up-projected key and the folded query can no longer
    reproduce the scores (the rotation R(n) of key n sits between W_uk and c_n). One head, random weights."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(length, 64, generator=generator)
    w_q, w_dkv = torch.randn(head_dim, 64, generator=generator) / 8, torch.randn(kv_rank, 64, generator=generator) / 8
    w_uk = torch.randn(head_dim, kv_rank, generator=generator) / kv_rank ** 0.5
    latent = x @ w_dkv.T  # (T, d_c)
    q, k = x @ w_q.T, latent @ w_uk.T  # (T, D) each
    plain = q @ k.T  # scores without RoPE
    folded = (q @ w_uk) @ latent.T  # W_uk folded into the query
    rotated = apply_rope(q) @ apply_rope(k).T  # RoPE on the whole key: the true scores
    folded_rotated = (apply_rope(q) @ w_uk) @ latent.T  # the best the fold can do: R(n) is lost
    return {"no_rope_fold_max_error": (folded - plain).abs().max().item(),
            "rope_fold_max_error": (folded_rotated - rotated).abs().max().item(),
            "score_scale": rotated.abs().mean().item()}


def break_it(run, windows, key_models: dict) -> dict:
    """Three ways to get MLA wrong, measured."""
    absorption = rope_blocks_absorption(run.seed)
    model = key_models["MLA-64"]
    use_absorbed_path(model, True)
    right = validation_loss(model, windows)
    layers = [block.attn for block in model.blocks]
    default_scale = 1 / math.sqrt(layers[0].kv_rank + layers[0].rope_head_dim)  # what SDPA uses unless told
    true_scale = layers[0].scale
    for layer in layers:
        layer.scale = default_scale
    wrong = validation_loss(model, windows)
    for layer in layers:
        layer.scale = true_scale
    use_absorbed_path(model, False)
    try:
        model(windows[0][0][:1], kv_cache=ConcatKVCache())
        concat_error = "no error"
    except ValueError as error:
        concat_error = str(error)
    print(f"  RoPE on the whole key: folded-query score error {absorption['rope_fold_max_error']:.3f} (scores of "
          f"mean size {absorption['score_scale']:.3f}); without RoPE {absorption['no_rope_fold_max_error']:.1e}")
    print(f"  absorbed path with SDPA's default scale 1/sqrt({layers[0].kv_rank + layers[0].rope_head_dim}): "
          f"val loss {wrong:.3f} instead of {right:.3f}")
    print(f"  04's ConcatKVCache with MLA: {concat_error}")
    return {**absorption, "absorbed_val_loss": right, "absorbed_default_scale_val_loss": wrong,
            "true_scale": true_scale, "default_scale": default_scale, "concat_cache_error": concat_error}


# ---------------------------------------------------------------------------------------------- main
def main():
    parser = demo_parser(__doc__)
    args = parser.parse_args()
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if run.quick else "full"]
    data = char_shakespeare_data(64, 12, run.device, run.seed)
    windows = fixed_validation_windows(data, sizes["val_batches"], run.seed)
    unigram = unigram_loss(data)

    print(f"\n2. quality vs cache: 8-head lab variants, {sizes['steps']} steps each on {data.corpus}")
    quality, key_models = quality_vs_cache(run, sizes, data, windows, unigram)
    print("\n1. cache bytes per token")
    lab_rows = [{"variant": label, "attention": "", "formula_bytes": row["formula_bytes"],
                 "measured_bytes": row["measured_bytes"]} for label, row in quality["variants"].items()]
    cache = cache_bytes(run, lab_rows)
    print_table([{k: r[k] for k in ("variant", "formula_bytes", "measured_bytes")} for r in lab_rows],
                title="Lab size (4 layers, fp32): KV-cache bytes per token")
    print_table([{k: r[k] for k in ("model", "attention", "formula_bytes", "measured_bytes")} for r in cache["published"]],
                title="Published configurations (bf16): KV-cache bytes per token")
    print("\n3. decode speed and memory vs context length")
    decode = decode_vs_context(run, sizes, data.vocab.size)
    print("\n4. conversion of the trained 8-head MHA model")
    converted = conversion(run, sizes, data, windows, key_models, quality["variants"])
    print("\n5. progression")
    stages = progression(run, sizes, data, windows, key_models, quality["variants"])
    print("\n6. break it")
    broken = break_it(run, windows, key_models)

    print_table([{"variant": k, "params": v["parameters"], "ffn": v["ffn_hidden_size"], "bytes/token": v["measured_bytes"],
                  "val loss": v["val_loss"], "train tok/s": v["train_tokens_per_second"]}
                 for k, v in quality["variants"].items()],
                title=f"Quality vs cache at equal parameters ({sizes['steps']} steps; unigram loss {unigram:.3f}; "
                      f"MHA seed spread {quality['seed_spread']:.4f})")
    print_table([{"stage": s["stage"], "val loss": s["val_loss"], "train tok/s": s["train_tokens_per_second"],
                  "decode tok/s": s["decode_tokens_per_second"], "cache B/token": s["cache_bytes_per_token"] or "-"}
                 for s in stages["stages"]], title="Progression (8 heads, equal parameters)")

    verdicts = quality["verdicts"]
    v_gqa = verdicts["gqa_keeps_most_quality_with_4x_smaller_cache"]
    v_mla = verdicts["mla_smaller_cache_than_gqa_at_equal_quality"]
    rows = converted["rows"]
    gqa_label = next(k for k in rows if k.startswith("GQA")).split()[0]
    print("\nKey insights")
    print(f"- GQA-2 caches {v_gqa['cache_ratio']:.1f}x less than MHA and keeps {v_gqa['retained']:.1%} of MHA's loss "
          f"reduction below the unigram level (loss gap {v_gqa['loss_gap']:+.4f}, seed spread "
          f"{quality['seed_spread']:.4f}) -> {v_gqa['verdict']}.")
    print("- MLA vs GQA at equal loss: " + ", ".join(
        f"{k} caches {c['mla_bytes']:,.0f} B where GQA needs {c['gqa_bytes_at_equal_loss']:,.0f} B ({c['how']}, "
        f"{c['gqa_over_mla_bytes']:.2f}x)" for k, c in quality["mla_vs_gqa"].items()) + f" -> {v_mla['verdict']}.")
    print(f"- DeepSeek-V2 caches {cache['published'][3]['measured_bytes']:,} B per token (bf16), "
          f"{cache['deepseek_v2_mla_vs_own_mha']:.0f}x less than MHA with its own 128 heads and "
          f"{cache['llama2_over_deepseek_v2']:.1f}x less than Llama-2-7B.")
    print(f"- At {decode['contexts'][-1]} cached tokens the naive MLA path takes {decode['naive_over_absorbed_at_longest']:.2f}x "
          f"the absorbed path's time per token; MHA takes {decode['mha_over_mqa_at_longest']:.2f}x MQA's time.")
    print(f"- Conversion: {gqa_label} mean/first/random start at "
          + "/".join(f"{rows[f'{gqa_label} {m}']['before']:.3f}" for m in ("mean", "first", "random"))
          + ", MQA at " + "/".join(f"{rows[f'MQA {m}']['before']:.3f}" for m in ("mean", "first", "random"))
          + f" (MHA {converted['mha_val_loss']:.3f}); after {converted['uptrain_steps']} steps "
          + "/".join(f"{rows[f'{gqa_label} {m}']['after']:.3f}" for m in ("mean", "first", "random")) + " and "
          + "/".join(f"{rows[f'MQA {m}']['after']:.3f}" for m in ("mean", "first", "random"))
          + f" (MHA with the same steps {converted['mha_continued_val_loss']:.3f}).")
    print(f"- Absorbed path with SDPA's default scale: loss {broken['absorbed_default_scale_val_loss']:.3f} instead of "
          f"{broken['absorbed_val_loss']:.3f}; RoPE on the whole key leaves the folded scores off by up to "
          f"{broken['rope_fold_max_error']:.2f}.")
    for name, verdict in verdicts.items():
        print(f"  verdict {name}: {verdict['verdict']}")

    run.finish({"sizes": sizes, "corpus": data.corpus, "num_heads": NUM_HEADS, "rope_head_dim": ROPE_HEAD_DIM,
                "cache_bytes": cache, "quality_vs_cache": {k: v for k, v in quality.items() if k != "verdicts"},
                "decode_vs_context": decode, "conversion": converted, "progression": stages, "break_it": broken,
                "verdicts": {k: v for k, v in verdicts.items()}})


if __name__ == "__main__":
    main()
