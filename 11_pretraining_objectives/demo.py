"""11 — Pretraining objectives: the same lab model trained as a causal, a masked and a prefix LM; what each
is good for; how much to mask; and how to compare models whose tokens differ (bits per byte).

Experiments (each draws one figure and fills one section of results.json):
  1. loss_curves: 04's lab model (2 layers in the full run, RoPE positions; same seed and batches) trained
     under each objective; validation loss on each objective's own targets, against steps and against the
     number of positions that carried a loss (a masked LM learns from only the masked positions); and the
     masked LM once more with 04's learned position table instead of RoPE.
  2. good_for: generation (the loss of the next character after 63 characters of context, and samples)
     against representation (a scikit-learn logistic-regression probe on frozen mean-pooled features: which
     of the corpus's top speakers says a 64-character piece of a speech), for every objective, a randomly
     initialised model and a bag-of-characters baseline.
  3. masking_rate: masked LMs trained at several masking rates (and spans at 15%): loss at a common 15%
     evaluation rate and probe accuracy (BERT's ~15% against Wettig et al. 2022, "Should you mask 15%?").
  4. char_vs_bpe: the causal lab model on characters and on 01's BPE tokens: loss per token, perplexity
     and bits per byte on the same validation text.
  5. break_it: the causal objective with the causal mask forgotten (every position reads every position).

Every claim's verdict is decided in code against the threshold written beside it (results.json "verdicts").
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bpe import Tokenizer, train_bpe
from data import load_corpus, random_batch
from demo_cli import demo_parser, print_table, report_findings, start_demo
from lab import char_shakespeare_data, lab_model_config, short_schedule, unigram_loss
from metrics import bits_per_byte, bits_per_token, perplexity, utf8_bytes
from objectives import (IGNORE_INDEX, CausalLM, MaskedLM, ObjectiveBatch, PrefixLM, attention_visibility,
                        bidirectional_visibility, prefix_visibility)
from plotting import bar, line, panels
from runtime import Timer
from speakers import speaker_pieces
from training import evaluate, train
from transformer import MiniFormer

CONTEXT = 64
# 04's lab model with 02's RoPE instead of its learned table: with learned absolute positions a bidirectional
# model sat on a plateau near the unigram loss for hundreds of steps (experiment 1 keeps that run to show it).
POSITION = "rope"
OBJECTIVES = ("causal", "prefix", "masked")
COLORS = {"causal": "tab:blue", "prefix": "tab:green", "masked": "tab:red", "random init": "tab:gray",
          "bag of characters": "tab:olive", "leaky causal": "tab:purple"}
# Quick and full runs differ in these sizes only (model: overrides of 04's lab model).
SIZES = {
    "quick": dict(model=dict(num_layers=2, embed_dim=64), steps=30, batch_size=8, eval_batches=4,
                  rates=(0.15, 0.4, 0.8), span=False, speakers=4, windows_per_speaker=60, generation_windows=256,
                  sample_chars=80, bpe_vocab=320, bpe_train_chars=200_000, bpe_eval_batches=8),
    "full": dict(model=dict(num_layers=2), steps=400, batch_size=12, eval_batches=8, rates=(0.05, 0.15, 0.3, 0.5, 0.8),
                 span=True, speakers=6, windows_per_speaker=250, generation_windows=2048, sample_chars=300,
                 bpe_vocab=512, bpe_train_chars=None, bpe_eval_batches=100),
}
MASK_RATE = 0.15  # BERT's rate: the masked LM of experiments 1 and 2, and the common evaluation rate of 3
SPAN_LENGTH = 3
TEMPERATURE = 0.8  # for the samples only; the generation loss needs no sampling
# Thresholds of the verdicts, each written beside the claim it decides.
GENERATION_MARGIN_BITS = 0.1  # causal "good for generation": its next-character loss at least 0.1 bits below masked
PROBE_SIGMAS = 2.0  # a probe accuracy gap counts when it exceeds 2 standard errors of the difference
RATE_EFFECT_NATS = 0.05  # the masking rate "matters" when the common-rate loss spans more than 0.05 nats ...
RATE_SIGMAS = 3.0  # ... and more than 3 paired standard errors (same masked positions for every model)
POSITION_EFFECT_NATS = 0.1  # RoPE "matters" to the masked LM when it ends at least 0.1 nats below learned positions
TOKEN_METRIC_DISTORTION = 0.2  # per-token numbers "mislead" when their BPE/char ratio is off the bpb ratio by > 20%


# ---------------------------------------------------------------------------------------------- shared helpers
class LeakyCausalLM(CausalLM):
    """Break it: next-token targets, but every position reads every position (the causal mask forgotten)."""

    name = "leaky causal"

    def make_batch(self, x, y):
        return ObjectiveBatch(x, y, bidirectional_visibility(x.shape[1], x.device))


def make_objective(name: str, vocab_size: int, seed: int, rate: float = MASK_RATE, strategy: str = "token"):
    """The objective `name`; the [MASK] id is the id after the character vocabulary."""
    if name == "causal":
        return CausalLM(seed)
    if name == "prefix":
        return PrefixLM(seed=seed)
    return MaskedLM(mask_id=vocab_size, vocab_size=vocab_size, rate=rate, strategy=strategy,
                    span_length=SPAN_LENGTH, seed=seed)


def topic_model(run, sizes, vocab_size: int, position: str = POSITION) -> MiniFormer:
    """04's lab model with `position`, vocabulary + [MASK], and the attention that takes any visibility matrix."""
    config = lab_model_config(vocab_size + 1, context_length=CONTEXT, attention_module="visibility",
                              position=position, **sizes["model"])
    return MiniFormer(config).to(run.device)


