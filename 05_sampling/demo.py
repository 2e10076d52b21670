"""05 — Sampling: what each decoding setting does to the lab model's next character, and to its text.

The model is 04's lab model (trained once and cached by lab.trained_lab_model: preset "full", or "quick" in
--quick); the judge of quality is a larger, better-trained lab model (preset "large"; in --quick the quick
model judges itself, so quick numbers only show that the demo runs).

Experiments:
  1. distributions: the next-character distribution after one prompt under each setting.
  2. entropy_vs_temperature: entropy and effective vocabulary of the next character over many contexts as
     the temperature grows (raw, and with the focused preset's top-k and top-p after it); how often a
     sample equals the argmax as T -> 0; temperature 0 against the argmax.
  3. diversity_vs_quality: samples from the same prompts under temperature, top-k, top-p and min-p sweeps,
     top-k + top-p combinations and the presets; diversity (distinct 4-grams) against quality (mean
     log-likelihood per character under the judge, and under the model itself).
  4. repetition_penalty: greedy decoding with penalties 1.0-2.0: how much of the text repeats itself, and
     what the penalty costs under the judge.
  5. beam_search: beam widths 1 (greedy) to 8: likelihood under the model and the judge, repetition; and
     the length penalty with a newline as the end-of-sequence token.
  6. break_it: a repetition penalty that divides every seen logit, top-p before temperature, temperature 0
     as a division.
Every claim's verdict is decided in code against the threshold written beside it (results.json "verdicts").
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: E402,F401  (puts every NN_topic folder on sys.path)

import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data import load_corpus, train_val_split  # noqa: E402
from demo_cli import demo_parser, print_table, start_demo  # noqa: E402
from lab import trained_lab_model  # noqa: E402
from plotting import line, panels  # noqa: E402
from runtime import Timer  # noqa: E402
from sampler import (PRESETS, Sampler, SamplingConfig, apply_temperature, beam_search, entropy,  # noqa: E402
                     next_token_probabilities, process_logits)

# Quick and full runs differ in these sizes only.
SIZES = {
    "quick": dict(contexts=256, prompts=8, samples_per_prompt=4, prompt_length=16, new_tokens=48,
                  greedy_prompts=8, greedy_tokens=96, beam_prompts=4, beam_widths=(1, 2, 4), beam_tokens=24,
                  argmax_draws=4),
    "full": dict(contexts=1024, prompts=24, samples_per_prompt=8, prompt_length=16, new_tokens=48,
                 greedy_prompts=24, greedy_tokens=160, beam_prompts=8, beam_widths=(1, 2, 4, 8), beam_tokens=48,
                 argmax_draws=16),
}
PROMPT = "\nKING RICHARD III:\nNow is the winter of our "  # ends with a space: the next word's first letter
TEMPERATURES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)  # entropy curve
DISTINCT_N = 4  # diversity = distinct character 4-grams / all 4-grams, pooled over every sample
REPEAT_N = 8  # repetition = share of 8-character n-grams already seen earlier in the same text
SWEEPS = {  # every sweep at temperature 1 except the temperature sweep itself
    "temperature": [SamplingConfig(temperature=t) for t in (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)],
    "top-k": [SamplingConfig(top_k=k) for k in (1, 2, 3, 5, 10, 20, 40)],
    "top-p": [SamplingConfig(top_p=p) for p in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)],
    "min-p": [SamplingConfig(min_p=m) for m in (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)],
}
COMBINATIONS = [SamplingConfig(top_k=k, top_p=p) for k in (5, 10, 20) for p in (0.8, 0.9, 0.95)]
PRESET_RUNS = {**PRESETS, "creative, T=2.0": SamplingConfig(temperature=2.0, top_k=100, top_p=0.99)}
PENALTIES = (1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0)
LENGTH_PENALTIES = (0.0, 1.0, 2.0)

# Thresholds of the verdicts, written beside the claims they decide.
ENTROPY_TOLERANCE = 1e-4  # nats: a fall smaller than this between two temperatures counts as float noise
COMBINATION_SIGMAS = 2.0  # a top-k + top-p setting "beats" the singles when it lies this many standard errors
#                           of its quality above the better single method's frontier at the same diversity
PRESET_SIGMAS = 2.0  # a preset is "more diverse" / "better" than plain sampling by this many standard errors


@dataclass
class Bench:
    """What the experiments share: the model, the judge, the vocabulary and the validation text."""

    model: torch.nn.Module
    judge: torch.nn.Module
    vocab: object
    val: torch.Tensor  # validation ids (N,)
    device: torch.device
    seed: int
    sizes: dict
    model_name: str  # the lab presets of the model and the judge
    judge_name: str

    def windows(self, count: int, length: int) -> torch.Tensor:
        """`count` windows of `length` ids at evenly spaced starts in the validation text (the same every run)."""
        starts = torch.linspace(0, len(self.val) - length - 1, count).long()
        return self.val[starts[:, None] + torch.arange(length)].to(self.device)  # (count, length)

    def generator(self) -> torch.Generator:
        """A fresh generator with the run's seed: every setting draws from the same random numbers."""
        return torch.Generator(device=self.device).manual_seed(self.seed)


def show(text: str) -> str:
    return text.replace("\n", "\u23ce")


