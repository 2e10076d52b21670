"""06 — KV cache: how much faster generation gets, what it costs in memory, and what smaller caches lose.

Modes (--mode, or a menu when run on a terminal; default "both" otherwise):
  basic   1. basic_comparison: the trained lab model generates with no cache, 04's ConcatKVCache and our
             PreallocatedKVCache: same tokens, time per token, cache bytes.
  full    2. speed_vs_length: greedy generation of up to 1,000 tokens with and without the cache on a
             long-context (RoPE) lab-shaped model with random weights (speed does not depend on the
             weights), every step timed; the speedup of generating n tokens.
          3. time_per_token: the step time against position, cached and uncached, for the lab shape and
             the GPT-2-small shape (random weights), and the roofline of a memory-bound decode step.
          4. flops_per_step: FLOPs of one step measured with torch's FlopCounterMode beside the formulas
             2N n + 4 L E n^2 (uncached, O(n^2)) and 2N + 4 L E n (cached, O(n)).
          5. memory_vs_length: bytes held by each cache type against length, beside the formula.
          6. quality_vs_budget: next-token loss of the trained lab model when its cache keeps only a window,
             heavy hitters + a window (H2O), or int8 values.
Every step of 2-3 runs through 04's MiniFormer.generate; a sampler callback reads the clock.
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: E402,F401  (puts every NN_topic folder on sys.path)

import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmark_hf import read_bandwidth, weight_bytes_per_token  # noqa: E402
from cache import PreallocatedKVCache, SlidingWindowKVCache, kv_cache_bytes  # noqa: E402
from compressed_cache import HeavyHitterKVCache, Int8KVCache  # noqa: E402
from demo_cli import demo_parser, print_findings, print_table, start_demo  # noqa: E402
from lab import lab_model_config, trained_lab_model  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402
from plotting import bar, line, panels  # noqa: E402
from runtime import describe_device, synchronize  # noqa: E402
from transformer import ConcatKVCache, MiniFormer, TransformerConfig  # noqa: E402

MODES = ("basic", "full", "both")
# Quick and full runs differ in these sizes only.
SIZES = {
    "quick": dict(basic_tokens=40, repeats=2, speed_tokens=120, speed_prompt=8, uncached_tokens=60, uncached_samples=[30, 120], gpt2_positions=[8, 32], gpt2_steps=3,
                  flop_lengths=[16, 64, 256], memory_lengths=[64, 256, 1024], memory_batch=1,
                  preset="quick", quality_windows=4, budgets=[8, 16, 32]),
    "full": dict(basic_tokens=56, repeats=3, speed_tokens=1000, speed_prompt=8, uncached_tokens=100,
                 uncached_samples=[30, 100, 300, 1000], gpt2_positions=[16, 64, 256, 512], gpt2_steps=8,
                 flop_lengths=[16, 32, 64, 128, 256, 512, 1024], memory_lengths=[64, 128, 256, 512, 1024],
                 memory_batch=4, preset="full", quality_windows=16, budgets=[8, 16, 24, 32, 48, 64]),
}
# The claim and the thresholds of its verdict, written beside each other.
CLAIM_SPEEDUP = {100: 10.0, 1000: 100.0}  # "10x at 100 tokens, 100x+ at 1000"
GPT2_SMALL = dict(vocab_size=50257, context_length=1024, num_layers=12, num_heads=12, embed_dim=768,
                  gelu_approximate="tanh")


def long_context_lab_config(vocab_size: int, context_length: int, **overrides) -> TransformerConfig:
    """The lab model's shape (4 layers x 4 heads x 128) with RoPE, so any context length needs no table."""
    return lab_model_config(vocab_size, position="rope", context_length=context_length, **overrides)


def random_model(config: TransformerConfig, device, seed: int = 0) -> MiniFormer:
    torch.manual_seed(seed)
    return MiniFormer(config).to(device).eval()


def timed_generate(model, prompt, new_tokens: int, device, **generate_args) -> tuple:
    """(tokens, seconds of each step) of 04's generate, greedy: a sampler callback reads the clock after
    each forward, so step i's time covers its forward, the argmax and the loop's bookkeeping."""
    marks = []

    def greedy_and_clock(logits, _tokens):
        choice = logits.argmax(dim=-1, keepdim=True)
        synchronize(device)
        marks.append(time.perf_counter())
        return choice

    synchronize(device)
    start = time.perf_counter()
    tokens = model.generate(prompt, new_tokens, sampler=greedy_and_clock, **generate_args)
    return tokens, np.diff([start, *marks])