def train_objective(run, sizes, batch_fn, generator, vocab_size: int, objective, label: str, position: str = POSITION):
    """A fresh topic model, same seed and batch order every time, trained on `objective` for sizes["steps"];
    returns (model, numbers)."""
    torch.manual_seed(run.seed)
    generator.manual_seed(run.seed)
    model = topic_model(run, sizes, vocab_size, position)
    schedule = short_schedule(sizes["steps"], eval_interval=max(1, sizes["steps"] // 8), eval_batches=sizes["eval_batches"])
    with Timer(run.device) as timer:
        history = train(model, batch_fn, schedule, device=run.device, loss_fn=objective.loss)
    print(f"  {label:24s} {sizes['steps']} steps in {timer.seconds:5.1f} s, val loss (own targets) "
          f"{history.final_val_loss:.3f}")
    return model.eval(), {"eval_steps": history.eval_steps, "val_loss": history.val_loss,
                          "train_loss": history.eval_train_loss, "train_seconds": timer.seconds}


@torch.no_grad()
def next_token_logits(model, name: str, context: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Logits (B, V) for the token after `context` (B, T'), the way each objective generates: causal reads the
    past; a prefix LM reads the first half of the context as its prefix and the rest causally (prefixes of 1/4
    to 3/4 of the window were trained); a masked LM appends [MASK] and fills it in; "bidirectional" reads all."""
    if name == "masked":
        context = torch.cat([context[:, -(CONTEXT - 1):], torch.full_like(context[:, :1], mask_id)], dim=1)
    else:
        context = context[:, -CONTEXT:]
    T = context.shape[1]
    visibility = {"causal": None, "prefix": prefix_visibility(torch.full((len(context),), T // 2, device=context.device), T),
                  "masked": bidirectional_visibility(T, context.device),
                  "bidirectional": bidirectional_visibility(T, context.device)}[name]
    with attention_visibility(model, visibility):
        return model(context)[:, -1]


@torch.no_grad()
def generation_loss(model, name: str, windows: torch.Tensor, mask_id: int) -> dict:
    """Mean loss (nats) of the last character of each window given the CONTEXT - 1 before it, with its std error."""
    losses = torch.cat([F.cross_entropy(next_token_logits(model, name, chunk[:, :-1], mask_id), chunk[:, -1],
                                        reduction="none") for chunk in windows.split(256)])
    return {"loss": losses.mean().item(), "stderr": (losses.std() / math.sqrt(len(losses))).item(),
            "bits": bits_per_token(losses.mean().item())}


@torch.no_grad()
def sample(model, name: str, prompt: torch.Tensor, length: int, mask_id: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = prompt
    for _ in range(length):
        logits = next_token_logits(model, name, ids, mask_id)[:, :mask_id]  # never sample [MASK]
        probs = torch.softmax(logits.float().cpu() / TEMPERATURE, dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator).to(ids.device)], dim=1)
    return ids[0, prompt.shape[1]:]


@torch.no_grad()
def masked_position_losses(model, batches: list) -> torch.Tensor:
    """Cross-entropy at every masked position of fixed ObjectiveBatches, concatenated (the same order for any model)."""
    losses = []
    for batch in batches:
        with attention_visibility(model, batch.visibility):
            logits = model(batch.inputs)
        chosen = batch.targets != IGNORE_INDEX
        losses.append(F.cross_entropy(logits[chosen], batch.targets[chosen], reduction="none").cpu())
    return torch.cat(losses)


@torch.no_grad()
def pooled_features(model, name: str, x: torch.Tensor, device) -> np.ndarray:
    """Frozen features: the final (normalised) hidden state averaged over the positions, (N, E). Causal reads
    the past only; the prefix and masked LMs read the whole piece (their encoder use)."""
    visibility = None if name == "causal" else bidirectional_visibility(x.shape[1], device)
    features = []
    with attention_visibility(model, visibility):
        for chunk in x.split(256):
            _, hidden = model.forward_with_hidden(chunk.to(device))
            features.append(model.final_norm(hidden[-1]).mean(1).float().cpu())
    return torch.cat(features).numpy()


def probe_accuracy(train_features, y_train, test_features, y_test, seed: int) -> dict:
    """Logistic regression (standardised features) fitted on the train pieces, accuracy on the test pieces."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    probe.fit(train_features, y_train)
    accuracy = float((probe.predict(test_features) == y_test).mean())
    return {"accuracy": accuracy, "stderr": math.sqrt(accuracy * (1 - accuracy) / len(y_test))}


def bag_of_characters(x: torch.Tensor, vocab_size: int) -> np.ndarray:
    return np.stack([np.bincount(row.numpy(), minlength=vocab_size) for row in x]).astype(np.float32)


def draw_loss_curves(run, results: dict, learned: dict, unigram: float, steps: int) -> None:
    """Experiment 1's figure, drawn from its stored numbers (results.json "loss_curves")."""
    final = {name: r["val_loss"][-1] for name, r in results.items()}
    fig, axes = panels(1, 2, width=5.6, height=4.2,
                       title=f"After {steps} steps, loss on each objective's own targets: " + ", ".join(
                           f"{n} {v:.2f}" for n, v in final.items()) + " nats/char")
    series = {**{name: r["val_loss"] for name, r in results.items()}, "masked, learned positions": learned["val_loss"]}
    styles = {**{name: {"color": COLORS[name]} for name in results},
              "masked, learned positions": {"color": COLORS["masked"], "linestyle": "--", "marker": "s"}}
    line(axes[0], results["causal"]["eval_steps"], series, styles=styles, xlabel="training step",
         ylabel="validation loss (nats / predicted char)",
         title=f"against steps (same batches for all; {POSITION} positions unless marked)")
    axes[0].axhline(unigram, color="black", linestyle=":", label=f"unigram (no context) {unigram:.2f}")
    axes[0].legend()
    for name, r in results.items():  # from the first evaluation after step 0 (no predictions yet at 0)
        axes[1].plot(r["predicted_positions"][1:], r["val_loss"][1:], marker="o", markersize=3,
                     color=COLORS[name], label=f"{name} ({r['predicted_positions_per_window']:.0f} of {CONTEXT} "
                                               f"positions per window)")
    axes[1].plot(learned["predicted_positions"][1:], learned["val_loss"][1:], marker="s", markersize=3,
                 linestyle="--", color=COLORS["masked"], label="masked, learned positions")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("positions that carried a loss so far (log scale)")
    axes[1].set_ylabel("validation loss (nats / predicted char)")
    axes[1].set_title("against the number of predictions trained on")
    axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: the curves fill the panel
    fig.subplots_adjust(wspace=0.3)
    run.save(fig, "loss_curves")


# ---------------------------------------------------------------------------------------------- 1
def loss_curves(run, sizes, data) -> tuple[dict, dict]:
    """Each objective trained from the same start on the same batches; validation loss on its own targets."""
    vocab_size = data.vocab.size
    results, models = {}, {}
    for name in OBJECTIVES:
        objective = make_objective(name, vocab_size, run.seed)
        models[name], results[name] = train_objective(run, sizes, data.batch_fn, data.generator, vocab_size,
                                                      objective, name)
    _, learned = train_objective(run, sizes, data.batch_fn, data.generator, vocab_size,
                                 make_objective("masked", vocab_size, run.seed), "masked, learned positions",
                                 position="learned")
    # Positions that carry a loss per window of T: causal T; prefix T - P + 1 with P uniform in [T/4, 3T/4]; masked r T.
    predicted_per_window = {"causal": CONTEXT, "prefix": CONTEXT - CONTEXT / 2 + 1, "masked": MASK_RATE * CONTEXT}
    learned["predicted_positions_per_window"] = predicted_per_window["masked"]
    learned["predicted_positions"] = [step * sizes["batch_size"] * predicted_per_window["masked"]
                                      for step in learned["eval_steps"]]
    for name, numbers in results.items():
        numbers["predicted_positions_per_window"] = predicted_per_window[name]
        numbers["predicted_positions"] = [step * sizes["batch_size"] * predicted_per_window[name]
                                          for step in numbers["eval_steps"]]
    unigram = unigram_loss(data, batches=50, seed=run.seed)
    final = {name: r["val_loss"][-1] for name, r in results.items()}
    draw_loss_curves(run, results, learned, unigram, sizes["steps"])
    insights = [f"After {sizes['steps']} steps of {sizes['batch_size']} windows, validation loss on each objective's own "
                f"targets: " + ", ".join(f"{n} {v:.3f}" for n, v in final.items()) + f" nats/char (unigram {unigram:.3f}). "
                f"The numbers answer different questions (the masked LM sees both sides of each hidden character, "
                f"but learns from {MASK_RATE:.0%} of the positions), so they are not a ranking.",
                (f"Positions matter more without the causal mask: the masked LM with 04's learned position table ends "
                 f"at {learned['val_loss'][-1]:.3f} nats (unigram {unigram:.3f}) where the same model with RoPE reaches "
                 f"{final['masked']:.3f}. A causal mask tells each position how much lies before it; a bidirectional "
                 f"model must find its neighbours from the position encoding alone, and RoPE makes 'the key one "
                 f"position away' the same pattern at every position."
                 if learned["val_loss"][-1] - final["masked"] > POSITION_EFFECT_NATS else
                 f"The masked LM with 04's learned position table ends at {learned['val_loss'][-1]:.3f} nats, with RoPE "
                 f"at {final['masked']:.3f} (unigram {unigram:.3f}): within {POSITION_EFFECT_NATS} nats at this budget.")]
    return {"objectives": results, "masked_learned_positions": learned, "unigram_val_loss": unigram,
            "position": POSITION, "insights": insights}, models


# ---------------------------------------------------------------------------------------------- 2
def good_for(run, sizes, data, models: dict, text: str) -> dict:
    """Generation (next-character loss after CONTEXT - 1 characters; samples) vs a linear probe of features."""
    vocab_size = data.vocab.size
    mask_id = vocab_size
    data.generator.manual_seed(run.seed + 1)
    windows = torch.cat([data.batch_fn("val")[0] for _ in range(math.ceil(sizes["generation_windows"] / sizes["batch_size"]))])
    torch.manual_seed(run.seed)
    random_model = topic_model(run, sizes, vocab_size).eval()
    generation = {name: generation_loss(model, name, windows, mask_id) for name, model in models.items()}
    prompt = data.vocab.encode("ROMEO:\n").to(run.device)[None]
    samples = {name: data.vocab.decode(sample(model, name, prompt, sizes["sample_chars"], mask_id, run.seed).tolist())
               for name, model in models.items()}

    pieces = speaker_pieces(text, sizes["speakers"], sizes["windows_per_speaker"], CONTEXT, run.seed)
    x_train, x_test = (torch.stack([data.vocab.encode(t) for t in texts]) for texts in (pieces.train_texts, pieces.test_texts))
    y_train, y_test, speakers = pieces.train_labels, pieces.test_labels, pieces.names
    feature_models = {**models, "random init": random_model}
    probes = {}
    for name, model in feature_models.items():
        kind = "prefix" if name == "random init" else name  # the untrained model reads the whole piece too
        probes[name] = probe_accuracy(pooled_features(model, kind, x_train, run.device), y_train,
                                      pooled_features(model, kind, x_test, run.device), y_test, run.seed)
    probes["bag of characters"] = probe_accuracy(bag_of_characters(x_train, vocab_size), y_train,
                                                 bag_of_characters(x_test, vocab_size), y_test, run.seed)
    chance = 1 / len(speakers)

    fig, axes = panels(1, 2, width=5.4, height=4.2,
                       title=f"Next-char loss: causal {generation['causal']['bits']:.2f}, masked "
                             f"{generation['masked']['bits']:.2f} bits; probe: masked {probes['masked']['accuracy']:.0%}, "
                             f"causal {probes['causal']['accuracy']:.0%} ({len(speakers)} speakers)")
    names = list(generation)
    bar(axes[0], names, [generation[n]["bits"] for n in names], annotate_fmt="{:.2f}",
        ylabel="bits per char (next char after 63 chars)", title="generation: lower is better",
        color=[COLORS[n] for n in names])
    axes[0].errorbar(range(len(names)), [generation[n]["bits"] for n in names],
                     yerr=[2 * generation[n]["stderr"] / math.log(2) for n in names], fmt="none", color="black", capsize=3)
    names = list(probes)
    bar(axes[1], names, [probes[n]["accuracy"] for n in names], annotate_fmt="{:.0%}", rotate=20,
        ylabel=f"probe accuracy on {len(y_test)} held-out pieces", title="linear probe: which speaker? (higher is better)",
        color=[COLORS[n] for n in names])
    axes[1].errorbar(range(len(names)), [probes[n]["accuracy"] for n in names],
                     yerr=[2 * probes[n]["stderr"] for n in names], fmt="none", color="black", capsize=3)
    axes[1].axhline(chance, color="black", linestyle=":", label=f"chance {chance:.0%}")
    axes[1].legend(loc="lower right")
    fig.subplots_adjust(wspace=0.35)
    run.save(fig, "good_for")

    causal, masked = generation["causal"]["bits"], generation["masked"]["bits"]
    gap = probes["masked"]["accuracy"] - probes["causal"]["accuracy"]
    gap_stderr = math.hypot(probes["masked"]["stderr"], probes["causal"]["stderr"])
    verdicts = {
        "causal_good_for_generation": {
            "claim": "causal is good for generation",
            "threshold": f"holds: causal's next-char loss at least {GENERATION_MARGIN_BITS} bits below the masked LM's "
                         f"(masked generates by appending [MASK]); fails: above it; depends: within",
            "measured": f"causal {causal:.3f}, prefix {generation['prefix']['bits']:.3f}, masked {masked:.3f} bits/char",
            "verdict": "holds" if causal <= masked - GENERATION_MARGIN_BITS else "fails" if causal > masked else "depends"},
        "mlm_good_for_encoding": {
            "claim": "MLM is good for encoding",
            "threshold": f"holds: masked probe accuracy above causal by more than {PROBE_SIGMAS} standard errors of "
                         f"the difference; fails: below by as much; depends: within",
            "measured": f"masked {probes['masked']['accuracy']:.3f}, causal {probes['causal']['accuracy']:.3f}, prefix "
                        f"{probes['prefix']['accuracy']:.3f} (difference {gap:+.3f} +- {gap_stderr:.3f}); random init "
                        f"{probes['random init']['accuracy']:.3f}, bag of characters "
                        f"{probes['bag of characters']['accuracy']:.3f}, chance {chance:.3f}",
            "verdict": ("holds" if gap > PROBE_SIGMAS * gap_stderr else "fails" if gap < -PROBE_SIGMAS * gap_stderr
                        else "depends")},
    }
    insights = [
        f"Generation: the next character after 63 characters costs causal {causal:.3f}, prefix "
        f"{generation['prefix']['bits']:.3f}, masked {masked:.3f} bits (the masked LM generates by filling a [MASK] "
        f"appended to the text, a position it never saw at the end during training).",
        f"Representation: a logistic-regression probe on frozen mean-pooled features tells {len(speakers)} speakers "
        f"({', '.join(speakers)}) apart with accuracy masked {probes['masked']['accuracy']:.1%}, causal "
        f"{probes['causal']['accuracy']:.1%}, prefix {probes['prefix']['accuracy']:.1%}, random init "
        f"{probes['random init']['accuracy']:.1%}, bag of characters {probes['bag of characters']['accuracy']:.1%} "
        f"(chance {chance:.1%}, +- {probes['masked']['stderr']:.1%} standard error)."]
    return {"generation": generation, "samples": samples, "sample_prompt": "ROMEO:\n", "probe": probes,
            "speakers": speakers, "probe_train_pieces": len(y_train), "probe_test_pieces": len(y_test),
            "chance": chance, "insights": insights, "verdicts": verdicts}, (x_train, y_train, x_test, y_test)


# ---------------------------------------------------------------------------------------------- 3
def masking_rate(run, sizes, data, masked_model, probe_data) -> dict:
    """Masked LMs at several rates (the 15% model of experiment 1 reused), plus 15% spans; each evaluated with
    the same 15% corruption of the same validation batches, and by the speaker probe."""
    vocab_size = data.vocab.size
    x_train, y_train, x_test, y_test = probe_data
    variants = {f"token {rate:.0%}": ("token", rate) for rate in sizes["rates"]}
    if sizes["span"]:
        variants[f"span {MASK_RATE:.0%} (length {SPAN_LENGTH})"] = ("span", MASK_RATE)
    evaluator = make_objective("masked", vocab_size, run.seed + 2)  # the same 15% corruptions for every model
    data.generator.manual_seed(run.seed + 2)
    common_batches = [evaluator.make_batch(*data.batch_fn("val")) for _ in range(sizes["eval_batches"] * 4)]
    results, paired = {}, {}
    for label, (strategy, rate) in variants.items():
        if strategy == "token" and rate == MASK_RATE:
            model = masked_model
        else:
            model, _ = train_objective(run, sizes, data.batch_fn, data.generator, vocab_size,
                                       make_objective("masked", vocab_size, run.seed, rate, strategy), f"masked {label}")
        position_losses = masked_position_losses(model, common_batches)
        common = position_losses.mean().item()
        probe = probe_accuracy(pooled_features(model, "masked", x_train, run.device), y_train,
                               pooled_features(model, "masked", x_test, run.device), y_test, run.seed)
        results[label] = {"strategy": strategy, "rate": rate, "loss_at_15_percent": common, **probe}
        paired[label] = position_losses
        print(f"  {label:24s} loss at 15% masking {common:.3f}, probe {probe['accuracy']:.3f}")

    tokens = {k: r for k, r in results.items() if r["strategy"] == "token"}
    rates = [r["rate"] for r in tokens.values()]
    fig, axes = panels(1, 2, width=5.4, height=4.2)
    best_loss = min(tokens, key=lambda k: tokens[k]["loss_at_15_percent"])
    best_probe = max(tokens, key=lambda k: tokens[k]["accuracy"])
    fig.suptitle(f"Trained at rate r, scored at 15%: lowest loss at {best_loss.split()[1]}; best probe at "
                 f"{best_probe.split()[1]} ({tokens[best_probe]['accuracy']:.0%})", fontsize=12, fontweight="bold")
    line(axes[0], [100 * r for r in rates], {"token masking": [r["loss_at_15_percent"] for r in tokens.values()]},
         styles={"token masking": {"color": COLORS["masked"]}}, xlabel="masking rate during training (%)",
         ylabel="val loss with 15% masked (nats / masked char)", title="masked-LM loss at a common 15% rate")
    line(axes[1], [100 * r for r in rates], {"token masking": [r["accuracy"] for r in tokens.values()]},
         styles={"token masking": {"color": COLORS["masked"]}}, xlabel="masking rate during training (%)",
         ylabel="speaker probe accuracy (held-out pieces)", title="linear probe on frozen features")
    axes[1].errorbar([100 * r for r in rates], [r["accuracy"] for r in tokens.values()],
                     yerr=[2 * r["stderr"] for r in tokens.values()], fmt="none", color=COLORS["masked"], capsize=3)
    for label, r in results.items():
        if r["strategy"] == "span":
            axes[0].plot([100 * r["rate"]], [r["loss_at_15_percent"]], "s", color="black", label=label)
            axes[1].plot([100 * r["rate"]], [r["accuracy"]], "s", color="black", label=label)
    for ax in axes:
        ax.axvline(100 * MASK_RATE, color="gray", linestyle=":", label="BERT's 15%")
        ax.legend()
    fig.subplots_adjust(wspace=0.35)
    run.save(fig, "masking_rate")

    worst = max(tokens, key=lambda k: tokens[k]["loss_at_15_percent"])
    difference = paired[worst] - paired[best_loss]  # same masked positions, same corruptions: a paired difference
    spread, spread_stderr = difference.mean().item(), (difference.std() / math.sqrt(len(difference))).item()
    at_15 = tokens[f"token {MASK_RATE:.0%}"]
    best = tokens[best_probe]
    beat_15 = best["accuracy"] - at_15["accuracy"] > PROBE_SIGMAS * math.hypot(best["stderr"], at_15["stderr"])
    verdicts = {
        "masking_rate_impacts_learning": {
            "claim": "the masking rate (~15%) impacts learning efficiency",
            "threshold": f"holds: at equal steps, the worst and best training rate among {[f'{r:.0%}' for r in rates]} "
                         f"differ in loss at a common 15% rate by more than {RATE_EFFECT_NATS} nats and more than "
                         f"{RATE_SIGMAS} paired standard errors; fails otherwise",
            "measured": ", ".join(f"{k.split()[1]} {r['loss_at_15_percent']:.3f}" for k, r in tokens.items())
                        + f" (worst - best {spread:.3f} +- {spread_stderr:.3f})",
            "verdict": "holds" if spread > RATE_EFFECT_NATS and spread > RATE_SIGMAS * spread_stderr else "fails"},
        "fifteen_percent_is_best": {
            "claim": "~15% is the right masking rate (Wettig et al. 2022 found 40% as good or better for BERT-large)",
            "threshold": f"fails: another rate's probe accuracy beats 15%'s by more than {PROBE_SIGMAS} standard errors; "
                         f"holds: 15% is the best loss at the common rate and no rate beats its probe; depends: otherwise",
            "measured": "probe " + ", ".join(f"{k.split()[1]} {r['accuracy']:.3f}" for k, r in tokens.items())
                        + f"; lowest common-rate loss at {best_loss.split()[1]}",
            "verdict": ("fails" if beat_15 else "holds" if best_loss == f"token {MASK_RATE:.0%}" else "depends")},
    }
    insights = ["Masking rate at equal steps: loss scored at 15% masking " + ", ".join(
        f"{k.split()[1]} {r['loss_at_15_percent']:.3f}" for k, r in tokens.items()) + " nats; probe accuracy " + ", ".join(
        f"{k.split()[1]} {r['accuracy']:.1%}" for k, r in tokens.items()) + "."]
    return {"variants": results, "common_rate_positions": len(difference), "insights": insights, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- 4
def char_vs_bpe(run, sizes, data, char_model, text: str) -> dict:
    """The causal lab model on characters (experiment 1's) and on BPE tokens (01's tokenizer, trained on the
    training text), both scored on the same validation text: per token, and per byte."""
    cut = int(0.9 * len(text))  # the same 90/10 character split as the character data
    train_text, val_text = text[:cut], text[cut:]
    with Timer("cpu") as timer:
        tokenizer = Tokenizer(*train_bpe(train_text[: sizes["bpe_train_chars"]], sizes["bpe_vocab"]))
        train_ids = torch.tensor(tokenizer.encode(train_text))
        val_ids = torch.tensor(tokenizer.encode(val_text))
    print(f"  BPE: {tokenizer.vocab_size} tokens, {utf8_bytes(val_text) / len(val_ids):.2f} bytes per token on the "
          f"validation text ({timer.seconds:.1f} s to train and encode)")
    generator = torch.Generator()
    splits = {"train": train_ids, "val": val_ids}

    def bpe_batches(split):
        return random_batch(splits[split], sizes["batch_size"], CONTEXT, generator=generator, device=run.device)

    bpe_model, history = train_objective(run, sizes, bpe_batches, generator, tokenizer.vocab_size, CausalLM(run.seed),
                                         "causal on BPE")
    num_bytes = utf8_bytes(val_text)
    rows = {}
    for name, model, batch_fn, gen, num_tokens in (("characters", char_model, data.batch_fn, data.generator, len(val_text)),
                                                   ("BPE", bpe_model, bpe_batches, generator, len(val_ids))):
        gen.manual_seed(run.seed + 3)
        loss = evaluate(model, batch_fn, "val", sizes["bpe_eval_batches"], loss_fn=CausalLM().loss)
        rows[name] = {"loss_nats_per_token": loss, "perplexity": perplexity(loss), "bits_per_token": bits_per_token(loss),
                      "tokens": num_tokens, "bytes": num_bytes, "bytes_per_token": num_bytes / num_tokens,
                      "bits_per_byte": bits_per_byte(loss, num_tokens, num_bytes)}
    char, bpe = rows["characters"], rows["BPE"]
    fig, axes = panels(1, 2, width=5.0, height=4.2,
                       title=f"Per token BPE looks {bpe['perplexity'] / char['perplexity']:.1f}x more perplexed; per byte: "
                             f"BPE {bpe['bits_per_byte']:.2f} vs characters {char['bits_per_byte']:.2f} bits")
    names = list(rows)
    colors = ["tab:blue", "tab:orange"]
    bar(axes[0], names, [rows[n]["perplexity"] for n in names], annotate_fmt="{:.1f}", color=colors,
        ylabel="perplexity per token = exp(loss)", title="per token (not comparable)")
    bar(axes[1], names, [rows[n]["bits_per_byte"] for n in names], annotate_fmt="{:.3f}", color=colors,
        ylabel="bits per byte = loss x tokens / (bytes x ln 2)", title="per byte of the same validation text")
    fig.subplots_adjust(wspace=0.35)
    run.save(fig, "char_vs_bpe")

    token_ratio = bpe["loss_nats_per_token"] / char["loss_nats_per_token"]
    byte_ratio = bpe["bits_per_byte"] / char["bits_per_byte"]
    verdicts = {"compare_tokenizers_in_bits_per_byte": {
        "claim": "a character-level and a BPE model compare fairly only in bits per byte",
        "threshold": f"holds: the BPE/char ratio of loss per token differs from the ratio of bits per byte by more "
                     f"than {TOKEN_METRIC_DISTORTION:.0%} (per-token numbers misstate the comparison); fails otherwise",
        "measured": f"loss per token BPE/char {token_ratio:.2f}, bits per byte BPE/char {byte_ratio:.2f}",
        "verdict": "holds" if abs(token_ratio / byte_ratio - 1) > TOKEN_METRIC_DISTORTION else "fails"}}
    insights = [
        f"Same validation text ({num_bytes:,} bytes): characters {char['loss_nats_per_token']:.3f} nats/token x "
        f"{char['tokens']:,} tokens / ({num_bytes:,} bytes x ln 2) = {char['bits_per_byte']:.3f} bits/byte; BPE "
        f"({tokenizer.vocab_size} tokens, {bpe['bytes_per_token']:.2f} bytes/token) {bpe['loss_nats_per_token']:.3f} "
        f"nats/token x {bpe['tokens']:,} / ({num_bytes:,} x ln 2) = {bpe['bits_per_byte']:.3f} bits/byte. Perplexity "
        f"per token ({bpe['perplexity']:.1f} vs {char['perplexity']:.2f}) would make BPE look far worse; per byte the "
        f"gap is {byte_ratio:.2f}x. (Both read {CONTEXT} tokens, so the BPE model sees {bpe['bytes_per_token']:.1f}x "
        f"more text per window and per step.)"]
    return {"rows": rows, "bpe_vocab_size": tokenizer.vocab_size, "bpe_training": history, "insights": insights,
            "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- 5
def break_it(run, sizes, data, causal_model, causal_curve) -> dict:
    """The causal objective trained with a bidirectional mask: each position can read the token it must predict."""
    vocab_size = data.vocab.size
    leaky_model, leaky = train_objective(run, sizes, data.batch_fn, data.generator, vocab_size, LeakyCausalLM(run.seed),
                                         "leaky causal")
    data.generator.manual_seed(run.seed + 1)
    windows = torch.cat([data.batch_fn("val")[0] for _ in range(math.ceil(sizes["generation_windows"] / sizes["batch_size"]))])
    honest = generation_loss(causal_model, "causal", windows, vocab_size)
    # The leaky model generates like a causal one: at the last position there is nothing to its right to copy.
    broken = generation_loss(leaky_model, "bidirectional", windows, vocab_size)
    fig, axes = panels(1, 1, width=7.0, height=4.4,
                       title=f"Mask forgotten: {leaky['val_loss'][-1]:.2f} nats/char while it sees the target, "
                             f"{broken['loss']:.2f} when it cannot (causal: {causal_curve['val_loss'][-1]:.2f} / "
                             f"{honest['loss']:.2f})")
    line(axes[0], leaky["eval_steps"], {"causal, bidirectional mask (leaks the target)": leaky["val_loss"],
                                        "causal, causal mask": causal_curve["val_loss"]},
         styles={"causal, bidirectional mask (leaks the target)": {"color": COLORS["leaky causal"]},
                 "causal, causal mask": {"color": COLORS["causal"]}},
         xlabel="training step", ylabel="validation loss on next-char targets (nats)",
         title="validation loss, next-char targets, each model with its training mask")
    run.save(fig, "break_it")
    insights = [f"Break it: with the causal mask forgotten, the next-character validation loss falls to "
                f"{leaky['val_loss'][-1]:.3f} nats (causal: {causal_curve['val_loss'][-1]:.3f}) because each position reads "
                f"its own target; asked to generate (nothing to the right to copy) it scores {broken['loss']:.3f} nats per "
                f"char against the causal model's {honest['loss']:.3f}."]
    return {"leaky": leaky, "leaky_generation": broken, "causal_generation": honest, "insights": insights}


# ---------------------------------------------------------------------------------------------- main
def main():
    args = demo_parser(__doc__).parse_args()
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if run.quick else "full"]
    text, corpus = load_corpus("auto")
    data = char_shakespeare_data(CONTEXT, sizes["batch_size"], run.device, run.seed)

    print(f"\n1. loss curves: causal, prefix and masked LM on {corpus} (vocabulary {data.vocab.size} + [MASK])")
    curves, models = loss_curves(run, sizes, data)
    print("\n2. what each objective is good for: generation vs a linear probe")
    uses, probe_data = good_for(run, sizes, data, models, text)
    print("\n3. masking rate")
    rates = masking_rate(run, sizes, data, models["masked"], probe_data)
    print("\n4. characters vs BPE, in bits per byte")
    tokens = char_vs_bpe(run, sizes, data, models["causal"], text)
    print("\n5. break it: the causal mask forgotten")
    broken = break_it(run, sizes, data, models["causal"], curves["objectives"]["causal"])

    print_table([{"objective": name, "own val loss": r["val_loss"][-1], "next-char bits": uses["generation"][name]["bits"],
                  "probe acc": uses["probe"][name]["accuracy"], "train s": r["train_seconds"]}
                 for name, r in curves["objectives"].items()],
                title=f"Objectives after {sizes['steps']} steps (probe: {len(uses['speakers'])} speakers, chance "
                      f"{uses['chance']:.2f})")
    print_table([{"tokens": name, **{k: r[k] for k in ("loss_nats_per_token", "perplexity", "bytes_per_token",
                                                        "bits_per_byte")}} for name, r in tokens["rows"].items()],
                title="Characters vs BPE on the same validation text")
    print("\nSamples (temperature 0.8, prompt 'ROMEO:\\n')")
    for name, text_sample in uses["samples"].items():
        print(f"  [{name}] {text_sample[:160]!r}")

    experiments = (curves, uses, rates, tokens, broken)
    insights, verdicts = report_findings(experiments)
    run.finish({"sizes": sizes, "corpus": corpus, "context_length": CONTEXT, "mask_rate": MASK_RATE,
                "loss_curves": curves, "good_for": uses, "masking_rate": rates, "char_vs_bpe": tokens,
                "break_it": broken, "key_insights": insights, "verdicts": verdicts})


if __name__ == "__main__":
    main()