# ---------------------------------------------------------------------------------------------- measures
@torch.no_grad()
def token_log_likelihoods(model, tokens: torch.Tensor) -> torch.Tensor:
    """log p(x_t | earlier tokens) for t = 1 .. L-1 of tokens (N, L) -> (N, L-1). Beyond the model's context
    windows overlap by half, so every token is scored with at least context/2 tokens of history."""
    context = model.config.context_length
    N, L = tokens.shape
    scores = torch.empty(N, L - 1, device=tokens.device)
    scored, start = 0, 0  # targets 1..scored are done
    while scored < L - 1:
        start = max(0, min(start, L - context))
        window = tokens[:, start:start + context]
        log_probs = model(window)[:, :-1].float().log_softmax(-1)  # (N, W-1, V)
        picked = log_probs.gather(-1, window[:, 1:, None])[..., 0]  # (N, W-1): targets start+1 .. start+W-1
        end = start + window.shape[1] - 1
        scores[:, scored:end] = picked[:, scored - start:]
        scored, start = end, start + context // 2
    return scores


def distinct_ngrams(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over a group of texts (1 = nothing repeats, within or across texts)."""
    grams = [text[i:i + n] for text in texts for i in range(len(text) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def repetition_rate(text: str, n: int = REPEAT_N) -> float:
    """Share of the text's n-grams that already occurred earlier in the same text."""
    seen, repeats = set(), 0
    for i in range(len(text) - n + 1):
        gram = text[i:i + n]
        repeats += gram in seen
        seen.add(gram)
    return repeats / max(1, len(text) - n + 1)


# ---------------------------------------------------------------------------------------------- 1
@torch.no_grad()
def distributions(run, bench: Bench) -> dict:
    """The next-character distribution after PROMPT under each setting: probabilities, kept tokens, entropy."""
    prompt = bench.vocab.encode(PROMPT)[None].to(bench.device)  # (1, T)
    logits = bench.model(prompt)[:, -1].float()  # (1, V)
    settings = {"T=1 (the model)": SamplingConfig(), "T=0 (greedy)": SamplingConfig(temperature=0.0),
                "T=0.5": SamplingConfig(temperature=0.5), "T=1.5": SamplingConfig(temperature=1.5),
                "top-k 5": SamplingConfig(top_k=5), "top-p 0.9": SamplingConfig(top_p=0.9),
                "min-p 0.1": SamplingConfig(min_p=0.1),
                "repetition penalty 1.5": SamplingConfig(repetition_penalty=1.5),
                "focused preset": PRESETS["focused"], "creative preset": PRESETS["creative"]}
    raw = logits.softmax(-1)[0]
    shown = raw.argsort(descending=True)[:16].cpu()  # the 16 most likely characters of the raw distribution
    labels = [repr(bench.vocab.chars[i])[1:-1].replace(" ", "\u2423") for i in shown.tolist()]
    numbers = {}
    all_probs = {name: next_token_probabilities(logits, prompt, config)[0] for name, config in settings.items()}
    shared_top = 1.1 * max(float(p[shown].max()) for name, p in all_probs.items() if name != "T=0 (greedy)")
    fig, axes = panels(2, 5, width=3.3, height=2.8)
    for ax, (name, probs) in zip(axes, all_probs.items()):
        kept = int((probs > 0).sum())
        H = float(entropy(probs.log()[None])[0])
        numbers[name] = {"kept_tokens": kept, "entropy_nats": H, "effective_vocabulary": math.exp(H),
                         "top_token": bench.vocab.chars[int(probs.argmax())], "top_probability": float(probs.max()),
                         "probabilities_shown": probs[shown].tolist()}
        ax.bar(range(len(shown)), raw[shown].cpu().numpy(), color="lightgray", label="T=1 (the model)")
        ax.bar(range(len(shown)), probs[shown].cpu().numpy(), color="tab:blue", width=0.55, label=name)
        ax.set_xticks(range(len(shown)), labels, fontsize=7)
        ax.set_ylim(0, 1.05 if name == "T=0 (greedy)" else shared_top)  # greedy: one bar at 1
        ax.set_title(f"{name}\n{kept} kept, exp(H) = {math.exp(H):.1f}", fontsize=9)
        ax.set_ylabel("probability" if ax in (axes[0], axes[5]) else "")
    axes[0].legend(["the model (T=1)", "this setting"], loc="upper right", fontsize=7)
    fig.suptitle(f"Next character after \"...{show(PROMPT[-22:])}\": effective vocabulary "
                 f"{numbers['T=0.5']['effective_vocabulary']:.1f} at T=0.5, "
                 f"{numbers['T=1 (the model)']['effective_vocabulary']:.1f} at T=1, "
                 f"{numbers['T=1.5']['effective_vocabulary']:.1f} at T=1.5 (16 most likely of "
                 f"{logits.shape[-1]} characters; gray = the model)", fontsize=11, fontweight="bold")
    fig.supxlabel("next character (\u2423 = space, \\n = newline)")
    fig.tight_layout()
    run.save(fig, "distributions")
    return {"prompt": PROMPT, "settings": numbers, "characters_shown": labels}


# ---------------------------------------------------------------------------------------------- 2
@torch.no_grad()
def entropy_vs_temperature(run, bench: Bench) -> dict:
    """Entropy of the next character over many validation contexts for each temperature; argmax checks."""
    context = bench.model.config.context_length
    windows = bench.windows(bench.sizes["contexts"], context)
    logits = bench.model(windows)[:, -1].float()  # (N, V): the next character after each full window
    focused = PRESETS["focused"]
    raw, filtered, argmax_share, argmax_probability = [], [], [], []
    draws = bench.sizes["argmax_draws"]
    for t in TEMPERATURES:
        raw.append(entropy(apply_temperature(logits, t)))  # (N,)
        config = SamplingConfig(temperature=t, top_k=focused.top_k, top_p=focused.top_p)
        filtered.append(entropy(process_logits(logits, None, config)))
        samples = Sampler(SamplingConfig(temperature=t), bench.generator())(logits.repeat(draws, 1), None)
        argmax_share.append((samples[:, 0] == logits.argmax(-1).repeat(draws)).float().mean().item())
        argmax_probability.append(apply_temperature(logits, t).softmax(-1).amax(-1).mean().item())
    raw, filtered = torch.stack(raw), torch.stack(filtered)  # (T, N)
    greedy = Sampler(PRESETS["deterministic"])(logits, None)[:, 0]
    numbers = {
        "temperatures": list(TEMPERATURES), "contexts": logits.shape[0],
        "mean_entropy": raw.mean(1).tolist(), "mean_entropy_focused_filters": filtered.mean(1).tolist(),
        "entropy_p10": raw.quantile(0.1, dim=1).tolist(), "entropy_p90": raw.quantile(0.9, dim=1).tolist(),
        "mean_effective_vocabulary": raw.exp().mean(1).tolist(),
        "mean_effective_vocabulary_focused_filters": filtered.exp().mean(1).tolist(),
        "share_of_contexts_monotone": ((raw.diff(dim=0) >= -ENTROPY_TOLERANCE).all(0)).float().mean().item(),
        "share_of_contexts_monotone_focused_filters":
            ((filtered.diff(dim=0) >= -ENTROPY_TOLERANCE).all(0)).float().mean().item(),
        "largest_entropy_fall_nats": (-raw.diff(dim=0)).max().clamp_min(0).item(),
        "sample_equals_argmax_share": argmax_share, "argmax_probability_mean": argmax_probability,
        "argmax_draws_per_context": draws,
        "temperature_zero_equals_argmax_share": (greedy == logits.argmax(-1)).float().mean().item(),
        "effective_vocabulary_at_T1": raw.exp()[TEMPERATURES.index(1.0)].mean().item(),
        "vocabulary_size": logits.shape[-1],
    }
    fig, axes = panels(1, 3, width=4.9, height=3.8,
                       title=f"Entropy rises with temperature in {numbers['share_of_contexts_monotone']:.0%} of "
                             f"{logits.shape[0]} contexts; at T=0.1 a sample is the argmax "
                             f"{argmax_share[0]:.1%} of the time")
    axes[0].fill_between(TEMPERATURES, numbers["entropy_p10"], numbers["entropy_p90"], color="tab:blue", alpha=0.2,
                         label="T alone: 10-90% of contexts")
    line(axes[0], TEMPERATURES, {"T alone: mean": numbers["mean_entropy"],
                                 "T, then top-k 10 + top-p 0.9: mean": numbers["mean_entropy_focused_filters"]},
         logx=True, xlabel="temperature T (log scale)", ylabel="entropy of the next character (nats)",
         title="entropy H", styles={"T alone: mean": {"color": "tab:blue"},
                                    "T, then top-k 10 + top-p 0.9: mean": {"color": "tab:orange"}})
    axes[0].axhline(math.log(logits.shape[-1]), color="gray", linestyle=":", label=f"log V (uniform over {logits.shape[-1]})")
    axes[0].legend(fontsize=7)
    line(axes[1], TEMPERATURES, {"T alone": numbers["mean_effective_vocabulary"],
                                 "T, then top-k 10 + top-p 0.9": numbers["mean_effective_vocabulary_focused_filters"]},
         logx=True, logy=True, xlabel="temperature T (log scale)", ylabel="exp(H), mean over contexts (log scale)",
         title="effective vocabulary exp(H)")
    line(axes[2], TEMPERATURES, {f"measured: share of {draws} draws per context": argmax_share,
                                 "computed: mean max_i p_i(T)": argmax_probability},
         logx=True, xlabel="temperature T (log scale)", ylabel="P(sample = argmax)",
         title=f"T -> 0 becomes greedy (T=0 = argmax in {numbers['temperature_zero_equals_argmax_share']:.0%})",
         styles={"computed: mean max_i p_i(T)": {"linestyle": "--", "marker": None}})
    fig.tight_layout()
    run.save(fig, "entropy_vs_temperature")
    return numbers


# ---------------------------------------------------------------------------------------------- 3
def describe(config: SamplingConfig) -> str:
    parts = [f"T={config.temperature:g}"]
    if config.top_k is not None:
        parts.append(f"k={config.top_k}")
    if config.top_p < 1:
        parts.append(f"p={config.top_p:g}")
    if config.min_p > 0:
        parts.append(f"min-p={config.min_p:g}")
    if config.repetition_penalty != 1:
        parts.append(f"penalty={config.repetition_penalty:g}")
    return ", ".join(parts)


@torch.no_grad()
def score_samples(bench: Bench, sequences: torch.Tensor, prompt_length: int, samples_per_prompt: int) -> dict:
    """Quality and diversity of sequences (P*S, L), S samples for each of P prompts.

    Quality: mean log-likelihood per generated character under the judge (and under the sampling model),
    with its standard error over prompts. Diversity: distinct n-grams / all n-grams pooled over every sample
    (Li et al. 2016's distinct-n), with a jackknife standard error over prompts."""
    generated = slice(prompt_length - 1, None)  # targets prompt_length .. L-1
    judge = token_log_likelihoods(bench.judge, sequences)[:, generated].mean(1)  # (P*S,)
    own = token_log_likelihoods(bench.model, sequences)[:, generated].mean(1)
    texts = [bench.vocab.decode(row[prompt_length:].tolist()) for row in sequences.cpu()]
    groups = [texts[i:i + samples_per_prompt] for i in range(0, len(texts), samples_per_prompt)]
    P = len(groups)
    leave_one_out = np.array([distinct_ngrams([t for j, g in enumerate(groups) if j != i for t in g], DISTINCT_N)
                              for i in range(P)])
    per_prompt_judge = judge.view(P, samples_per_prompt).mean(1)  # (P,)
    return {"judge_log_likelihood": judge.mean().item(),
            "judge_log_likelihood_stderr": (per_prompt_judge.std() / math.sqrt(P)).item(),
            "own_log_likelihood": own.mean().item(),
            f"distinct_{DISTINCT_N}": distinct_ngrams(texts, DISTINCT_N),
            f"distinct_{DISTINCT_N}_stderr": float(np.sqrt((P - 1) / P * ((leave_one_out - leave_one_out.mean()) ** 2).sum())),
            "distinct_samples_per_prompt": float(np.mean([len(set(g)) for g in groups])),
            "repetition_rate": float(np.mean([repetition_rate(t) for t in texts])),
            "example": texts[0]}


@torch.no_grad()
def sample_and_score(bench: Bench, config: SamplingConfig) -> dict:
    sizes = bench.sizes
    prompts = bench.windows(sizes["prompts"], sizes["prompt_length"]).repeat_interleave(sizes["samples_per_prompt"], 0)
    sequences = bench.model.generate(prompts, sizes["new_tokens"], sampler=Sampler(config, bench.generator()))
    return {"setting": describe(config), **score_samples(bench, sequences, sizes["prompt_length"],
                                                         sizes["samples_per_prompt"])}


def validation_text_reference(bench: Bench) -> dict:
    """The same measures on real text: as many validation windows as there are samples, scored the same way."""
    sizes = bench.sizes
    count = sizes["prompts"] * sizes["samples_per_prompt"]
    windows = bench.windows(count + 1, sizes["prompt_length"] + sizes["new_tokens"])[1:]  # not the prompts' starts
    return {"setting": "validation text", **score_samples(bench, windows, sizes["prompt_length"],
                                                           sizes["samples_per_prompt"])}


def frontier_at(points: list[dict], diversity: float) -> tuple[float, float] | None:
    """(quality, slope d quality / d diversity) of a sweep's curve at `diversity`, linear between measured
    points; None outside their range."""
    key = f"distinct_{DISTINCT_N}"
    ordered = sorted(points, key=lambda p: p[key])
    for left, right in zip(ordered, ordered[1:]):
        if left[key] <= diversity <= right[key]:
            width = right[key] - left[key]
            slope = 0.0 if width == 0 else (right["judge_log_likelihood"] - left["judge_log_likelihood"]) / width
            return left["judge_log_likelihood"] + slope * (diversity - left[key]), slope
    return None


def diversity_vs_quality(run, bench: Bench) -> dict:
    """Every sweep, the top-k + top-p combinations and the presets on the same prompts and random numbers."""
    with Timer(bench.device) as timer:
        sweeps = {name: [sample_and_score(bench, c) for c in configs] for name, configs in SWEEPS.items()}
        combinations = [sample_and_score(bench, c) for c in COMBINATIONS]
        presets = {name: sample_and_score(bench, c) for name, c in PRESET_RUNS.items()}
        reference = validation_text_reference(bench)
    key = f"distinct_{DISTINCT_N}"
    for combination in combinations:  # against the better of top-k alone and top-p alone at the same diversity
        singles = {m: frontier_at(sweeps[m], combination[key]) for m in ("top-k", "top-p")}
        singles = {m: at for m, at in singles.items() if at is not None}
        if not singles:
            continue
        best = max(singles, key=lambda m: singles[m][0])
        quality, slope = singles[best]
        nearest = min(sweeps[best], key=lambda p: abs(p[key] - combination[key]))
        # noise of the margin: both qualities' standard errors, and the diversity's error moved along the curve
        noise = math.sqrt(combination["judge_log_likelihood_stderr"] ** 2 + nearest["judge_log_likelihood_stderr"] ** 2
                          + (slope * combination[f"{key}_stderr"]) ** 2)
        combination.update(best_single=best, best_single_quality=quality, noise=noise,
                           margin_over_best_single=combination["judge_log_likelihood"] - quality)
    compared = [c for c in combinations if "margin_over_best_single" in c]
    beating = [c for c in compared if c["margin_over_best_single"] > COMBINATION_SIGMAS * c["noise"]]

    # How each sweep does at the diversity of real text, and how monotone each trade-off is
    at_reference = {name: frontier_at(points, reference[key]) for name, points in sweeps.items()}
    at_reference = {name: at[0] for name, at in at_reference.items() if at is not None}
    rank_correlation = {name: float(np.corrcoef(np.argsort(np.argsort([p[key] for p in points])),
                                                np.argsort(np.argsort([p["judge_log_likelihood"] for p in points])))[0, 1])
                        for name, points in sweeps.items()}
    styles = {"temperature": dict(color="tab:red"), "top-k": dict(color="tab:blue"), "top-p": dict(color="tab:green"),
              "min-p": dict(color="tab:purple")}
    values = {"temperature": "temperature", "top-k": "top_k", "top-p": "top_p", "min-p": "min_p"}
    fig, axes = panels(1, 2, width=6.6, height=5.2,
                       title=f"Quality falls as diversity rises in every sweep (rank correlation <= "
                             f"{max(rank_correlation.values()):.2f}); {len(beating)} of {len(compared)} top-k + top-p "
                             f"settings lie > {COMBINATION_SIGMAS:g} s.e. above the better of top-k and top-p")
    for ax, quality, judged_by in ((axes[0], "judge_log_likelihood", f"the judge (lab model '{bench.judge_name}')"),
                                   (axes[1], "own_log_likelihood", f"the sampling model ('{bench.model_name}')")):
        for name, points in sweeps.items():
            ax.plot([p[key] for p in points], [p[quality] for p in points], marker="o", markersize=3,
                    label=f"{name} sweep", **styles[name])
            for p, config in zip(points, SWEEPS[name]):
                ax.annotate(f"{getattr(config, values[name]):g}", (p[key], p[quality]), textcoords="offset points",
                            xytext=(4, 2), fontsize=6, color=styles[name]["color"])
        ax.scatter([c[key] for c in combinations], [c[quality] for c in combinations], marker="x", color="black",
                   label="top-k + top-p (k 5/10/20 x p 0.8/0.9/0.95)", zorder=3)
        for name, p in presets.items():
            ax.scatter([p[key]], [p[quality]], marker="*", s=140, zorder=4, label=f"preset: {name}",
                       edgecolor="black", linewidth=0.5)
        ax.scatter([reference[key]], [reference[quality]], marker="D", s=50, color="gold", edgecolor="black", zorder=4,
                   label="validation text (real Shakespeare)")
        ax.set(xlabel=f"diversity: distinct {DISTINCT_N}-grams / all {DISTINCT_N}-grams over all samples",
               ylabel="mean log-likelihood per generated character (nats)", title=f"quality judged by {judged_by}")
        ax.axvline(reference[key], color="goldenrod", linestyle=":", linewidth=1)
    axes[0].errorbar([c[key] for c in combinations], [c["judge_log_likelihood"] for c in combinations],
                     xerr=[c[f"{key}_stderr"] for c in combinations],
                     yerr=[c["judge_log_likelihood_stderr"] for c in combinations], fmt="none", ecolor="black",
                     elinewidth=0.6)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    run.save(fig, "diversity_vs_quality")
    return {"sweeps": sweeps, "combinations": combinations, "presets": presets, "validation_text": reference,
            "judge_quality_at_validation_diversity": at_reference, "rank_correlation": rank_correlation,
            "seconds": timer.seconds, "combinations_beating_singles": [c["setting"] for c in beating],
            "combinations_compared": len(compared)}


# ---------------------------------------------------------------------------------------------- 4
@torch.no_grad()
def repetition_penalty(run, bench: Bench) -> dict:
    """Greedy decoding with each penalty: repetition of the text and its log-likelihood under the judge."""
    sizes = bench.sizes
    prompts = bench.windows(sizes["greedy_prompts"], sizes["prompt_length"])
    rows = []
    for penalty in PENALTIES:
        config = SamplingConfig(temperature=0.0, repetition_penalty=penalty)
        sequences = bench.model.generate(prompts, sizes["greedy_tokens"], sampler=Sampler(config))
        texts = [bench.vocab.decode(row[sizes["prompt_length"]:].tolist()) for row in sequences.cpu()]
        judge = token_log_likelihoods(bench.judge, sequences)[:, sizes["prompt_length"] - 1:]
        rows.append({"penalty": penalty, "repetition_rate": float(np.mean([repetition_rate(t) for t in texts])),
                     f"distinct_{DISTINCT_N}_within_text": float(np.mean([distinct_ngrams([t], DISTINCT_N) for t in texts])),
                     "judge_log_likelihood": judge.mean().item(),
                     "characters_per_text": float(np.mean([len(set(t)) for t in texts])),
                     "example": texts[0]})
    fig, axes = panels(1, 2, width=5.4, height=3.9,
                       title=f"Greedy text repeats {rows[0]['repetition_rate']:.0%} of its {REPEAT_N}-grams; "
                             f"penalty {PENALTIES[-1]:g} cuts that to {rows[-1]['repetition_rate']:.0%} at "
                             f"{rows[0]['judge_log_likelihood'] - rows[-1]['judge_log_likelihood']:.2f} nats/char")
    line(axes[0], PENALTIES, {f"repeated {REPEAT_N}-grams": [r["repetition_rate"] for r in rows],
                              f"distinct {DISTINCT_N}-grams": [r[f"distinct_{DISTINCT_N}_within_text"] for r in rows]},
         xlabel="repetition penalty r (greedy decoding)", ylabel="share of the generated text",
         title=f"{sizes['greedy_prompts']} prompts x {sizes['greedy_tokens']} greedy characters")
    line(axes[1], PENALTIES, {"judge": [r["judge_log_likelihood"] for r in rows]},
         xlabel="repetition penalty r (greedy decoding)", ylabel="mean log-likelihood per character (nats)",
         title="quality under the judge")
    fig.tight_layout()
    run.save(fig, "repetition_penalty")
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------- 5
def beam_search_experiment(run, bench: Bench) -> dict:
    """Beam widths 1 (= greedy) to 8 without an end token; then the length penalty with newline as the end."""
    sizes = bench.sizes
    prompts = bench.windows(sizes["beam_prompts"], sizes["prompt_length"])
    widths, rows = sizes["beam_widths"], []
    for width in widths:
        with Timer(bench.device) as timer:
            result = beam_search(bench.model, prompts, width, sizes["beam_tokens"])
        sequences = torch.stack(result.sequences)  # no end token: all the same length
        texts = [bench.vocab.decode(row[sizes["prompt_length"]:].tolist()) for row in sequences.cpu()]
        targets = slice(sizes["prompt_length"] - 1, None)
        rows.append({"num_beams": width, "seconds": timer.seconds,
                     "own_log_likelihood": token_log_likelihoods(bench.model, sequences)[:, targets].mean().item(),
                     "judge_log_likelihood": token_log_likelihoods(bench.judge, sequences)[:, targets].mean().item(),
                     "repetition_rate": float(np.mean([repetition_rate(t) for t in texts])), "example": texts[0]})
    newline = bench.vocab.encode("\n").item()
    length_rows = []
    for length_penalty in LENGTH_PENALTIES:
        result = beam_search(bench.model, prompts, 4, sizes["beam_tokens"], length_penalty=length_penalty,
                             eos_token_id=newline, early_stopping="never")
        lengths = [len(s) - sizes["prompt_length"] for s in result.sequences]
        length_rows.append({"length_penalty": length_penalty, "mean_generated_length": float(np.mean(lengths)),
                            "share_ending_with_newline": float(np.mean([s[-1].item() == newline
                                                                         for s in result.sequences])),
                            "example": bench.vocab.decode(result.sequences[0][sizes["prompt_length"]:].tolist())})
    fig, axes = panels(1, 3, width=4.6, height=3.8,
                       title=f"Wider beams raise the model's own likelihood ({rows[0]['own_log_likelihood']:.2f} -> "
                             f"{rows[-1]['own_log_likelihood']:.2f} nats/char) and repeat "
                             f"{rows[-1]['repetition_rate']:.0%} of {REPEAT_N}-grams at {widths[-1]} beams")
    line(axes[0], widths, {"the model": [r["own_log_likelihood"] for r in rows],
                           "the judge": [r["judge_log_likelihood"] for r in rows]}, logx=True,
         xlabel="number of beams (1 = greedy, log scale)", ylabel="mean log-likelihood per character (nats)",
         title=f"{sizes['beam_prompts']} prompts x {sizes['beam_tokens']} characters")
    line(axes[1], widths, {f"repeated {REPEAT_N}-grams": [r["repetition_rate"] for r in rows]}, logx=True,
         xlabel="number of beams (1 = greedy, log scale)", ylabel="share of the generated text",
         title="repetition")
    line(axes[2], LENGTH_PENALTIES, {"mean generated length": [r["mean_generated_length"] for r in length_rows]},
         xlabel="length penalty alpha (score = sum log p / length^alpha)",
         ylabel=f"generated characters (newline or {sizes['beam_tokens']})",
         title="4 beams, newline ends a hypothesis")
    for ax in axes[:2]:
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
    fig.tight_layout()
    run.save(fig, "beam_search")
    return {"widths": rows, "length_penalty": length_rows}


# ---------------------------------------------------------------------------------------------- 6
@torch.no_grad()
def break_it(run, bench: Bench) -> dict:
    """Three mistakes measured on the same contexts: a repetition penalty that divides every seen logit
    (negative ones become more likely), top-p before temperature (the nucleus is chosen on the wrong
    distribution), and temperature 0 as a division."""
    context = bench.model.config.context_length
    windows = bench.windows(bench.sizes["contexts"], context)
    logits = bench.model(windows)[:, -1].float()  # (N, V)
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, windows, True)  # characters in the context

    def seen_mass(penalised):
        return (penalised.softmax(-1) * seen).sum(-1).mean().item()

    penalty = 1.5
    naive = torch.where(seen, logits / penalty, logits)  # divides negative logits too: they move towards 0
    ctrl = process_logits(logits, windows, SamplingConfig(repetition_penalty=penalty))
    negative_seen = (logits < 0) & seen
    boosted = ((naive > logits) & negative_seen).sum().item() / max(1, negative_seen.sum().item())
    order = {}
    for t in (0.5, 1.5):
        right = process_logits(logits, None, SamplingConfig(temperature=t, top_p=0.9))
        wrong = apply_temperature(process_logits(logits, None, SamplingConfig(top_p=0.9)), t)
        order[t] = {"kept_right_order": torch.isfinite(right).sum(-1).float().mean().item(),
                    "kept_top_p_first": torch.isfinite(wrong).sum(-1).float().mean().item(),
                    "entropy_right_order": entropy(right).mean().item(),
                    "entropy_top_p_first": entropy(wrong).mean().item()}
    divided = (logits[:4] / 0.0).softmax(-1)  # +-inf logits: inf - inf = NaN inside the softmax
    try:
        torch.multinomial(divided, 1)
        division_error = "no error"
    except RuntimeError as error:
        division_error = str(error).splitlines()[0]
    numbers = {"penalty": penalty, "seen_mass_no_penalty": seen_mass(logits), "seen_mass_ctrl": seen_mass(ctrl),
               "seen_mass_naive_division": seen_mass(naive), "negative_seen_logits_made_likelier_by_naive": boosted,
               "top_p_0.9_order": order, "temperature_zero_by_division_nan_share": divided.isnan().float().mean().item(),
               "temperature_zero_by_division_error": division_error}
    fig, axes = panels(1, 2, width=5.4, height=3.9,
                       title=f"Characters already in the context hold {numbers['seen_mass_no_penalty']:.0%} of the "
                             f"probability; top-p before T=0.5 keeps {order[0.5]['kept_top_p_first']:.1f} tokens "
                             f"instead of {order[0.5]['kept_right_order']:.1f}")
    names = ["no penalty", f"CTRL penalty {penalty:g}", f"divide all by {penalty:g}"]
    masses = [numbers["seen_mass_no_penalty"], numbers["seen_mass_ctrl"], numbers["seen_mass_naive_division"]]
    axes[0].bar(names, masses, color=["gray", "tab:blue", "tab:red"])
    for i, m in enumerate(masses):
        axes[0].annotate(f"{m:.3f}", (i, m), ha="center", va="bottom", fontsize=8)
    axes[0].set(ylabel="probability of characters already in the context", ylim=(0, 1.0),
                title=f"mean over {logits.shape[0]} contexts")
    x = np.arange(2)
    for offset, (label, field, color) in enumerate((("temperature, then top-p (HF order)", "kept_right_order", "tab:blue"),
                                                    ("top-p, then temperature", "kept_top_p_first", "tab:red"))):
        values = [order[t][field] for t in (0.5, 1.5)]
        axes[1].bar(x + (offset - 0.5) * 0.38, values, width=0.38, color=color, label=label)
        for xi, v in zip(x + (offset - 0.5) * 0.38, values):
            axes[1].annotate(f"{v:.1f}", (xi, v), ha="center", va="bottom", fontsize=8)
    axes[1].set_xticks(x, ["T = 0.5", "T = 1.5"])
    axes[1].set(ylabel="tokens kept by top-p 0.9 (mean over contexts)", title="the order of temperature and top-p")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    run.save(fig, "break_it")
    return numbers