# ---------------------------------------------------------------------------------------------- 1
def basic_comparison(run, trained, sizes) -> dict:
    """No cache vs ConcatKVCache vs PreallocatedKVCache on the trained lab model."""
    model, vocab = trained.model, trained.data.vocab
    context = model.config.context_length
    trained.data.generator.manual_seed(run.seed)
    prompt = trained.data.batch_fn("val")[0][:1, :8].to(run.device)  # 8 characters of validation text
    new_tokens = min(sizes["basic_tokens"], context - prompt.shape[1])  # stay inside one context: no refill
    ways = {"no cache": dict(use_cache=False), "ConcatKVCache\n(04, torch.cat)": dict(cache_factory=ConcatKVCache),
            "PreallocatedKVCache\n(06)": dict(cache_factory=lambda: PreallocatedKVCache(context))}
    seconds, outputs = {name: [] for name in ways}, {}
    for _ in range(sizes["repeats"]):  # alternate the three, keep each one's fastest run: load on shared cores
        for name, arguments in ways.items():  # only ever slows a run down
            outputs[name], steps = timed_generate(model, prompt, new_tokens, run.device, **arguments)
            seconds[name].append(float(steps.sum()))
    rows = {name: {"ms_per_token": 1000 * min(s) / new_tokens, "total_ms": 1000 * min(s)} for name, s in seconds.items()}
    cache = PreallocatedKVCache(context)
    with torch.no_grad():
        model(outputs["no cache"][:, :-1], kv_cache=cache)
    same = all(torch.equal(t, outputs["no cache"]) for t in outputs.values())
    result = {"new_tokens": new_tokens, "rows": rows, "same_tokens": same, "text": vocab.decode(outputs["no cache"][0].tolist()),
              "cache_bytes": cache.nbytes, "formula_bytes": kv_cache_bytes(model.config, context, 1),
              "bytes_per_token": kv_cache_bytes(model.config, 1, 1), "val_loss": trained.record["val_loss"]}
    names = list(rows)
    fig, axes = panels(1, 1, width=7.0, height=3.8, title=(
        f"Trained lab model, {new_tokens} tokens: the cache gives the same text "
        f"{rows[names[0]]['ms_per_token'] / rows[names[2]]['ms_per_token']:.1f}x faster"))
    bar(axes[0], names, [rows[n]["ms_per_token"] for n in names], ylabel="ms per generated token",
        title=f"greedy decode after an 8-character prompt, same tokens: {same}", annotate_fmt="{:.2f} ms")
    run.save(fig, "basic_comparison")
    print_table([{"generation": n.replace("\n", " "), **r} for n, r in rows.items()], f"basic: {new_tokens} tokens, same tokens {same}")
    print(f"  sample: {result['text']!r}")
    return result


