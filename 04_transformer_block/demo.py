"""04 — the transformer block: train the lab mini-former on character-level Shakespeare, look inside it
(residual-stream norms, logit lens), then break it (no residuals, no normalisation, post-norm at a high
learning rate) and trade depth for width at an equal parameter count.

    python 04_transformer_block/demo.py                      # full run: 2000-step reference + 400-step ablations
    python 04_transformer_block/demo.py --quick              # smoke run: 60 steps + 20-step ablations
    python 04_transformer_block/demo.py --pretrained gpt2    # only: the real GPT-2 weights in our MiniFormer
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import math

import numpy as np
from matplotlib.ticker import ScalarFormatter
import torch
import torch.nn.functional as F

from demo_cli import demo_parser, print_table, start_demo
from plotting import bar, line, panels
from runtime import Timer, describe_device
from training import evaluate, next_token_loss
from hf_interop import load_pretrained_gpt2, miniformer_from_hf_gpt2, miniformer_from_hf_llama
from lab import (char_shakespeare_data, lab_train_config, short_schedule, train_lab_variant,
                 unigram_loss)
from transformer import ConcatKVCache, MiniFormer

# nanoGPT README, "quick start" CPU run of the same configuration: "This still runs in about ~3 minutes,
# but gets us a loss of only 1.88". Quoted for comparison, never measured here.
NANOGPT_VAL_LOSS, NANOGPT_MINUTES = 1.88, 3.0
CONTEXT_LENGTH, BATCH_SIZE = 64, 12
SIZES = {"quick": dict(reference_steps=60, ablation_steps=20, eval_batches=4, final_eval_batches=8, interop_scale=4,
                       interop_tokens=12, sample_characters=100),
         "full": dict(reference_steps=2000, ablation_steps=400, eval_batches=20, final_eval_batches=200, interop_scale=1,
                      interop_tokens=40, sample_characters=300)}
# Thresholds of the computed verdicts (see `verdicts`): what counts as "matches", "stuck", "helps".
MATCH_NANOGPT_NATS = 0.03  # |our val loss - 1.88| within this = matches nanoGPT's reference
TWO_MINUTES_SECONDS = 150  # "about two minutes" on 2 cores: wall time of the reference run at most this
STUCK_AT_UNIGRAM_NATS = 0.05  # a variant within this of the unigram loss learned nothing from the context
HELPS_NATS = 0.05  # a change that costs more than this (and more than 2 standard errors) matters
SAME_LOGITS_TOLERANCE = 1e-4  # max |logit difference| for "same logits" (float32, logits of size ~4)
LEARNED_MARGIN_NATS = 0.1  # a smoothed train loss this far below unigram has left the unigram plateau
HIGH_LEARNING_RATE = 1e-2  # where post-norm without warmup breaks and pre-norm does not (see README)


def train_variant(run, data, schedule, **config_overrides):
    """A fresh lab model with config overrides: same seed, same batches as every other variant."""
    return train_lab_variant(data, schedule, seed=run.seed, device=run.device, **config_overrides)


def variant_schedule(run, steps: int, **overrides):
    """The short schedule of the ablations; quick runs evaluate on fewer batches (evaluation dominated them)."""
    if run.quick:
        overrides = {"eval_batches": 2, "eval_interval": max(1, steps // 2), **overrides}
    return short_schedule(steps, **overrides)


@torch.no_grad()
def loss_with_standard_error(model, data, split: str, batches: int):
    """Mean next-token loss over `batches` batches and its standard error (std of the batch means / sqrt(n))."""
    model.eval()
    losses = torch.tensor([next_token_loss(model, *data.batch_fn(split)).item() for _ in range(batches)])
    return losses.mean().item(), (losses.std() / math.sqrt(batches)).item()


def draw_unigram(ax, level: float):
    ax.axhline(level, color="0.4", ls="--", lw=1, label=f"unigram guess {level:.2f} (measured)")


# ---------------------------------------------------------------------------------------------------
# 1. The reference training run
# ---------------------------------------------------------------------------------------------------

def reference_training(run, data, sizes, figure_name: str = "training_curves"):
    """nanoGPT's CPU configuration (4 layers, 4 heads, 128 dims, context 64, batch 12, lr 1e-3) on our code."""
    steps = sizes["reference_steps"]
    schedule = lab_train_config(steps=steps, eval_interval=max(1, steps // 8), eval_batches=sizes["eval_batches"],
                                warmup_steps=min(100, steps // 10))  # 100 in the full run, as nanoGPT
    with Timer(run.device) as wall:
        model, history = train_variant(run, data, schedule)
    # The final estimate averages many more batches than the evaluations during training.
    final_val, final_val_error = loss_with_standard_error(model, data, "val", sizes["final_eval_batches"])
    final_train = evaluate(model, data.batch_fn, "train", sizes["final_eval_batches"])
    generator = torch.Generator(device=run.device).manual_seed(run.seed)
    vocab = data.vocab
    start = torch.tensor([[vocab.index["\n"]]], device=run.device)
    sample = vocab.decode(model.generate(start, sizes["sample_characters"], temperature=0.8,
                                         generator=generator)[0, 1:].tolist())


    reference = {
        "steps": steps, "batch_size": BATCH_SIZE, "context_length": CONTEXT_LENGTH,
        "parameters": model.num_parameters(), "non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
        "eval_steps": history.eval_steps, "val_curve": history.val_loss, "train_curve": history.eval_train_loss,
        "final_val_loss": final_val, "final_val_standard_error": final_val_error, "final_train_loss": final_train,
        "final_eval_batches": sizes["final_eval_batches"],
        "last_eval_val_loss": history.final_val_loss, "wall_seconds": wall.seconds,
        "train_seconds": history.train_seconds, "tokens_per_second": history.tokens_per_second,
        "tokens_seen": history.tokens_seen, "diverged": history.diverged, "sample": sample,
        "train_loss_per_step": history.train_loss, "grad_norm_per_step": history.grad_norm,
        "insights": [f"The lab model ({model.num_parameters():,} parameters) reaches validation loss {final_val:.3f} "
                     f"+- {final_val_error:.3f} (standard error over {sizes['final_eval_batches']} batches) after "
                     f"{steps} steps (nanoGPT's README quotes {NANOGPT_VAL_LOSS} for this configuration), training "
                     f"at {history.tokens_per_second:,.0f} tokens/s, {wall.seconds:.0f} s wall time including "
                     f"evaluation."],
    }
    draw_training_curves(run, reference, figure_name)
    return model, reference


def draw_training_curves(run, reference: dict, figure_name: str = "training_curves") -> None:
    """Loss curves and gradient norm of the reference run, from its stored numbers."""
    per_step = np.array(reference["train_loss_per_step"])
    fig, (ax_loss, ax_grad) = panels(1, 2, width=5.6, height=3.8,
                                     title=f"Lab model: val loss {reference['final_val_loss']:.3f} after "
                                           f"{reference['steps']} steps ({reference['tokens_per_second']:,.0f} "
                                           f"tokens/s on {run.device.type})")
    window = max(1, len(per_step) // 40)
    smoothed = np.convolve(per_step, np.ones(window) / window, mode="valid")
    ax_loss.plot(np.arange(1, len(per_step) + 1), per_step, color="0.75", lw=0.6, label="train loss per step")
    ax_loss.plot(np.arange(window, len(per_step) + 1), smoothed, color="C0", label=f"train, mean of {window} steps")
    ax_loss.plot(reference["eval_steps"], reference["val_curve"], "o-", color="C3", ms=4,
                 label="validation (eval batches)")
    ax_loss.axhline(NANOGPT_VAL_LOSS, color="k", ls="--", lw=1,
                    label=f"nanoGPT README: {NANOGPT_VAL_LOSS} (quoted, not measured)")
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy (nats / character)", ylim=(1.0, 4.5),
                title="Loss curves")
    ax_loss.legend()
    ax_grad.plot(np.arange(1, len(per_step) + 1), reference["grad_norm_per_step"], color="C2", lw=0.6)
    ax_grad.set(xlabel="optimizer step", ylabel="global gradient norm (before clipping at 1)", yscale="log",
                title="Gradient norm")
    ax_grad.yaxis.set_major_formatter(ScalarFormatter())
    ax_grad.yaxis.set_minor_formatter(ScalarFormatter())
    run.save(fig, figure_name)


# ---------------------------------------------------------------------------------------------------
# 2-3. Inside the trained model: residual-stream norms and the logit lens
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def hidden_states_on_val(run, model, data, batches: int):
    """Residual stream after the embedding and each block, and the targets, for the same `batches` val batches
    at every call."""
    model.eval()
    data.generator.manual_seed(run.seed)
    xs, ys = zip(*(data.batch_fn("val") for _ in range(batches)))
    x, y = torch.cat(xs), torch.cat(ys)  # (N, T)
    _, hidden = model.forward_with_hidden(x)
    return hidden, y


def residual_norms(run, trained, data):
    """Mean L2 norm of the residual stream per layer, at initialisation and after training."""
    torch.manual_seed(run.seed)
    untrained = MiniFormer(trained.config).to(run.device)
    norms = {}
    for name, model in (("at initialisation", untrained), ("after training", trained)):
        hidden, _ = hidden_states_on_val(run, model, data, 8)
        norms[name] = [h.norm(dim=-1).mean().item() for h in hidden]
    layers = list(range(len(norms["after training"])))
    labels = ["embed"] + [f"block {i}" for i in layers[1:]]
    growth = norms["after training"][-1] / norms["after training"][0]
    fig, (ax,) = panels(1, 1, width=6, height=3.8)
    line(ax, layers, norms, xlabel="residual stream position (0 = embedding output)",
         ylabel="mean L2 norm per token",
         title=f"Training grows the residual stream {growth:.1f}x from embedding to last block")
    ax.set_xticks(layers, labels)
    run.save(fig, "residual_norms")
    return {"layers": labels, **{name.replace(" ", "_"): values for name, values in norms.items()},
            "growth_trained": growth,
            "insights": [f"The residual stream's norm grows {growth:.1f}x from the embedding to the last block after "
                         f"training (from {norms['at initialisation'][0]:.2f} to {norms['at initialisation'][-1]:.2f} "
                         f"at initialisation)."]}


@torch.no_grad()
def logit_lens(run, model, data, unigram: float):
    """final_norm_and_head applied to every layer's residual stream: loss, top-1 accuracy, and how often the
    top-1 guess is simply the input character (what a tied head reads from a bare embedding)."""
    hidden, targets = hidden_states_on_val(run, model, data, 16)
    inputs = torch.cat([targets.new_full((targets.shape[0], 1), -1), targets[:, :-1]], dim=1)  # (N, T); -1 unknown
    vocab_size = data.vocab.size
    losses, accuracies, copies = [], [], []
    for h in hidden:
        logits = model.final_norm_and_head(h)  # (N, T, V)
        losses.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())
        accuracies.append((logits.argmax(-1) == targets).float().mean().item())
        copies.append((logits.argmax(-1) == inputs)[:, 1:].float().mean().item())
    labels = ["embed"] + [f"block {i}" for i in range(1, len(hidden))]
    fig, (ax_loss, ax_acc) = panels(1, 2, width=5, height=3.6,
                                    title=f"Logit lens: loss falls from {losses[0]:.2f} (embedding) to "
                                          f"{losses[-1]:.2f} (last block)")
    line(ax_loss, labels, {"logit-lens loss": losses}, xlabel="residual stream read at",
         ylabel="validation cross-entropy (nats)", title="Loss if the model stopped here")
    ax_loss.axhline(math.log(vocab_size), color="k", ls=":", lw=1, label=f"uniform guess ln {vocab_size} (formula)")
    draw_unigram(ax_loss, unigram)
    ax_loss.legend()
    line(ax_acc, labels, {"top-1 = next character (accuracy)": [100 * a for a in accuracies],
                          "top-1 = current input character": [100 * c for c in copies]},
         xlabel="residual stream read at", ylabel="share of positions (%)", title="What the top-1 guess is")
    run.save(fig, "logit_lens")
    insight = (f"Logit lens: reading the stream with the final norm and head gives loss {losses[0]:.2f} after the "
               f"embedding, {losses[-2]:.2f} one block before the end and {losses[-1]:.2f} at the end (top-1 accuracy "
               f"{100 * accuracies[0]:.0f}% -> {100 * accuracies[-1]:.0f}%); read at the embedding the tied head's "
               f"top-1 guess is the input character itself {100 * copies[0]:.1f}% of the time.")
    return {"layers": labels, "loss": losses, "top1_accuracy": accuracies, "top1_is_input": copies,
            "insights": [insight]}


# ---------------------------------------------------------------------------------------------------
# 4-6. Break it: ablations, pre vs post norm at a high learning rate, depth vs width
# ---------------------------------------------------------------------------------------------------

ABLATIONS = {"pre-norm (baseline)": {}, "post-norm": {"norm_placement": "post"},
             "no residual connections": {"residual": False}, "no normalisation": {"norm": "none"}}


def smoothed(values, window: int) -> np.ndarray:
    """Running mean over `window` steps (valid part only: entry i covers steps i .. i + window - 1)."""
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plateau_and_spike(train_loss, unigram: float, window: int) -> dict:
    """From the per-step train loss: the first step whose `window`-step mean is LEARNED_MARGIN_NATS below the
    unigram loss (the end of the unigram plateau; None if never), and the largest rise of that mean above its
    running minimum (a loss spike; 0 when the curve only ever falls)."""
    curve = smoothed(train_loss, window)
    below = np.flatnonzero(curve < unigram - LEARNED_MARGIN_NATS)
    rise = curve - np.minimum.accumulate(curve)
    return {"smoothing_window": window, "left_plateau_at_step": int(below[0]) + window if below.size else None,
            "largest_rise_nats": float(rise.max()), "largest_rise_at_step": int(rise.argmax()) + window}


def ablations(run, data, steps, unigram: float):
    """Each variant of the lab model trained `steps` steps at the reference learning rate 1e-3."""
    results = {}
    window = max(1, steps // 20)
    for name, overrides in ABLATIONS.items():
        _, history = train_variant(run, data, variant_schedule(run, steps), **overrides)
        results[name] = {"overrides": overrides, "eval_steps": history.eval_steps, "val_curve": history.val_loss,
                         "final_val_loss": history.final_val_loss, "diverged": history.diverged,
                         "train_loss_per_step": history.train_loss,
                         **plateau_and_spike(history.train_loss, unigram, window)}
        print(f"  ablation {name:<26} val loss {history.final_val_loss:.3f}")
    baseline = results["pre-norm (baseline)"]["final_val_loss"]
    worst = max(results, key=lambda n: results[n]["final_val_loss"])
    fig, (ax_val, ax_train) = panels(1, 2, width=5.4, height=3.8,
                                     title=f"Ablations, {steps} steps at lr 1e-3: worst is '{worst}', "
                                           f"{results[worst]['final_val_loss'] - baseline:+.2f} nats vs pre-norm")
    line(ax_val, results[next(iter(results))]["eval_steps"], {n: r["val_curve"] for n, r in results.items()},
         xlabel="optimizer step", ylabel="validation cross-entropy (nats)", title="Validation loss")
    draw_unigram(ax_val, unigram)
    ax_val.legend()
    for name, r in results.items():
        curve = smoothed(r["train_loss_per_step"], window)
        ax_train.plot(np.arange(window, len(r["train_loss_per_step"]) + 1), curve, label=name)
    draw_unigram(ax_train, unigram)
    ax_train.set(xlabel="optimizer step", ylabel=f"train loss (mean of {window} steps)", title="Training loss")
    ax_train.legend()
    run.save(fig, "ablations")
    insights = []
    for name, r in results.items():
        if name != "pre-norm (baseline)":
            insights.append(f"{name}: validation loss {r['final_val_loss']:.3f} vs {baseline:.3f} for the pre-norm "
                            f"baseline after {steps} steps ({r['final_val_loss'] - baseline:+.3f} nats); its "
                            f"{window}-step mean train loss left the unigram plateau "
                            + (f"at step {r['left_plateau_at_step']}" if r["left_plateau_at_step"] else "never")
                            + f" and rose at most {r['largest_rise_nats']:.3f} nats "
                            f"above its running minimum (step {r['largest_rise_at_step']}).")
    return {"variants": results, "insights": insights}


def pre_vs_post_high_lr(run, data, steps, ablation_results, unigram: float):
    """Pre- and post-norm at HIGH_LEARNING_RATE without warmup, beside their lr-1e-3 runs from the ablations."""
    results = {}
    for placement in ("pre", "post"):
        _, history = train_variant(run, data, variant_schedule(run, steps, learning_rate=HIGH_LEARNING_RATE, warmup_steps=0),
                                   norm_placement=placement)
        results[placement] = {"eval_steps": history.eval_steps, "val_curve": history.val_loss,
                              "final_val_loss": history.final_val_loss, "diverged": history.diverged,
                              "steps_completed": len(history.train_loss)}
        print(f"  {placement}-norm at lr {HIGH_LEARNING_RATE:g}, no warmup: val loss {history.final_val_loss:.3f}"
              f"{' (diverged)' if history.diverged else ''}")
    low = {"pre": ablation_results["variants"]["pre-norm (baseline)"],
           "post": ablation_results["variants"]["post-norm"]}
    fig, (ax_low, ax_high) = panels(1, 2, width=5, height=3.6,
                                    title=f"At lr {HIGH_LEARNING_RATE:g} without warmup: pre-norm "
                                          f"{results['pre']['final_val_loss']:.2f}, post-norm "
                                          f"{results['post']['final_val_loss']:.2f} nats")
    high = f"{HIGH_LEARNING_RATE:g} (no warmup)"
    for ax, curves, lr in ((ax_low, low, "1e-3 (with warmup)"), (ax_high, results, high)):
        for placement, marker in (("pre", "o-"), ("post", "s-")):  # a diverged run has fewer evaluations
            ax.plot(curves[placement]["eval_steps"], curves[placement]["val_curve"], marker, ms=3,
                    label=f"{placement}-norm")
        ax.set(xlabel="optimizer step", ylabel="validation cross-entropy (nats)", title=f"lr {lr}")
        draw_unigram(ax, unigram)
        ax.legend()
    ax_high.set_ylim(ax_low.get_ylim()[0], None)
    run.save(fig, "pre_vs_post_norm")
    insight = (f"At lr {HIGH_LEARNING_RATE:g} with no warmup, pre-norm reaches {results['pre']['final_val_loss']:.3f} "
               f"and post-norm {results['post']['final_val_loss']:.3f}"
               f"{' (diverged)' if results['post']['diverged'] else ''} (unigram {unigram:.3f}).")
    return {"learning_rate": HIGH_LEARNING_RATE, "warmup_steps": 0, **results, "insights": [insight]}


DEPTH_WIDTH = {"1 layer x 256": dict(num_layers=1, embed_dim=256, num_heads=8),
               "4 layers x 128": dict(num_layers=4, embed_dim=128, num_heads=4),
               "16 layers x 64": dict(num_layers=16, embed_dim=64, num_heads=2)}


def draw_depth_vs_width(run, results: dict, steps: int) -> None:
    best = min(results, key=lambda n: results[n]["final_val_loss"])
    fastest = max(results, key=lambda n: results[n]["tokens_per_second"])
    fig, (ax_curve, ax_speed) = panels(1, 2, width=5.2, height=3.6,
                                       title=f"Equal parameters, {steps} steps: {best} learns fastest")
    line(ax_curve, results[best]["eval_steps"], {n: r["val_curve"] for n, r in results.items()},
         xlabel="optimizer step", ylabel="validation cross-entropy (nats)", title="Validation loss")
    bar(ax_speed, list(results), [r["tokens_per_second"] for r in results.values()], ylabel="training tokens / s",
        title=f"Throughput on {run.device.type}: {fastest} fastest in this run\n(measured one after another; "
              f"a changing load moves these)", annotate_fmt="{:,.0f}")
    run.save(fig, "depth_vs_width")


def depth_vs_width(run, data, steps):
    """Layers x width with layers * width^2 constant (equal non-embedding parameters, head size 32)."""
    results = {}
    for name, overrides in DEPTH_WIDTH.items():
        model, history = train_variant(run, data, variant_schedule(run, steps), **overrides)
        results[name] = {**overrides, "non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
                         "eval_steps": history.eval_steps, "val_curve": history.val_loss,
                         "final_val_loss": history.final_val_loss, "tokens_per_second": history.tokens_per_second}
        print(f"  {name:<16} {results[name]['non_embedding_parameters']:,} non-embedding parameters, "
              f"val loss {history.final_val_loss:.3f}, {history.tokens_per_second:,.0f} tokens/s")
    draw_depth_vs_width(run, results, steps)
    shape_text = ", ".join(f"{n}: {r['final_val_loss']:.3f}" for n, r in results.items())
    return {"shapes": results,
            "insights": [f"At equal non-embedding parameters after {steps} steps: {shape_text} (throughputs in "
                         f"the figure were measured one after another, so only their order is comparable)."]}


# ---------------------------------------------------------------------------------------------------
# 7. Interop: Hugging Face GPT-2 and Llama (random weights from a config) in our MiniFormer
# ---------------------------------------------------------------------------------------------------

INTEROP_CONFIGS = {
    "GPT-2: 4 layers, 8 heads": (
        "GPT2", dict(vocab_size=500, n_positions=128, n_embd=256, n_layer=4, n_head=8)),
    "Llama: 4 layers, 8 heads, 2 KV heads": (
        "Llama", dict(vocab_size=500, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)),
    "Llama: 2 layers, 4 heads, 1 KV head, tied head": (
        "Llama", dict(vocab_size=500, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True)),
}


# Classic conversion mistakes: each function breaks a correct conversion in one way and returns its logits.
def _exact_gelu(ours, ids):
    for block in ours.blocks:
        block.ffn.approximate = "none"  # GPT-2 was trained with the tanh approximation (gelu_new)
    return ours(ids)


def _untransposed_c_proj(ours, ids):
    for block in ours.blocks:  # square, so it loads without a shape error: the silent kind of bug
        block.attn.out.weight.data = block.attn.out.weight.data.t().clone()
    return ours(ids)


def _interleaved_rope(ours, ids):
    for block in ours.blocks:
        block.attn.rope_layout = "interleaved"  # HF Llama pairs feature i with i + D/2, not 2i with 2i+1
    return ours(ids)


def _wrong_rmsnorm_eps(ours, ids):
    for module in ours.modules():
        if isinstance(module, torch.nn.RMSNorm):
            module.eps = 1e-5  # the config says 1e-6
    return ours(ids)


def _top_left_causal_with_cache(ours, ids):
    def top_left_causal(q, k, v, context):  # SDPA's is_causal=True even when a cache is used
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), None

    for block in ours.blocks:
        block.attn.attend = top_left_causal
    cache = ConcatKVCache()
    return torch.cat([ours(ids[:, t:t + 1], kv_cache=cache) for t in range(ids.shape[1])], dim=1)


INTEROP_MISTAKES = {
    "GPT-2: exact GELU (not gelu_new)": ("GPT2", _exact_gelu),
    "GPT-2: c_proj not transposed": ("GPT2", _untransposed_c_proj),
    "Llama: interleaved RoPE layout": ("Llama", _interleaved_rope),
    "Llama: RMSNorm eps 1e-5 (config 1e-6)": ("Llama", _wrong_rmsnorm_eps),
    "KV cache with SDPA is_causal (top-left)": ("Llama", _top_left_causal_with_cache),
}


def hugging_face_pair(transformers, family: str, settings: dict, run):
    """(hf_model, our conversion of it): random weights from a config, biases and gains randomised too."""
    torch.manual_seed(run.seed)
    config = getattr(transformers, f"{family}Config")(**settings, bos_token_id=None, eos_token_id=None)
    hf_model = getattr(transformers, "GPT2LMHeadModel" if family == "GPT2" else "LlamaForCausalLM")(config)
    with torch.no_grad():
        for parameter in hf_model.parameters():  # HF starts biases at 0 and norm gains at 1: randomise everything
            parameter.add_(0.05 * torch.randn_like(parameter))
    hf_model = hf_model.to(run.device).eval()
    return hf_model, (miniformer_from_hf_gpt2 if family == "GPT2" else miniformer_from_hf_llama)(hf_model)


@torch.no_grad()
def shrink(settings: dict, scale: int) -> dict:
    """The same Hugging Face config with its widths divided by `scale` (quick mode), head counts kept."""
    return {k: v // scale if k in ("n_embd", "hidden_size", "intermediate_size") else v for k, v in settings.items()}


def interop(run, scale: int = 1, new_tokens: int = 40):
    """Max |logit difference| between Hugging Face models and our conversions of them, whether greedy generation
    (ours with our KV cache, theirs with theirs) picks the same `new_tokens` tokens, and what each classic
    mistake costs."""
    try:
        import transformers
    except ImportError:
        print("  transformers is not installed: interop check skipped (pip install transformers)")
        return {"available": False}
    correct, mistakes = {}, {}
    for name, (family, settings) in INTEROP_CONFIGS.items():
        settings = shrink(settings, scale)
        hf_model, ours = hugging_face_pair(transformers, family, settings, run)
        ids = torch.randint(0, settings["vocab_size"], (4, 64), device=run.device)
        hf_logits = hf_model(ids).logits
        prompt = ids[:1, :8]
        ours_tokens = ours.generate(prompt, new_tokens, temperature=0)
        hf_tokens = hf_model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        correct[name] = {"max_abs_logit_difference": (ours(ids) - hf_logits).abs().max().item(),
                         "logit_scale": hf_logits.abs().max().item(),
                         "greedy_identical": torch.equal(ours_tokens, hf_tokens)}
        print(f"  {name:<46} max |logit diff| {correct[name]['max_abs_logit_difference']:.1e} "
              f"(logits up to {correct[name]['logit_scale']:.1f}), "
              f"greedy 40 tokens identical: {correct[name]['greedy_identical']}")
    first_of = {family: name for name, (family, _) in reversed(INTEROP_CONFIGS.items())}
    for name, (family, break_it) in INTEROP_MISTAKES.items():
        hf_model, ours = hugging_face_pair(transformers, family, shrink(INTEROP_CONFIGS[first_of[family]][1], scale), run)
        ids = torch.randint(0, hf_model.config.vocab_size, (4, 64), device=run.device)
        mistakes[name] = {"max_abs_logit_difference": (break_it(ours, ids) - hf_model(ids).logits).abs().max().item()}
        print(f"  mistake: {name:<37} max |logit diff| {mistakes[name]['max_abs_logit_difference']:.1e}")
    fig, (ax,) = panels(1, 1, width=9, height=4.6)
    values = [r["max_abs_logit_difference"] for r in (*correct.values(), *mistakes.values())]
    bar(ax, [*correct, *mistakes], values, logy=True, ylabel="max |our logit - HF logit|",
        annotate_fmt="{:.1e}", color=["C0"] * len(correct) + ["C3"] * len(mistakes), rotate=25,
        title=f"Same weights, same logits (<= {max(values[:len(correct)]):.0e}); each classic mistake "
              f"(red) shows up at >= {min(values[len(correct):]):.0e}")
    ax.axhline(torch.finfo(torch.float32).eps, color="k", ls=":", lw=1, label="float32 machine epsilon (formula)")
    ax.set_ylim(1e-8, 1e2)
    ax.legend(loc="upper left")
    run.save(fig, "interop")
    insights = [f"{name} converted from Hugging Face: max |logit difference| {r['max_abs_logit_difference']:.1e}, "
                f"greedy generation identical: {r['greedy_identical']}." for name, r in correct.items()]
    insights += [f"Conversion mistake '{name}': max |logit difference| {r['max_abs_logit_difference']:.1e}."
                 for name, r in mistakes.items()]
    return {"available": True, "width_divided_by": scale, "correct": correct, "mistakes": mistakes,
            "insights": insights}


# ---------------------------------------------------------------------------------------------------
# --pretrained gpt2: the real weights in our model (needs the local Hugging Face cache or the internet)
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def pretrained_gpt2(run, prompt: str = "The meaning of life is"):
    """Convert GPT-2 (124M) into a MiniFormer, check its logits against Hugging Face, and generate."""
    try:
        hf_model, encode, decode = load_pretrained_gpt2()
    except RuntimeError as error:
        print(f"\n--pretrained gpt2 is not possible here:\n  {error}")
        return {"available": False, "reason": str(error)}
    hf_model = hf_model.to(run.device).eval()
    ours = miniformer_from_hf_gpt2(hf_model)
    ids = torch.tensor([encode(prompt)], device=run.device)
    difference = (ours(ids) - hf_model(ids).logits).abs().max().item()
    ours_greedy = ours.generate(ids, 30, temperature=0)[0, ids.shape[1]:].tolist()
    hf_greedy = hf_model.generate(ids, max_new_tokens=30, do_sample=False)[0, ids.shape[1]:].tolist()
    generator = torch.Generator(device=run.device).manual_seed(run.seed)
    sampled = ours.generate(ids, 60, temperature=0.8, top_k=40, generator=generator)[0].tolist()
    probs = torch.softmax(ours(ids)[0, -1], dim=-1)
    top = torch.topk(probs, 10)
    fig, (ax,) = panels(1, 1, width=7, height=3.6)
    bar(ax, [repr(decode([i])) for i in top.indices.tolist()], top.values.tolist(), ylabel="probability",
        rotate=30, title=f"GPT-2 in our MiniFormer: next token after {prompt!r} (max |logit diff| vs HF "
                         f"{difference:.1e})")
    run.save(fig, "pretrained_gpt2")
    print(f"\nprompt {prompt!r}\n  greedy (ours):   {decode(ours_greedy)!r}\n  greedy (HF):     {decode(hf_greedy)!r}"
          f"\n  sampled (ours):  {decode(sampled)!r}\n  max |logit difference| {difference:.2e}")
    return {"available": True, "max_abs_logit_difference": difference, "greedy_identical": ours_greedy == hf_greedy,
            "greedy_text": decode(ours_greedy), "sampled_text": decode(sampled)}


# ---------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------
# Verdicts on the claims, decided by the thresholds at the top of this file
# ---------------------------------------------------------------------------------------------------

def verdicts(reference, ablation, pre_post, hf_interop, unigram: float, only=None) -> dict:
    """holds / fails / not measured for each claim of CURRICULUM.md and the brief, with the numbers behind it
    (`only`: the claims a partial run measured)."""
    error = reference["final_val_standard_error"]
    claims = {}
    gap = abs(reference["final_val_loss"] - NANOGPT_VAL_LOSS)
    claims["trains to nanoGPT's 1.88 on the CPU config"] = {
        "verdict": "holds" if gap <= MATCH_NANOGPT_NATS else "fails",
        "evidence": f"val {reference['final_val_loss']:.3f} +- {error:.3f} after {reference['steps']} steps, "
                    f"|gap| {gap:.3f} vs threshold {MATCH_NANOGPT_NATS}"}
    claims["in about two minutes on 2 cores"] = {
        "verdict": "holds" if reference["wall_seconds"] <= TWO_MINUTES_SECONDS and reference["steps"] == 2000 else "fails",
        "evidence": f"{reference['steps']} steps in {reference['wall_seconds']:.0f} s wall (threshold "
                    f"{TWO_MINUTES_SECONDS} s for 2000 steps; load average in results.json's environment)"}
    if only is not None:
        return {claim: claims[claim] for claim in only}
    variants = ablation["variants"]
    baseline = variants["pre-norm (baseline)"]["final_val_loss"]
    no_residual = variants["no residual connections"]["final_val_loss"]
    claims["without residual connections the model learns nothing from context"] = {
        "verdict": "holds" if abs(no_residual - unigram) <= STUCK_AT_UNIGRAM_NATS else "fails",
        "evidence": f"{no_residual:.3f} vs unigram {unigram:.3f} (threshold {STUCK_AT_UNIGRAM_NATS})"}
    for name, claim in (("no normalisation", "normalisation helps"), ("post-norm", "pre-norm beats post-norm at lr 1e-3")):
        cost = variants[name]["final_val_loss"] - baseline
        claims[claim] = {"verdict": "holds" if cost > max(HELPS_NATS, 2 * error) else "fails",
                         "evidence": f"{name} {variants[name]['final_val_loss']:.3f} vs pre-norm {baseline:.3f} "
                                     f"({cost:+.3f}; threshold {max(HELPS_NATS, 2 * error):.3f})"}
    post_stuck = abs(pre_post["post"]["final_val_loss"] - unigram) <= STUCK_AT_UNIGRAM_NATS or pre_post["post"]["diverged"]
    pre_learns = pre_post["pre"]["final_val_loss"] < unigram - LEARNED_MARGIN_NATS
    claims[f"at lr {HIGH_LEARNING_RATE:g} without warmup post-norm fails while pre-norm learns"] = {
        "verdict": "holds" if post_stuck and pre_learns else "fails",
        "evidence": f"post {pre_post['post']['final_val_loss']:.3f}, pre {pre_post['pre']['final_val_loss']:.3f}, "
                    f"unigram {unigram:.3f}"}
    if hf_interop.get("available"):
        worst = max(r["max_abs_logit_difference"] for r in hf_interop["correct"].values())
        same = worst <= SAME_LOGITS_TOLERANCE and all(r["greedy_identical"] for r in hf_interop["correct"].values())
        claims["same logits as HF GPT2LMHeadModel and LlamaForCausalLM"] = {
            "verdict": "holds" if same else "fails",
            "evidence": f"max |logit difference| {worst:.1e} (threshold {SAME_LOGITS_TOLERANCE:g}), greedy identical"}
    else:
        claims["same logits as HF GPT2LMHeadModel and LlamaForCausalLM"] = {
            "verdict": "not measured", "evidence": "transformers is not installed"}
    return claims


def main():
    parser = demo_parser(__doc__)
    parser.add_argument("--pretrained", choices=["gpt2"], default=None,
                        help="instead of training: load the real GPT-2 weights into a MiniFormer and generate")
    parser.add_argument("--only", choices=["reference"], default=None,
                        help="run only the reference training (timing on free cores); writes results_reference.json")
    args = parser.parse_args()
    run = start_demo(args, __file__)
    if args.pretrained:
        run.finish({"pretrained_gpt2": pretrained_gpt2(run)})
        return
    sizes = SIZES["quick" if args.quick else "full"]
    data = char_shakespeare_data(CONTEXT_LENGTH, BATCH_SIZE, run.device, seed=args.seed)
    print(f"corpus {data.corpus}, {data.vocab.size} characters, batches of {BATCH_SIZE} x {CONTEXT_LENGTH}")
    if args.only == "reference":
        _, reference = reference_training(run, data, sizes, "training_curves_reference_only")
        claim = "in about two minutes on 2 cores"
        verdict = verdicts(reference, None, None, {}, float("nan"), only=[claim])
        print(f"  {reference['insights'][0]}\n  {claim}: {verdict[claim]['verdict']} ({verdict[claim]['evidence']})")
        run.finish({"corpus": data.corpus, "reference": reference, "verdicts": verdict}, filename="results_reference.json")
        return

    unigram = unigram_loss(data)
    reference_model, reference = reference_training(run, data, sizes)
    print(f"\nsample (temperature 0.8):\n{reference['sample']}\n")
    norms = residual_norms(run, reference_model, data)
    lens = logit_lens(run, reference_model, data, unigram)
    ablation = ablations(run, data, sizes["ablation_steps"], unigram)
    pre_post = pre_vs_post_high_lr(run, data, sizes["ablation_steps"], ablation, unigram)
    shapes = depth_vs_width(run, data, sizes["ablation_steps"])
    hf_interop = interop(run, sizes["interop_scale"], sizes["interop_tokens"])

    steps = sizes["ablation_steps"]
    rows = [{"experiment": "reference (nanoGPT CPU config)", "steps": reference["steps"],
             "val loss": reference["final_val_loss"], "note": f"{reference['tokens_per_second']:,.0f} tokens/s, "
                                                              f"{reference['wall_seconds']:.0f} s wall"}]
    rows += [{"experiment": f"ablation: {name}", "steps": steps, "val loss": r["final_val_loss"],
              "note": "diverged" if r["diverged"] else ""} for name, r in ablation["variants"].items()]
    rows += [{"experiment": f"{p}-norm, lr {HIGH_LEARNING_RATE:g}, no warmup", "steps": steps,
              "val loss": pre_post[p]["final_val_loss"], "note": "diverged" if pre_post[p]["diverged"] else ""}
             for p in ("pre", "post")]
    rows += [{"experiment": f"shape: {name}", "steps": steps, "val loss": r["final_val_loss"],
              "note": f"{r['non_embedding_parameters']:,} params, {r['tokens_per_second']:,.0f} tok/s"}
             for name, r in shapes["shapes"].items()]
    print_table(rows, title=f"Measured on {describe_device(run.device)}, torch {torch.__version__}")

    insights = [f"The unigram guess (character frequencies, no context) scores {unigram:.3f}: a run stuck there "
                f"has learned nothing from the context."]
    for experiment in (reference, norms, lens, ablation, pre_post, shapes, hf_interop):
        insights += experiment.get("insights", [])
    print("\nKey insights")
    for insight in insights:
        print(f"  - {insight}")
    claims = verdicts(reference, ablation, pre_post, hf_interop, unigram)
    print("\nVerdicts (thresholds in demo.py)")
    for claim, verdict in claims.items():
        print(f"  - {claim}: {verdict['verdict']} ({verdict['evidence']})")

    run.finish({"corpus": data.corpus, "vocab_size": data.vocab.size, "unigram_val_loss": unigram,
                "nanogpt_reference": {"val_loss": NANOGPT_VAL_LOSS, "minutes": NANOGPT_MINUTES,
                                      "source": "nanoGPT README (quoted, not measured here)"},
                "reference": reference, "residual_norms": norms, "logit_lens": lens, "ablations": ablation,
                "pre_vs_post_high_lr": pre_post, "depth_vs_width": shapes, "interop": hf_interop,
                "insights": insights, "verdicts": claims})


if __name__ == "__main__":
    main()