# ---------------------------------------------------------------------------------------------- verdicts
def verdicts(entropy_numbers: dict, frontier: dict) -> dict:
    """Each claim decided against the threshold named in its rule."""
    presets, temperature_one = frontier["presets"], frontier["sweeps"]["temperature"][SWEEPS["temperature"].index(
        SamplingConfig(temperature=1.0))]
    key = f"distinct_{DISTINCT_N}"

    def exceeds(a: dict, b: dict, field: str) -> bool:
        """a[field] > b[field] by more than PRESET_SIGMAS combined standard errors."""
        return a[field] - b[field] > PRESET_SIGMAS * math.hypot(a[f"{field}_stderr"], b[f"{field}_stderr"])

    focused, creative, deterministic = presets["focused"], presets["creative"], presets["deterministic"]
    preset_checks = {
        "deterministic: one distinct sample per prompt": deterministic["distinct_samples_per_prompt"] == 1.0,
        "focused less diverse than plain T=1 sampling": exceeds(temperature_one, focused, key),
        "focused better under the judge than plain T=1": exceeds(focused, temperature_one, "judge_log_likelihood"),
        "creative more diverse than plain T=1 sampling": exceeds(creative, temperature_one, key),
        "creative worse under the judge than plain T=1": exceeds(temperature_one, creative, "judge_log_likelihood"),
    }
    beating = frontier["combinations_beating_singles"]
    return {
        "temperature_zero_is_argmax": {
            "verdict": "holds" if entropy_numbers["temperature_zero_equals_argmax_share"] == 1.0 else "fails",
            "rule": "holds if temperature 0 picks the argmax in every one of the contexts",
            "share": entropy_numbers["temperature_zero_equals_argmax_share"],
            "contexts": entropy_numbers["contexts"],
            "sample_equals_argmax_share_at_lowest_T": entropy_numbers["sample_equals_argmax_share"][0]},
        "higher_temperature_higher_entropy": {
            "verdict": "holds" if entropy_numbers["share_of_contexts_monotone"] == 1.0 else "fails",
            "rule": f"holds if the entropy never falls by more than {ENTROPY_TOLERANCE} nats between consecutive "
                    f"temperatures {TEMPERATURES} in every context",
            "share_of_contexts_monotone": entropy_numbers["share_of_contexts_monotone"],
            "share_monotone_with_top_k_10_top_p_0.9": entropy_numbers["share_of_contexts_monotone_focused_filters"],
            "mean_entropy_at_lowest_and_highest_T": [entropy_numbers["mean_entropy"][0],
                                                     entropy_numbers["mean_entropy"][-1]]},
        "use_top_k_or_top_p_not_both": {
            "verdict": "holds" if not beating else "fails",
            "rule": f"holds if no top-k + top-p setting lies more than {COMBINATION_SIGMAS} standard errors of its "
                    f"judge quality above the better of the top-k and top-p frontiers at the same diversity",
            "combinations_beating_singles": beating, "combinations_compared": frontier["combinations_compared"],
            "margins": {c["setting"]: c.get("margin_over_best_single") for c in frontier["combinations"]},
            "noise": {c["setting"]: c.get("noise") for c in frontier["combinations"]}},
        "presets_behave_as_named": {
            "verdict": "holds" if all(preset_checks.values()) else ("depends" if any(preset_checks.values()) else "fails"),
            "rule": f"holds if every check holds (differences beyond {PRESET_SIGMAS} combined standard errors), "
                    f"depends if only some do, fails if none does",
            "checks": preset_checks,
            "top_k_100_is_a_no_op_on_this_vocabulary": entropy_numbers["vocabulary_size"] <= 100},
    }