# ---------------------------------------------------------------------------------------------- 2
def speed_vs_length(run, vocab_size: int, sizes) -> dict:
    """Greedy generation with the cache, every step timed, to speed_tokens tokens; without the cache, every
    step timed to uncached_tokens tokens, then single steps at sampled positions (an uncached step at
    position n is a forward over n tokens, so timing all 1,000 on shared cores would take most of an hour)."""
    prompt_length, new_tokens = sizes["speed_prompt"], sizes["speed_tokens"]
    config = long_context_lab_config(vocab_size, context_length=prompt_length + new_tokens + 1)
    model = random_model(config, run.device)
    generator = torch.Generator().manual_seed(run.seed)
    prompt = torch.randint(0, vocab_size, (1, prompt_length), generator=generator).to(run.device)
    capacity = prompt_length + new_tokens
    cached_args = dict(cache_factory=lambda: PreallocatedKVCache(capacity))
    timed_generate(model, prompt, 5, run.device, **cached_args)  # warm-up
    cached_tokens, cached = timed_generate(model, prompt, new_tokens, run.device, **cached_args)
    measured_uncached = sizes["uncached_tokens"]
    uncached_tokens, uncached = timed_generate(model, prompt, measured_uncached, run.device, use_cache=False)
    print(f"  cached: {new_tokens} tokens in {cached.sum():.2f} s; uncached: {measured_uncached} tokens in {uncached.sum():.2f} s")
    sampled = {}  # generated tokens n -> seconds of the uncached step that makes token n (position prompt + n - 1)
    for n in sizes["uncached_samples"]:
        context = torch.randint(0, vocab_size, (1, prompt_length + n - 1), generator=generator).to(run.device)
        sampled[n] = min(float(timed_generate(model, context, 1, run.device, use_cache=False)[1][0])
                         for _ in range(sizes["repeats"]))  # best of repeats: one step is noisy
    end_to_end = np.cumsum(uncached) / np.cumsum(cached[:measured_uncached])  # speedup of generating n tokens
    # A cached step costs about the same everywhere, but single steps jitter by 2x on a CPU: compare with
    # the median of the cached steps around n, not with step n alone.
    per_step = {n: sampled[n] / float(np.median(cached[max(0, n - 11):n + 10])) for n in sampled}
    at = {n: float(end_to_end[n - 1]) for n in (10, 30, 100) if n <= measured_uncached}
    fig, axes = panels(1, 1, width=7.5, height=4.6, title=(
        "Generating n tokens with the cache: " + ", ".join(f"{v:.1f}x at {n}" for n, v in at.items())
        + "; one step: " + ", ".join(f"{v:.1f}x at {n}" for n, v in per_step.items())))
    lengths = np.arange(1, measured_uncached + 1)
    axes[0].plot(lengths, end_to_end, color="tab:blue", label="generating n tokens: uncached time / cached time")
    axes[0].plot(list(per_step), list(per_step.values()), "o--", color="tab:red",
                 label="step n alone: uncached step (best of repeats) / median cached step near n")
    axes[0].set(xscale="log", yscale="log", xlabel="generated tokens n (log scale)", ylabel="speedup (log scale)",
                title=f"lab shape (4x128, RoPE), random weights, batch 1, {prompt_length}-token prompt, {run.device}")
    axes[0].legend()
    run.save(fig, "speedup_vs_length")
    return {"config": {"layers": config.num_layers, "heads": config.num_heads, "embed_dim": config.embed_dim,
                       "position": config.position, "context_length": config.context_length},
            "prompt_tokens": prompt_length, "new_tokens": new_tokens, "uncached_tokens": measured_uncached,
            "same_tokens": bool(torch.equal(cached_tokens[:, :uncached_tokens.shape[1]], uncached_tokens)),
            "cached_step_seconds": cached, "uncached_step_seconds": uncached, "uncached_sampled_step_seconds": sampled,
            "total_seconds": {"cached": float(cached.sum()), f"uncached_first_{measured_uncached}": float(uncached.sum())},
            "speedup_at": at, "per_step_speedup_at": per_step}


# ---------------------------------------------------------------------------------------------- 3
def gpt2_step_times(run, sizes) -> dict:
    """GPT-2-small shape, random weights: one uncached step (a forward over all n tokens) and one cached step
    (one token, n held) at each position n, both through 04's generate."""
    config = TransformerConfig(**GPT2_SMALL)
    model = random_model(config, run.device)
    generator = torch.Generator().manual_seed(run.seed)
    cached, uncached = [], []
    for n in sizes["gpt2_positions"]:
        prompt = torch.randint(0, config.vocab_size, (1, n), generator=generator).to(run.device)
        capacity = n + sizes["gpt2_steps"] + 1
        _, steps = timed_generate(model, prompt, sizes["gpt2_steps"] + 1, run.device,
                                  cache_factory=lambda: PreallocatedKVCache(capacity))
        cached.append(float(np.median(steps[1:])))  # steps[0] is the prefill
        _, steps = timed_generate(model, prompt, 1, run.device, use_cache=False)
        uncached.append(float(steps[0]))
        print(f"  GPT-2 shape at n = {n}: cached {1000 * cached[-1]:.1f} ms, uncached {1000 * uncached[-1]:.1f} ms")
    bandwidth = read_bandwidth(run.device)
    weight_bytes = weight_bytes_per_token(model)
    return {"positions": sizes["gpt2_positions"], "cached_seconds": cached, "uncached_seconds": uncached,
            "parameters": model.num_parameters(), "weight_bytes_per_token": weight_bytes,
            "read_bandwidth_GBps": bandwidth / 1e9, "roofline_seconds_per_token": weight_bytes / bandwidth}


def time_per_token(run, speed: dict, gpt2: dict) -> dict:
    """Step time against position, cached and uncached, for the two model sizes."""
    lab_cached, lab_uncached = speed["cached_step_seconds"], speed["uncached_step_seconds"]
    prompt = speed["prompt_tokens"]
    sampled = speed["uncached_sampled_step_seconds"]
    last = max(sampled)
    lab_ratio = speed["per_step_speedup_at"][last]
    gpt2_ratio = gpt2["uncached_seconds"][-1] / gpt2["cached_seconds"][-1]
    fig, axes = panels(1, 2, width=6.0, height=4.4, title=(
        f"Uncached step time grows with position, cached stays nearly flat: {lab_ratio:.0f}x at {prompt + last - 1} "
        f"(lab shape), {gpt2_ratio:.0f}x at {gpt2['positions'][-1]} (GPT-2 shape)"))
    positions = prompt + np.arange(len(lab_cached))  # tokens the model has seen before the step
    axes[0].plot(positions[1:], 1000 * lab_cached[1:], color="tab:blue", label="cached, every step")
    axes[0].plot(positions[1:len(lab_uncached)], 1000 * lab_uncached[1:], color="tab:red", label="uncached, every step")
    axes[0].plot([prompt + n - 1 for n in sampled], [1000 * s for s in sampled.values()], "o", color="tab:red",
                 label="uncached, single steps at sampled positions")
    axes[0].set(xscale="log", yscale="log", xlabel="position n (tokens before the step, log scale)",
                ylabel="ms per step (log scale)", title="lab shape 4x128, RoPE, random weights")
    axes[0].legend()
    styles = {"uncached": {"color": "tab:red"}, "cached": {"color": "tab:blue"}}
    gpt2_ms = {"uncached": 1000 * np.array(gpt2["uncached_seconds"]), "cached": 1000 * np.array(gpt2["cached_seconds"])}
    line(axes[1], gpt2["positions"], gpt2_ms, styles=styles, logx=True, logy=True,
         xlabel="position n (tokens before the step, log scale)", ylabel="ms per step (log scale)",
         title=f"GPT-2-small shape ({gpt2['parameters'] / 1e6:.0f} M parameters), random weights")
    roofline_ms = 1000 * gpt2["roofline_seconds_per_token"]
    axes[1].axhline(roofline_ms, color="gray", linestyle=":",
                    label=f"formula: weight bytes / read bandwidth = {roofline_ms:.0f} ms")
    axes[1].set_xticks(gpt2["positions"], [str(n) for n in gpt2["positions"]])
    axes[1].xaxis.set_minor_formatter(NullFormatter())  # only the measured positions are labelled
    axes[1].legend()
    run.save(fig, "time_per_token")
    return {"lab_per_step_ratio_at_last_sample": lab_ratio, "gpt2_last_step_ratio": gpt2_ratio,
            "lab_cached_ms_first_10": 1000 * float(np.median(lab_cached[1:11])),
            "lab_cached_ms_last_10": 1000 * float(np.median(lab_cached[-10:])),
            "lab_uncached_ms_at_last_sample": 1000 * sampled[last]}