# ---------------------------------------------------------------------------------------------- main
def main():
    parser = demo_parser(__doc__)
    parser.add_argument("--judge", choices=("quick", "full", "large"), default=None,
                        help="lab preset of the judge of quality (default: large; in --quick the quick model itself)")
    args = parser.parse_args()
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if run.quick else "full"]
    lab = trained_lab_model("quick" if run.quick else "full", run.device)
    judge_preset = args.judge or ("quick" if run.quick else "large")
    judge = lab if judge_preset == lab.record["preset"] else trained_lab_model(judge_preset, run.device)
    text, _ = load_corpus("auto")
    _, val = train_val_split(lab.data.vocab.encode(text), val_fraction=0.1)
    bench = Bench(lab.model, judge.model, lab.data.vocab, val, run.device, run.seed, sizes, lab.record["preset"],
                  judge.record["preset"])
    print(f"  model: {lab.record['preset']} (val loss {lab.record['val_loss']:.3f}); judge: {judge.record['preset']} "
          f"(val loss {judge.record['val_loss']:.3f}); {lab.data.corpus}, {lab.data.vocab.size} characters")

    print("\n1. distributions after one prompt")
    dist = distributions(run, bench)
    print("\n2. entropy vs temperature")
    ent = entropy_vs_temperature(run, bench)
    print("\n3. diversity vs quality")
    frontier = diversity_vs_quality(run, bench)
    print("\n4. repetition penalty under greedy decoding")
    penalty = repetition_penalty(run, bench)
    print("\n5. beam search")
    beams = beam_search_experiment(run, bench)
    print("\n6. break it")
    broken = break_it(run, bench)

    key = f"distinct_{DISTINCT_N}"
    table = [{"sweep": name, "setting": p["setting"], key: p[key], "judge ll": p["judge_log_likelihood"],
              "s.e.": p["judge_log_likelihood_stderr"], "own ll": p["own_log_likelihood"],
              "repeat": p["repetition_rate"]}
             for name, points in [*frontier["sweeps"].items(), ("top-k + top-p", frontier["combinations"]),
                                  ("preset", list(frontier["presets"].values()))] for p in points]
    print_table(table, title=f"Diversity vs quality: {sizes['prompts']} prompts x {sizes['samples_per_prompt']} samples "
                             f"x {sizes['new_tokens']} characters (ll = mean log-likelihood per character, nats)")
    print_table(penalty["rows"], title="Greedy decoding with a repetition penalty")
    print_table(beams["widths"], title="Beam search (no end token)")
    print_table(beams["length_penalty"], title="Beam search, 4 beams, newline ends a hypothesis")

    decided = verdicts(ent, frontier)
    presets = frontier["presets"]
    print("\nKey insights")
    print(f"- Temperature 0 picked the argmax in {ent['temperature_zero_equals_argmax_share']:.0%} of "
          f"{ent['contexts']} contexts; at T={TEMPERATURES[0]} a sample was the argmax "
          f"{ent['sample_equals_argmax_share'][0]:.1%} of the time.")
    print(f"- Mean next-character entropy {ent['mean_entropy'][0]:.2f} nats at T={TEMPERATURES[0]}, "
          f"{ent['mean_entropy'][TEMPERATURES.index(1.0)]:.2f} at T=1, {ent['mean_entropy'][-1]:.2f} at "
          f"T={TEMPERATURES[-1]} (log V = {math.log(ent['vocabulary_size']):.2f}); monotone in "
          f"{ent['share_of_contexts_monotone']:.0%} of contexts.")
    for name, p in presets.items():
        print(f"- Preset {name}: {key} {p[key]:.3f}, judge {p['judge_log_likelihood']:.3f} nats/char, "
              f"e.g. \"{show(p['example'][:40])}\"")
    rows = penalty["rows"]
    print(f"- Greedy repetition: {rows[0]['repetition_rate']:.0%} of {REPEAT_N}-grams repeat without a penalty, "
          f"{rows[-1]['repetition_rate']:.0%} at {rows[-1]['penalty']:g}.")
    print("\nVerdicts")
    for claim, verdict in decided.items():
        print(f"- {claim}: {verdict['verdict']}  ({verdict['rule']})")

    run.finish({"sizes": sizes, "model": lab.record, "judge": judge.record, "distributions": dist,
                "entropy_vs_temperature": ent, "diversity_vs_quality": frontier, "repetition_penalty": penalty,
                "beam_search": beams, "break_it": broken, "verdicts": decided})


if __name__ == "__main__":
    main()