# ---------------------------------------------------------------------------------------------- 4
def flops_per_step(run, vocab_size: int, sizes) -> dict:
    """FLOPs of one uncached step (forward over n tokens) and one cached step (1 token, n - 1 held)."""
    lengths = sizes["flop_lengths"]
    # 03's explicit attention: torch's FlopCounterMode does not count the CPU SDPA kernel (it sees only the
    # linear layers then), while the explicit q k^T and weights v matmuls are counted.
    config = long_context_lab_config(vocab_size, context_length=lengths[-1], attention="scratch")
    model = random_model(config, run.device)
    matmul_parameters = sum(p.numel() for name, p in model.named_parameters()
                            if p.dim() == 2 and name.startswith("blocks.")) + config.embed_dim * vocab_size  # + head
    L, E = config.num_layers, config.embed_dim
    measured = {"uncached": [], "cached": []}
    for n in lengths:
        ids = torch.randint(0, vocab_size, (1, n), device=run.device)
        cache = PreallocatedKVCache(n)
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                model(ids)
            measured["uncached"].append(counter.get_total_flops())
            model(ids[:, :-1], kv_cache=cache)
            with FlopCounterMode(display=False) as counter:
                model(ids[:, -1:], kv_cache=cache)
            measured["cached"].append(counter.get_total_flops())
    n = np.array(lengths, dtype=np.float64)
    formula = {"uncached": 2 * matmul_parameters * n + 4 * L * E * n ** 2, "cached": 2 * matmul_parameters + 4 * L * E * n}
    ratio = measured["uncached"][-1] / measured["cached"][-1]
    fig, axes = panels(1, 1, width=7.0, height=4.6, title=(
        f"FLOPs per step: uncached grows like n^2, cached like n ({ratio:.0f}x fewer at n = {lengths[-1]})"))
    for name, color in (("uncached", "tab:red"), ("cached", "tab:blue")):
        axes[0].plot(lengths, measured[name], "o", color=color, label=f"{name}: measured (FlopCounterMode)")
        axes[0].plot(lengths, formula[name], "-", color=color, alpha=0.5,
                     label="formula 2Nn + 4LEn^2" if name == "uncached" else "formula 2N + 4LEn")
    axes[0].set(xscale="log", yscale="log", xlabel="position n (tokens, log scale)", ylabel="FLOPs per step (log scale)",
                title=f"lab shape 4x128 (N = {matmul_parameters:,} matmul parameters), L = {L}, E = {E}")
    axes[0].legend()
    run.save(fig, "flops_per_step")
    return {"lengths": lengths, "measured": measured, "formula": formula, "matmul_parameters": matmul_parameters,
            "formula_max_relative_error": max(abs(m - f) / f for name in measured
                                              for m, f in zip(measured[name], formula[name])),
            "uncached_over_cached_at_longest": ratio}


# ---------------------------------------------------------------------------------------------- 5
def memory_vs_length(run, sizes) -> dict:
    """Bytes each cache holds after n positions, GPT-2-small shape, float32; filled through update() with
    random keys and values in 64-token chunks (no model needed to measure a cache)."""
    config = TransformerConfig(**GPT2_SMALL)
    batch, chunk = sizes["memory_batch"], 64
    lengths = sizes["memory_lengths"]
    shape = (batch, config.kv_heads, chunk, config.head_dim)
    k, v = torch.randn(shape, device=run.device), torch.randn(shape, device=run.device)
    window = lengths[len(lengths) // 2]
    makers = {"Preallocated": lambda n: PreallocatedKVCache(n), "Concat (04)": lambda n: ConcatKVCache(),
              f"SlidingWindow({window})": lambda n: SlidingWindowKVCache(window),
              f"HeavyHitter({window})": lambda n: HeavyHitterKVCache(window), "Int8": lambda n: Int8KVCache(n)}
    held = {name: [] for name in makers}
    for n in lengths:
        for name, make in makers.items():
            cache = make(n)
            for start in range(0, n, chunk):
                for layer in range(config.num_layers):
                    cache.update(layer, k, v)
                cache.advance(chunk)
            # What the cache really holds: its own count where it stores other dtypes or bookkeeping,
            # else the storages behind the tensors update() returned (views share the preallocated buffer).
            if hasattr(cache, "nbytes"):
                held[name].append(cache.nbytes)
            else:
                held[name].append(sum(t.untyped_storage().nbytes() for layer in cache.keys
                                      for t in (cache.keys[layer], cache.values[layer])))
    formula = [kv_cache_bytes(config, n, batch) for n in lengths]
    fig, axes = panels(1, 1, width=7.5, height=4.8, title=(
        f"Cache memory is linear in length ({formula[-1] / 2**20:.0f} MiB at {lengths[-1]}); window and H2O stay flat, "
        f"int8 is {held['Int8'][-1] / formula[-1]:.2f}x"))
    axes[0].plot(lengths, np.array(formula) / 2**20, "-", color="black", linewidth=3, alpha=0.3,
                 label="formula 2 L H_kv D * 4 bytes * n * batch")
    markers = dict(zip(makers, [dict(marker="o", markersize=8), dict(marker="x", markersize=7, linestyle="--"),
                                dict(marker="s", markersize=8), dict(marker="^", markersize=5, linestyle=":"),
                                dict(marker="D", markersize=5)]))
    for name in makers:
        axes[0].plot(lengths, np.array(held[name]) / 2**20, label=f"{name}: measured bytes held", **markers[name])
    axes[0].set(xscale="log", yscale="log", xlabel="cached positions n (log scale)", ylabel="MiB (log scale)",
                title=f"GPT-2-small shape, batch {batch}, float32 ({kv_cache_bytes(config, 1) // 1024} KiB per token)")
    axes[0].legend(fontsize=7)
    run.save(fig, "memory_vs_length")
    return {"lengths": lengths, "batch": batch, "formula_bytes": formula, "held_bytes": held, "window_budget": window,
            "preallocated_equals_formula": held["Preallocated"] == formula}


# ---------------------------------------------------------------------------------------------- 6
@torch.no_grad()
def teacher_forced_loss(model, x, y, cache) -> torch.Tensor:
    """Cross-entropy at each position (B, T) when x is fed one token at a time through `cache`."""
    logits = torch.cat([model(x[:, t:t + 1], kv_cache=cache) for t in range(x.shape[1])], dim=1)  # (B, T, V)
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none")


def quality_vs_budget(run, trained, sizes) -> dict:
    """Next-token loss of the trained lab model on validation windows, each cache type and budget."""
    model, config = trained.model, trained.model.config
    trained.data.generator.manual_seed(run.seed + 7)
    windows = [trained.data.batch_fn("val") for _ in range(-(-sizes["quality_windows"] // trained.data.batch_size))]
    x = torch.cat([w[0] for w in windows])[:sizes["quality_windows"]].to(run.device)
    y = torch.cat([w[1] for w in windows])[:sizes["quality_windows"]].to(run.device)
    T, budgets = x.shape[1], sizes["budgets"]
    late = slice(T // 2, T)  # second half of each window: where small budgets really drop keys

    def summarize(losses, budget, nbytes):
        return {"budget": budget, "loss": losses.mean().item(), "late_loss": losses[:, late].mean().item(),
                "kv_bytes": nbytes}

    full = teacher_forced_loss(model, x, y, PreallocatedKVCache(T))
    one_shot = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")
    rows = {"full cache": [summarize(full, T, kv_cache_bytes(config, T, x.shape[0]) // x.shape[0])]}
    int8 = Int8KVCache(T)
    rows["int8 (full length)"] = [summarize(teacher_forced_loss(model, x, y, int8), T, int8.nbytes // x.shape[0])]
    rows["sliding window"], rows["heavy hitters + window (H2O)"] = [], []
    for budget in budgets:
        ring = SlidingWindowKVCache(budget)
        rows["sliding window"].append(summarize(teacher_forced_loss(model, x, y, ring), budget, ring.nbytes // x.shape[0]))
        # H2O keeps one set of positions per batch: one window at a time, so each keeps its own heavy hitters
        losses, nbytes = [], 0
        for row in range(x.shape[0]):
            cache = HeavyHitterKVCache(budget, recent=budget // 2)
            losses.append(teacher_forced_loss(model, x[row:row + 1], y[row:row + 1], cache))
            nbytes = cache.nbytes
        rows["heavy hitters + window (H2O)"].append(summarize(torch.cat(losses), budget, nbytes))
    base = rows["full cache"][0]["late_loss"]
    smallest = {name: r[0]["late_loss"] - base for name, r in rows.items() if len(r) > 1}
    fig, axes = panels(1, 1, width=7.5, height=4.6, title=(
        f"Keeping {budgets[0]} of {T} positions changes the late loss by {smallest['sliding window']:+.3f} nats (window), "
        f"{smallest['heavy hitters + window (H2O)']:+.3f} (H2O); int8 by {rows['int8 (full length)'][0]['late_loss'] - base:+.4f}"))
    styles = {"full cache": dict(marker="*", markersize=12, color="black"), "int8 (full length)": dict(marker="D", color="tab:green"),
              "sliding window": dict(marker="o", color="tab:orange"), "heavy hitters + window (H2O)": dict(marker="s", color="tab:purple")}
    for name, points in rows.items():
        axes[0].plot([p["kv_bytes"] / 1024 for p in points], [p["late_loss"] for p in points], label=name, **styles[name])
    axes[0].set(xscale="log", xlabel="cache bytes per sequence (KiB, log scale; bookkeeping included)",
                ylabel=f"loss at positions {T // 2}-{T - 1} (nats/char)",
                title=f"trained lab model ('{sizes['preset']}', val loss {trained.record['val_loss']:.3f}), "
                      f"{x.shape[0]} validation windows of {T}, fed one token at a time")
    axes[0].xaxis.set_major_formatter(ScalarFormatter())
    axes[0].legend()
    run.save(fig, "quality_vs_budget")
    return {"windows": x.shape[0], "window_length": T, "rows": rows,
            "token_by_token_equals_one_shot_max_diff": (full - one_shot).abs().max().item(),
            "late_loss_increase_at_smallest_budget": smallest}


# ---------------------------------------------------------------------------------------------- verdicts
def verdicts(speed: dict) -> dict:
    """The spec's claim, decided on measured speedups of the lab shape. Generating n tokens averages the step
    speedups of positions 1 .. n, which grow with n, so it is below the speedup of step n alone: if step n
    alone misses the threshold, generating n tokens misses it too."""
    end_to_end, per_step = speed["speedup_at"], speed["per_step_speedup_at"]
    checks = {}
    for n, threshold in CLAIM_SPEEDUP.items():
        if n in end_to_end:
            checks[n] = {"measured": end_to_end[n], "what": f"generating {n} tokens", "met": end_to_end[n] >= threshold}
        elif n in per_step:
            checks[n] = {"measured": per_step[n], "what": f"step {n} alone (an upper bound of generating {n})",
                         "met": None if per_step[n] >= threshold else False}  # an upper bound can only refute
    decided = [c["met"] for c in checks.values()]
    if len(checks) < len(CLAIM_SPEEDUP) or None in decided and False not in decided:
        claim = "not measured"  # a quick run stops before 1,000 tokens
    else:
        claim = "holds" if all(decided) else "fails" if not any(decided) else "depends"
    ordered = sorted(per_step)
    grows = all(per_step[a] < per_step[b] for a, b in zip(ordered, ordered[1:])) and per_step[ordered[-1]] > 1
    return {
        "speedup_10x_at_100_and_100x_at_1000": {
            "verdict": claim, "rule": "holds if speedup(100) >= 10 and speedup(1000) >= 100; depends if only one is met; "
                                      "fails if neither", "measured": checks},
        "speedup_grows_with_length": {
            "verdict": "holds" if grows else "fails", "rule": "holds if the per-step speedup rises at every sampled "
                                                               "position and exceeds 1", "measured": per_step}}


def key_insights(results: dict) -> list[str]:
    lines = []
    if "basic" in results:
        b = results["basic"]
        rows = b["rows"]
        lines.append(f"Trained lab model, {b['new_tokens']} tokens: "
                     + ", ".join(f"{n.replace(chr(10), ' ')} {r['ms_per_token']:.2f} ms/token" for n, r in rows.items())
                     + f"; identical tokens: {b['same_tokens']}; the cache holds {b['bytes_per_token']:,} bytes per token "
                       f"({b['cache_bytes']:,} for {b['cache_bytes'] // b['bytes_per_token']} tokens = the formula).")
    if "speed" in results:
        s, t = results["speed"], results["time_per_token"]
        lines.append(f"Lab shape with RoPE: {s['new_tokens']} cached tokens in {s['total_seconds']['cached']:.2f} s; "
                     f"generating n tokens is " + ", ".join(f"{v:.1f}x faster at n = {n}" for n, v in s["speedup_at"].items())
                     + "; a single step at n is " + ", ".join(f"{v:.1f}x at {n}" for n, v in s["per_step_speedup_at"].items())
                     + f" (same tokens: {s['same_tokens']}).")
        lines.append(f"A cached step costs {t['lab_cached_ms_first_10']:.2f} ms near the start and "
                     f"{t['lab_cached_ms_last_10']:.2f} ms near 1,000 tokens: a fixed per-step cost (Python, ~100 small "
                     f"kernel launches) dominates a model this small, so the speedup is capped by uncached step / "
                     f"that overhead, far below the FLOP ratio.")
    if "gpt2" in results:
        g = results["gpt2"]
        lines.append(f"GPT-2-small shape: a cached step takes {1000 * g['cached_seconds'][0]:.1f} ms at position "
                     f"{g['positions'][0]}, against {1000 * g['roofline_seconds_per_token']:.1f} ms to read its "
                     f"{g['weight_bytes_per_token'] / 1e6:.0f} MB of weights at the measured {g['read_bandwidth_GBps']:.1f} GB/s: "
                     f"decode is memory-bound; uncached at {g['positions'][-1]} takes {1000 * g['uncached_seconds'][-1]:.0f} ms.")
    if "flops" in results:
        f = results["flops"]
        lines.append(f"FLOPs per step at n = {f['lengths'][-1]}: {f['measured']['uncached'][-1] / 1e9:.2f} GFLOP uncached vs "
                     f"{f['measured']['cached'][-1] / 1e6:.2f} MFLOP cached ({f['uncached_over_cached_at_longest']:.0f}x); "
                     f"formula within {f['formula_max_relative_error']:.1%}.")
    if "memory" in results:
        m = results["memory"]
        lines.append(f"GPT-2-small shape, batch {m['batch']}: the cache holds {m['formula_bytes'][-1] / 2**20:.0f} MiB at "
                     f"{m['lengths'][-1]} tokens (equal to the formula: {m['preallocated_equals_formula']}); int8 "
                     f"{m['held_bytes']['Int8'][-1] / 2**20:.0f} MiB; the window and H2O caches stay at their budget.")
    if "quality" in results:
        q = results["quality"]
        inc = q["late_loss_increase_at_smallest_budget"]
        lines.append(f"Quality at the smallest budget (late positions): window {inc['sliding window']:+.3f} nats, H2O "
                     f"{inc['heavy hitters + window (H2O)']:+.3f} nats; int8 "
                     f"{q['rows']['int8 (full length)'][0]['late_loss'] - q['rows']['full cache'][0]['late_loss']:+.4f} nats.")
    return lines


# ---------------------------------------------------------------------------------------------- main
def choose_mode(args) -> str:
    """--mode if given; else a menu on a terminal; else (CI, pipes) both."""
    if args.mode is not None:
        return args.mode
    if not sys.stdin.isatty():
        return "both"
    answer = input("06 KV cache demo: [1] basic  [2] full  [3] both (default 3): ").strip().lower()
    return {"1": "basic", "2": "full", "3": "both", "": "both"}.get(answer, answer if answer in MODES else "both")


def main():
    parser = demo_parser(__doc__)
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="basic (one comparison), full (all experiments) or both; default: a menu on a terminal, "
                             "both otherwise")
    args = parser.parse_args()
    mode = choose_mode(args)
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if run.quick else "full"]
    print(f"mode: {mode}")
    results = {"mode": mode, "sizes": sizes}
    trained = trained_lab_model(sizes["preset"], device=run.device, seed=run.seed)
    vocab_size = trained.model.config.vocab_size
    if mode in ("basic", "both"):
        print("\n1. basic comparison")
        results["basic"] = basic_comparison(run, trained, sizes)
    if mode in ("full", "both"):
        print(f"\n2. speed vs generated length (up to {sizes['speed_tokens']} tokens)")
        results["speed"] = speed_vs_length(run, vocab_size, sizes)
        print("\n3. time per token vs position")
        results["gpt2"] = gpt2_step_times(run, sizes)
        results["time_per_token"] = time_per_token(run, results["speed"], results["gpt2"])
        print("\n4. FLOPs per step")
        results["flops"] = flops_per_step(run, vocab_size, sizes)
        print("\n5. memory vs length")
        results["memory"] = memory_vs_length(run, sizes)
        print("\n6. quality vs cache budget")
        results["quality"] = quality_vs_budget(run, trained, sizes)
        results["verdicts"] = verdicts(results["speed"])
    results["key_insights"] = key_insights(results)
    print_findings(results["key_insights"], results.get("verdicts", {}),
                   heading=f"Key insights (measured on {describe_device(run.device)}, torch {torch.__version__})")
    run.finish(results)


if __name__ == "__main__":
    main()
