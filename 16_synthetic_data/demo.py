"""16 — Synthetic data: make it, clean it, use it.

Experiments (04's lab model, trained with 00_utils' loop; every run starts from the same seed):
  1. entropy_floor: a random order-2 Markov chain, whose entropy rate is a formula, as training data;
     the lab model's loss against that floor over training and position by position.
  2. real_vs_synthetic: real Shakespeare, synthetic text from an order-2 chain fitted to it, and
     mixtures of the two (synthetic share swept), all evaluated on real validation text.
  3. minhash_lsh: MinHash estimates against exact Jaccard, and the LSH candidate rate against the
     formula 1 - (1 - s^r)^b, for the default band shape and two broken ones.
  4. duplicates: a share of the training windows spent on repeated documents (exact and near copies);
     held-out loss and the train/held-out gap; then the same corpus after exact and near dedup.
  5. noise: inputs corrupted during training (noise injection) or a corrupted corpus, evaluated on
     clean and on corrupted validation inputs.
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import json
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data import CharVocab, load_corpus, train_val_split
from dedup import (MinHasher, deduplicate, estimated_jaccard, exact_duplicate_groups, jaccard,
                   lsh_candidate_pairs, lsh_candidate_probability, near_duplicate_groups, shingles)
from demo_cli import demo_parser, print_table, start_demo
from generate import MarkovChain, add_noise, assign_splits, corrupt_ids
from lab import lab_model_config, short_schedule
from plotting import line, panels
from runtime import Timer, seed_everything
from training import train
from transformer import MiniFormer

# Quick and full runs differ in these sizes only.
SIZES = {
    "quick": dict(model=dict(num_layers=2, num_heads=4, embed_dim=64), steps=20, floor_steps=40, batch_size=8,
                  eval_windows=32, synthetic_rows=32, synthetic_length=1024, docs=400, repeated_docs=4,
                  ratios=(0.0, 1.0), repeat_fractions=(0.0, 0.5), injection_rates=(0.1,), lsh_pairs=60, lsh_seeds=4),
    "full": dict(model=dict(), steps=250, floor_steps=600, batch_size=12, eval_windows=256, synthetic_rows=128,
                 synthetic_length=4096, docs=None, repeated_docs=8, ratios=(0.0, 0.5, 1.0),
                 repeat_fractions=(0.0, 0.5, 0.8), injection_rates=(0.05, 0.2), lsh_pairs=300, lsh_seeds=10),
}
CONTEXT = 64
DOC_LENGTH = 256  # characters per document in the duplicates experiment
COPY_NOISE = 0.03  # substitution rate of the near (not exact) copies
EVAL_NOISE = 0.10  # substitution rate of the corrupted validation inputs
CORPUS_NOISE = 0.10  # substitution rate of the corrupted-corpus variant
LSH_SHAPES = {"b=32, r=4 (default)": (32, 4), "b=16, r=8": (16, 8), "b=128, r=1 (break it)": (128, 1),
              "b=4, r=32 (break it)": (4, 32)}
# Thresholds of the verdicts, written beside the claims they decide.
FLOOR_TOLERANCE = 0.05  # nats: "reaches the floor" when the final loss is within this of H
MATCH_TOLERANCE = 0.03  # nats: synthetic "matches" real when its real-validation loss is within this
DEDUP_GAP_RATIO = 0.5  # dedup "prevents overfitting" when it at least halves the train/held-out gap...
ROBUSTNESS_SIGMAS = 3.0  # noise injection "helps" when it lowers the noisy-input loss by > 3 paired std errors


# ---------------------------------------------------------------------------------------------- shared bench
@dataclass
class Bench:
    """What every training shares: sizes, device, seed, the real corpus and the batch generator."""

    sizes: dict
    device: torch.device
    seed: int
    vocab: CharVocab
    corpus: str
    train_text: str
    real_train: torch.Tensor  # (N,) ids
    real_val: torch.Tensor  # (M,) ids
    generator: torch.Generator


def windows(rows: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random windows of CONTEXT + 1 ids from the rows (R, L) of a corpus: x (count, T), y (count, T)."""
    row = torch.randint(0, rows.shape[0], (count,), generator=generator)
    start = torch.randint(0, rows.shape[1] - CONTEXT, (count,), generator=generator)
    window = rows[row[:, None], start[:, None] + torch.arange(CONTEXT + 1)]  # (count, T + 1)
    return window[:, :-1], window[:, 1:]


def make_batch_fn(bench: Bench, parts: list, val_rows: torch.Tensor, vocab_size: int, input_noise: float = 0.0):
    """batch_fn(split): 'train' draws `count` windows from each (rows, count) part; 'val' from val_rows.
    input_noise corrupts the training inputs x (never the targets y): noise injection."""
    def batch_fn(split: str):
        if split == "val":
            x, y = windows(val_rows, bench.sizes["batch_size"], bench.generator)
        else:
            drawn = [windows(rows, count, bench.generator) for rows, count in parts if count > 0]
            x, y = torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn])
            if input_noise > 0:
                seed = int(torch.randint(0, 2 ** 31, (1,), generator=bench.generator))
                x = torch.from_numpy(corrupt_ids(x.numpy(), input_noise, vocab_size, seed=seed))
        return x.to(bench.device), y.to(bench.device)
    return batch_fn


def train_model(bench: Bench, label: str, batch_fn, vocab_size: int, steps: int | None = None):
    """A fresh lab model (same seed, same batch order every time) trained on batch_fn for `steps` (default: sizes)."""
    seed_everything(bench.seed)
    bench.generator.manual_seed(bench.seed)
    model = MiniFormer(lab_model_config(vocab_size, context_length=CONTEXT, **bench.sizes["model"])).to(bench.device)
    steps = steps or bench.sizes["steps"]
    with Timer(bench.device) as timer:
        history = train(model, batch_fn, short_schedule(steps, eval_interval=max(1, steps // 6), eval_batches=4),
                        device=bench.device)
    print(f"  {label:34s} {steps} steps in {timer.seconds:5.1f} s, val loss {history.final_val_loss:.3f}")
    return model, {"eval_steps": history.eval_steps, "val_loss": history.val_loss,
                   "train_loss": history.eval_train_loss, "train_seconds": timer.seconds}


def fixed_windows(rows: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return windows(rows, count, torch.Generator().manual_seed(seed))


@torch.no_grad()
def window_losses(model, x: torch.Tensor, y: torch.Tensor, device) -> torch.Tensor:
    """(N, T) cross-entropy of every target of the fixed windows, in eval mode."""
    model.eval()
    losses = [F.cross_entropy(model(xb.to(device)).transpose(1, 2), yb.to(device), reduction="none").cpu()
              for xb, yb in zip(x.split(64), y.split(64))]
    return torch.cat(losses)


def summary(losses: torch.Tensor) -> dict:
    """Mean loss and its standard error over windows (windows are independent draws)."""
    per_window = losses.mean(1)
    return {"loss": per_window.mean().item(),
            "stderr": (per_window.std() / math.sqrt(len(per_window))).item() if len(per_window) > 1 else float("nan")}


# ---------------------------------------------------------------------------------------------- 1
def entropy_floor(run, bench: Bench) -> dict:
    """Train on a random order-2 chain over 8 letters; compare the loss with its formula floor."""
    sizes = bench.sizes
    chain = MarkovChain.random("abcdefgh", order=2, concentration=0.3, seed=bench.seed)
    rows = torch.from_numpy(chain.sample_ids(sizes["synthetic_rows"], sizes["synthetic_length"], seed=bench.seed + 1))
    val_rows = torch.from_numpy(chain.sample_ids(sizes["synthetic_rows"], sizes["synthetic_length"], seed=bench.seed + 2))
    batch_fn = make_batch_fn(bench, [(rows, sizes["batch_size"])], val_rows, chain.vocab_size)
    model, curve = train_model(bench, "random order-2 chain", batch_fn, chain.vocab_size, sizes["floor_steps"])
    x, y = fixed_windows(val_rows, sizes["eval_windows"], bench.seed + 3)
    losses = window_losses(model, x, y, bench.device)  # (N, T): position t predicts symbol t + 1 from t + 1 symbols
    floor = chain.conditional_entropies(CONTEXT + 1)[1:]  # (T,) formula: H(X_t+1 | X_0..X_t)
    rate = chain.entropy_rate()
    # Monte-Carlo check of the formula on the same windows: the chain's own loss on them
    chain_nll = chain.negative_log_likelihood(torch.cat([x, y[:, -1:]], 1).numpy()).mean()
    measured = summary(losses[:, chain.order - 1:])  # the positions that see >= k symbols: floor H
    result = {"entropy_rate": rate, "unigram_entropy": chain.block_entropy(1),
              "order1_entropy": chain.block_entropy(2) - chain.block_entropy(1),
              "log_vocab": math.log(chain.vocab_size), "chain_nll_on_eval_windows": float(chain_nll),
              "model_loss_with_full_context": measured["loss"], "model_loss_stderr": measured["stderr"],
              "excess_over_floor": measured["loss"] - rate, "per_position_loss": losses.mean(0),
              "per_position_floor": floor, "steps": sizes["floor_steps"], "curve": curve}

    fig, axes = panels(1, 2, width=6.0, height=4.2,
                       title=f"The lab model's loss on a Markov chain ends {result['excess_over_floor']:.3f} nats "
                             f"above its entropy rate H = {rate:.3f}")
    steps = curve["eval_steps"]
    axes[0].plot(steps, curve["val_loss"], "o-", color="tab:blue", label="lab model, validation loss (measured)")
    for level, text, style in ((math.log(chain.vocab_size), "log K: uniform guess (formula)", ":"),
                               (result["unigram_entropy"], "H(X): symbol frequencies only (formula)", "-."),
                               (result["order1_entropy"], "H(X_t | X_t-1): one symbol of context (formula)", "--"),
                               (rate, "H = -sum pi P log P: the floor (formula)", "-")):
        axes[0].axhline(level, color="black", linestyle=style, linewidth=1, label=f"{text} = {level:.3f}")
    axes[0].set(xlabel="training step", ylabel="loss (nats / symbol)",
                title=f"order-2 chain, {chain.vocab_size} symbols, Dirichlet(0.3) rows")
    axes[0].legend(fontsize=7)
    context = np.arange(1, CONTEXT + 1)
    axes[1].plot(context, losses.mean(0).numpy(), "o", markersize=3, label="lab model (measured)")
    axes[1].step(context, floor, "k-", where="mid", linewidth=1.2, label="H(X_t+1 | X_0..X_t) (formula)")
    axes[1].set(xlabel="symbols of context (position in the window + 1, log scale)", ylabel="loss (nats / symbol)",
                title=f"per position, {sizes['eval_windows']} validation windows")
    axes[1].set_xscale("log")
    axes[1].legend()
    run.save(fig, "entropy_floor")
    return result


# ---------------------------------------------------------------------------------------------- 2
def real_vs_synthetic(run, bench: Bench) -> dict:
    """Train on real text, on synthetic text from a chain fitted to it, and on mixtures; test on real text."""
    sizes = bench.sizes
    alphabet = "".join(bench.vocab.chars)
    fitted = {order: MarkovChain.fit(bench.train_text, order=order, alphabet=alphabet, smoothing=0.1)
              for order in (1, 2)}
    synthetic = {order: torch.from_numpy(chain.sample_ids(sizes["synthetic_rows"], sizes["synthetic_length"],
                                                          seed=bench.seed + order))
                 for order, chain in fitted.items()}
    synthetic_val = torch.from_numpy(fitted[2].sample_ids(sizes["synthetic_rows"], sizes["synthetic_length"],
                                                          seed=bench.seed + 10))
    real_rows, real_val_rows = bench.real_train[None], bench.real_val[None]
    eval_real = fixed_windows(real_val_rows, sizes["eval_windows"], bench.seed + 3)
    eval_synthetic = fixed_windows(synthetic_val, sizes["eval_windows"], bench.seed + 4)
    val_ids = bench.real_val.numpy()
    chain_on_real = {order: float(chain.negative_log_likelihood(val_ids).mean()) for order, chain in fitted.items()}

    runs, models = {}, {}
    for ratio in sizes["ratios"]:
        synthetic_count = round(ratio * sizes["batch_size"])
        parts = [(real_rows, sizes["batch_size"] - synthetic_count), (synthetic[2], synthetic_count)]
        label = f"synthetic share {ratio:.2f}"
        models[ratio], curve = train_model(bench, label, make_batch_fn(bench, parts, real_val_rows, bench.vocab.size),
                                           bench.vocab.size)
        runs[label] = {"ratio": ratio, "curve": curve,
                       "real_val": summary(window_losses(models[ratio], *eval_real, bench.device)),
                       "synthetic_val": summary(window_losses(models[ratio], *eval_synthetic, bench.device))}
    order1 = make_batch_fn(bench, [(synthetic[1], sizes["batch_size"])], real_val_rows, bench.vocab.size)
    model, curve = train_model(bench, "order-1 synthetic only", order1, bench.vocab.size)
    runs["order-1 synthetic only"] = {"ratio": 1.0, "curve": curve,
                                      "real_val": summary(window_losses(model, *eval_real, bench.device))}

    labels = [f"synthetic share {r:.2f}" for r in sizes["ratios"]]
    real_only, synthetic_only = runs[labels[0]]["real_val"]["loss"], runs[labels[-1]]["real_val"]["loss"]
    fig, axes = panels(1, 2, width=6.0, height=4.2,
                       title=f"On real validation text, synthetic-only training reaches {synthetic_only:.3f} "
                             f"nats/char, real-only {real_only:.3f}")
    colors = {label: f"C{i}" for i, label in enumerate(runs)}
    for label, result in runs.items():
        axes[0].plot(result["curve"]["eval_steps"], result["curve"]["val_loss"], "o-", markersize=3,
                     color=colors[label], label=label)
    for order, style in ((1, ":"), (2, "--")):
        axes[0].axhline(chain_on_real[order], color="black", linestyle=style, linewidth=1,
                        label=f"order-{order} chain's own loss on real val (computed) = {chain_on_real[order]:.3f}")
    axes[0].set(xlabel="training step", ylabel="real validation loss (nats / char)",
                title="learning curves, same steps and batch size")
    axes[0].legend(fontsize=7, loc="upper right")
    ratios = list(sizes["ratios"])
    for key, name, marker in (("real_val", "real validation text", "o"), ("synthetic_val", "order-2 synthetic validation", "s")):
        values = [runs[label][key]["loss"] for label in labels]
        errors = [2 * runs[label][key]["stderr"] for label in labels]
        axes[1].errorbar(ratios, values, yerr=errors, marker=marker, capsize=3, label=f"{name} (measured, +-2 s.e.)")
    axes[1].axhline(fitted[2].entropy_rate(), color="black", linewidth=1,
                    label=f"order-2 chain's entropy rate H (formula) = {fitted[2].entropy_rate():.3f}")
    axes[1].set(xlabel="synthetic share of every training batch", ylabel="loss after training (nats / char)",
                title=f"final loss vs mixing ratio ({sizes['steps']} steps)")
    axes[1].legend(fontsize=7)
    run.save(fig, "real_vs_synthetic")
    return {"runs": runs, "chain_loss_on_real_val": chain_on_real, "lab_reference": lab_reference(),
            "chain_entropy_rate": {order: chain.entropy_rate() for order, chain in fitted.items()}}, models[0.0], eval_real


def lab_reference() -> dict | None:
    """04's committed reference run (the full 2000-step recipe on real text), for the longer-budget comparison."""
    path = pathlib.Path(__file__).resolve().parents[1] / "04_transformer_block" / "results.json"
    try:
        reference = json.loads(path.read_text())["results"]["reference"]
        return {"source": "04_transformer_block/results.json", "steps": reference["steps"],
                "final_val_loss": reference["final_val_loss"]}
    except (OSError, KeyError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- 3
def minhash_lsh(run, bench: Bench) -> dict:
    """Pairs of real documents with a range of similarities: MinHash vs exact Jaccard, LSH vs its formula."""
    sizes = bench.sizes
    rng = random.Random(bench.seed)
    alphabet = "".join(bench.vocab.chars)
    starts = [rng.randrange(len(bench.train_text) - DOC_LENGTH) for _ in range(sizes["lsh_pairs"])]
    pairs = []
    for index, start in enumerate(starts):  # a document and a copy with substitution rate from 0 to 0.4
        document = bench.train_text[start: start + DOC_LENGTH]
        pairs.append((document, add_noise(document, 0.4 * index / len(starts), alphabet, seed=index)))
    exact = np.array([jaccard(shingles(a), shingles(b)) for a, b in pairs])
    hasher = MinHasher(128, seed=bench.seed)
    estimates = np.array([estimated_jaccard(hasher.signature(shingles(a)), hasher.signature(shingles(b)))
                          for a, b in pairs])
    errors = (estimates - exact) / np.sqrt(np.maximum(exact * (1 - exact), 1e-12) / 128)
    hits = {name: np.zeros(len(pairs)) for name in LSH_SHAPES}
    for seed in range(sizes["lsh_seeds"]):  # a fresh hash family per repetition
        hasher = MinHasher(128, seed=1000 + seed)
        for i, (a, b) in enumerate(pairs):
            signatures = np.stack([hasher.signature(shingles(a)), hasher.signature(shingles(b))])
            for name, (bands, rows) in LSH_SHAPES.items():
                hits[name][i] += bool(lsh_candidate_pairs(signatures, bands, rows))
    bins = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(exact, bins) - 1, 0, 9)
    curves = {}
    for name, (bands, rows) in LSH_SHAPES.items():
        rate = hits[name] / sizes["lsh_seeds"]
        formula = lsh_candidate_probability(exact, bands, rows)
        filled = [b for b in range(10) if (which == b).any()]
        curves[name] = {"bin_centre": [float(bins[b] + 0.05) for b in filled],
                        "measured": [float(rate[which == b].mean()) for b in filled],
                        "formula": [float(formula[which == b].mean()) for b in filled],
                        "max_abs_gap": float(max(abs(rate[which == b].mean() - formula[which == b].mean())
                                                 for b in filled))}
    fig, axes = panels(1, 2, width=6.0, height=4.3,
                       title=f"MinHash error is {np.abs(errors).mean():.2f} binomial std on average; LSH "
                             f"candidate rates follow 1 - (1 - s^r)^b")
    grid = np.linspace(0, 1, 101)
    band = 2 * np.sqrt(grid * (1 - grid) / 128)
    axes[0].fill_between(grid, grid - band, grid + band, color="tab:gray", alpha=0.3,
                         label="J +- 2 sqrt(J(1-J)/128) (formula)")
    axes[0].plot(exact, estimates, "o", markersize=3, label="MinHash estimate, 128 hashes (measured)")
    axes[0].plot(grid, grid, "k-", linewidth=0.8)
    axes[0].set(xlabel="exact Jaccard of the 5-character shingle sets", ylabel="MinHash estimate",
                title=f"{len(pairs)} document / noisy-copy pairs")
    axes[0].legend()
    for i, (name, curve) in enumerate(curves.items()):
        bands, rows = LSH_SHAPES[name]
        axes[1].plot(grid, lsh_candidate_probability(grid, bands, rows), color=f"C{i}", linewidth=1,
                     label=f"{name}: formula")
        axes[1].plot(curve["bin_centre"], curve["measured"], "o", color=f"C{i}", label=f"{name}: measured")
    axes[1].set(xlabel="exact Jaccard similarity s", ylabel="P(pair becomes an LSH candidate)",
                title=f"128 hashes in b bands of r rows, {sizes['lsh_seeds']} hash families per pair")
    axes[1].legend(fontsize=7)
    run.save(fig, "minhash_lsh")
    return {"mean_abs_error_in_binomial_std": float(np.abs(errors).mean()),
            "fraction_within_2_std": float((np.abs(errors) <= 2).mean()), "lsh": curves}


# ---------------------------------------------------------------------------------------------- 4
def repeated_corpus(documents: list[str], repeated: list[int], fraction: float, alphabet: str):
    """The documents plus copies of the `repeated` ones, enough for `fraction` of all documents to be copies;
    every other copy is exact, the rest carry COPY_NOISE substitutions. Returns texts and {copy: source}."""
    num_copies = round(fraction / (1 - fraction) * len(documents))
    texts, source_of = list(documents), {}
    for k in range(num_copies):
        source = repeated[k % len(repeated)]
        texts.append(documents[source] if k % 2 == 0 else add_noise(documents[source], COPY_NOISE, alphabet, seed=k))
        source_of[len(texts) - 1] = source
    return texts, source_of


def duplicates(run, bench: Bench, eval_real) -> dict:
    """Spend a share of training on repeated documents; then remove them by exact and by near dedup."""
    sizes = bench.sizes
    alphabet = "".join(bench.vocab.chars)
    documents = [bench.train_text[i: i + DOC_LENGTH] for i in range(0, len(bench.train_text) - DOC_LENGTH, DOC_LENGTH)]
    documents = documents[: sizes["docs"]] if sizes["docs"] else documents
    repeated = random.Random(bench.seed).sample(range(len(documents)), sizes["repeated_docs"])
    repeated_rows = bench.vocab.encode("".join(documents[i] for i in repeated))[None]
    eval_repeated = fixed_windows(repeated_rows, sizes["eval_windows"], bench.seed + 5)
    real_val_rows = bench.real_val[None]

    def train_on(label: str, texts: list[str]) -> dict:
        rows = torch.stack([bench.vocab.encode(text) for text in texts])  # (D, DOC_LENGTH)
        batch_fn = make_batch_fn(bench, [(rows, sizes["batch_size"])], real_val_rows, bench.vocab.size)
        model, curve = train_model(bench, label, batch_fn, bench.vocab.size)
        own = summary(window_losses(model, *fixed_windows(rows, sizes["eval_windows"], bench.seed + 6), bench.device))
        held_out = summary(window_losses(model, *eval_real, bench.device))
        return {"documents": len(texts), "held_out": held_out, "train_corpus": own,
                "repeated_docs": summary(window_losses(model, *eval_repeated, bench.device)),
                "gap": held_out["loss"] - own["loss"], "curve": curve}

    sweep, corpora = {}, {}
    for fraction in sizes["repeat_fractions"]:
        corpora[fraction] = repeated_corpus(documents, repeated, fraction, alphabet)
        sweep[fraction] = train_on(f"repeated fraction {fraction:.2f}", corpora[fraction][0])

    middle = sorted(sizes["repeat_fractions"])[len(sizes["repeat_fractions"]) // 2]
    texts, source_of = corpora[middle]
    with Timer() as timer:
        near_groups = near_duplicate_groups(texts, threshold=0.5, num_hashes=128, bands=32)
    found = {(g[0], j) for g in near_groups for j in g[1:]}
    planted = {(min(source, copy), max(source, copy)) for copy, source in source_of.items()}
    found_all = {(i, j) for g in near_groups for i in g for j in g if i < j}
    same_source = [source_of.get(i, i) == source_of.get(j, j) for i, j in found_all]
    detection = {"documents": len(texts), "planted_pairs": len(planted), "groups": len(near_groups),
                 "recall": len(planted & found_all) / max(1, len(planted)),
                 "precision": float(np.mean(same_source)) if same_source else float("nan"),
                 "exact_groups": len(exact_duplicate_groups(texts)), "seconds": timer.seconds,
                 "links_checked": len(found)}
    deduped = {"exact dedup": deduplicate(texts, near=False), "near dedup (MinHash + LSH)": deduplicate(texts)}
    cleaned = {name: train_on(f"{name}, from fraction {middle:.2f}", [texts[i] for i in kept])
               for name, kept in deduped.items()}
    # where copies land under hash splits and under a random split of the same documents
    splits = assign_splits(texts)
    split_of = {i: name for name, members in splits.items() for i in members}
    coin = random.Random(bench.seed)
    random_split = {i: coin.choices(("train", "val", "test"), (0.8, 0.1, 0.1))[0] for i in range(len(texts))}
    exact_copies = [c for c, s in source_of.items() if texts[c] == documents[s]]
    near_copies = [c for c, s in source_of.items() if texts[c] != documents[s]]
    leaks = {"exact_copies_split_from_source_hash": float(np.mean([split_of[c] != split_of[source_of[c]] for c in exact_copies])),
             "exact_copies_split_from_source_random": float(np.mean([random_split[c] != random_split[source_of[c]]
                                                                     for c in exact_copies])),
             "near_copies_split_from_source_hash": float(np.mean([split_of[c] != split_of[source_of[c]] for c in near_copies]))}

    fig, axes = panels(1, 2, width=6.0, height=4.2,
                       title=f"Repeated documents widen the train/held-out gap from {sweep[0.0]['gap']:.3f} to "
                             f"{sweep[max(sweep)]['gap']:.3f} nats; near dedup brings it to "
                             f"{cleaned['near dedup (MinHash + LSH)']['gap']:.3f}")
    fractions = list(sweep)
    line(axes[0], fractions, {"held-out real text": [r["held_out"]["loss"] for r in sweep.values()],
                              "its own training corpus": [r["train_corpus"]["loss"] for r in sweep.values()],
                              "the repeated documents": [r["repeated_docs"]["loss"] for r in sweep.values()]},
         xlabel="fraction of training documents that are copies of a few", ylabel="loss after training (nats / char)",
         title=f"{sizes['repeated_docs']} documents repeated (half exact, half {COPY_NOISE:.0%} noisy)")
    names = [f"raw ({middle:.2f} copies)", *cleaned]
    results_by_name = {names[0]: sweep[middle], **cleaned}
    positions = np.arange(len(names))
    axes[1].bar(positions - 0.2, [r["held_out"]["loss"] for r in results_by_name.values()], 0.4, label="held-out loss")
    axes[1].bar(positions + 0.2, [r["gap"] for r in results_by_name.values()], 0.4, label="gap: held-out - own training corpus")
    for x, r in zip(positions, results_by_name.values()):
        axes[1].annotate(f"{r['held_out']['loss']:.3f}", (x - 0.2, r["held_out"]["loss"]), ha="center", va="bottom", fontsize=7)
        axes[1].annotate(f"{r['gap']:.3f}", (x + 0.2, max(r["gap"], 0)), ha="center", va="bottom", fontsize=7)
    axes[1].set_xticks(positions, [f"{n}\n{r['documents']} docs" for n, r in zip(names, results_by_name.values())], fontsize=7)
    axes[1].set(ylabel="nats / char", title=f"near dedup recall {detection['recall']:.2f}, precision {detection['precision']:.2f}")
    axes[1].legend()
    run.save(fig, "duplicates")
    return {"sweep": sweep, "dedup_from_fraction": middle, "raw": sweep[middle], "cleaned": cleaned,
            "detection": detection, "split_leaks": leaks}


# ---------------------------------------------------------------------------------------------- 5
def noise(run, bench: Bench, baseline_model, eval_real) -> dict:
    """Noise injection on the inputs, and a corrupted corpus, against the clean baseline."""
    sizes = bench.sizes
    x, y = eval_real
    noisy_x = torch.from_numpy(corrupt_ids(x.numpy(), EVAL_NOISE, bench.vocab.size, seed=bench.seed + 7))
    real_rows, real_val_rows = bench.real_train[None], bench.real_val[None]
    corrupted_rows = torch.from_numpy(corrupt_ids(bench.real_train.numpy(), CORPUS_NOISE, bench.vocab.size,
                                                  seed=bench.seed + 8))[None]
    models = {"clean training (baseline)": (0.0, baseline_model)}
    for rate in sizes["injection_rates"]:
        batch_fn = make_batch_fn(bench, [(real_rows, sizes["batch_size"])], real_val_rows, bench.vocab.size, rate)
        models[f"noise injection {rate:.2f}"] = (rate, train_model(bench, f"noise injection {rate:.2f}", batch_fn,
                                                                   bench.vocab.size)[0])
    batch_fn = make_batch_fn(bench, [(corrupted_rows, sizes["batch_size"])], real_val_rows, bench.vocab.size)
    models[f"corrupted corpus {CORPUS_NOISE:.2f}"] = (CORPUS_NOISE, train_model(bench, "corrupted corpus", batch_fn,
                                                                                bench.vocab.size)[0])
    results, noisy_losses = {}, {}
    for name, (rate, model) in models.items():
        noisy_losses[name] = window_losses(model, noisy_x, y, bench.device).mean(1)  # (N,)
        results[name] = {"train_noise": rate, "clean_inputs": summary(window_losses(model, x, y, bench.device)),
                         "noisy_inputs": summary(noisy_losses[name][:, None])}
    base = noisy_losses["clean training (baseline)"]
    for name in results:  # paired differences on the same windows: their spread is far below the loss spread
        difference = base - noisy_losses[name]
        results[name]["noisy_gain_over_baseline"] = difference.mean().item()
        results[name]["noisy_gain_stderr"] = (difference.std() / math.sqrt(len(difference))).item()

    injected = [n for n in results if not n.startswith("corrupted")]  # the baseline (rate 0) and the injections
    best = max(injected[1:], key=lambda n: results[n]["noisy_gain_over_baseline"])
    fig, axes = panels(1, 1, width=7.5, height=4.5,
                       title=f"With {EVAL_NOISE:.0%} of the inputs corrupted, the best noise-injected model is "
                             f"{results[best]['noisy_gain_over_baseline']:+.3f} nats better than clean training")
    rates = [results[n]["train_noise"] for n in injected]
    line(axes[0], rates, {"clean validation inputs": [results[n]["clean_inputs"]["loss"] for n in injected],
                          f"{EVAL_NOISE:.0%} of validation inputs substituted": [results[n]["noisy_inputs"]["loss"]
                                                                                for n in injected]},
         xlabel="substitution rate of the training inputs (targets kept clean)", ylabel="validation loss (nats / char)",
         title="noise injection (lines) and a corrupted corpus (crosses), same steps")
    corrupted = results[f"corrupted corpus {CORPUS_NOISE:.2f}"]
    axes[0].plot([CORPUS_NOISE], [corrupted["clean_inputs"]["loss"]], "x", color="C0", markersize=9,
                 label=f"corrupted corpus {CORPUS_NOISE:.0%} (inputs and targets), clean inputs")
    axes[0].plot([CORPUS_NOISE], [corrupted["noisy_inputs"]["loss"]], "x", color="C1", markersize=9,
                 label=f"corrupted corpus {CORPUS_NOISE:.0%}, noisy inputs")
    axes[0].legend(fontsize=7)
    run.save(fig, "noise")
    return {"eval_noise": EVAL_NOISE, "models": results, "best_injection": best}


# ---------------------------------------------------------------------------------------------- verdicts
def verdicts(floor: dict, mix: dict, dup: dict, noisy: dict, ratios) -> dict:
    """Each claim decided against the threshold named in its rule."""
    runs = mix["runs"]
    real_only = runs[f"synthetic share {ratios[0]:.2f}"]["real_val"]["loss"]
    synthetic_only = runs[f"synthetic share {ratios[-1]:.2f}"]["real_val"]["loss"]
    matching_mixes = [r for r in ratios[1:] if runs[f"synthetic share {r:.2f}"]["real_val"]["loss"] <= real_only + MATCH_TOLERANCE]
    ceiling = mix["chain_loss_on_real_val"][2]
    reference = mix["lab_reference"]
    # real training for longer goes below what the synthetic source holds (its own loss on real text)
    longer_beats_source = reference is not None and reference["final_val_loss"] < ceiling - MATCH_TOLERANCE
    if synthetic_only <= real_only + MATCH_TOLERANCE:
        synthetic_verdict = "depends" if longer_beats_source else "holds"
    elif matching_mixes:
        synthetic_verdict = "depends"
    else:
        synthetic_verdict = "fails"
    raw, near, exact = dup["raw"], dup["cleaned"]["near dedup (MinHash + LSH)"], dup["cleaned"]["exact dedup"]
    dedup_holds = near["gap"] <= DEDUP_GAP_RATIO * raw["gap"] and near["held_out"]["loss"] < raw["held_out"]["loss"]
    best = noisy["models"][noisy["best_injection"]]
    noise_helps = best["noisy_gain_over_baseline"] > ROBUSTNESS_SIGMAS * best["noisy_gain_stderr"]
    return {
        "synthetic_can_match_real": {
            "verdict": synthetic_verdict,
            "rule": f"holds if synthetic-only real-val loss <= real-only + {MATCH_TOLERANCE} and longer real training "
                    f"(04's reference) does not beat the synthetic source's own loss on real text by more than that; "
                    f"depends if only one of the two, or only some mixes, are within it; fails otherwise",
            "lab_reference": reference, "longer_real_training_beats_source": longer_beats_source,
            "real_only": real_only, "synthetic_only": synthetic_only, "mixes_within_tolerance": matching_mixes,
            "order2_chain_loss_on_real_val": ceiling,
            "real_only_below_chain_ceiling": real_only < ceiling},
        "noise_injection_helps_robustness": {
            "verdict": "holds" if noise_helps else "fails",
            "rule": f"holds if the best noise-injected model lowers the loss on {EVAL_NOISE:.0%}-corrupted inputs by "
                    f"more than {ROBUSTNESS_SIGMAS} paired standard errors",
            "best": noisy["best_injection"], "gain": best["noisy_gain_over_baseline"],
            "gain_stderr": best["noisy_gain_stderr"],
            "clean_cost": best["clean_inputs"]["loss"] - noisy["models"]["clean training (baseline)"]["clean_inputs"]["loss"]},
        "deduplication_prevents_overfitting": {
            "verdict": "holds" if dedup_holds else "fails",
            "rule": f"holds if near dedup cuts the train/held-out gap to <= {DEDUP_GAP_RATIO} x the raw gap and lowers "
                    f"the held-out loss",
            "raw_gap": raw["gap"], "near_dedup_gap": near["gap"], "exact_dedup_gap": exact["gap"],
            "raw_held_out": raw["held_out"]["loss"], "near_dedup_held_out": near["held_out"]["loss"],
            "exact_dedup_held_out": exact["held_out"]["loss"]},
        "loss_reaches_entropy_floor": {
            "verdict": "holds" if 0 <= floor["excess_over_floor"] + 3 * floor["model_loss_stderr"]
            and floor["excess_over_floor"] <= FLOOR_TOLERANCE else "fails",
            "rule": f"holds if the final loss is within {FLOOR_TOLERANCE} nats above H and not below it by more "
                    f"than 3 standard errors",
            "excess": floor["excess_over_floor"], "stderr": floor["model_loss_stderr"]},
    }


# ---------------------------------------------------------------------------------------------- main
def main():
    args = demo_parser(__doc__).parse_args()
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if run.quick else "full"]
    text, corpus = load_corpus("auto")
    vocab = CharVocab(text)
    real_train, real_val = train_val_split(vocab.encode(text), val_fraction=0.1)
    bench = Bench(sizes, run.device, run.seed, vocab, corpus, text[: len(real_train)], real_train, real_val,
                  torch.Generator())

    print("\n1. entropy floor: the lab model on a Markov chain")
    floor = entropy_floor(run, bench)
    print(f"\n2. real vs synthetic ({corpus}, vocabulary {vocab.size})")
    mix, baseline_model, eval_real = real_vs_synthetic(run, bench)
    print("\n3. MinHash and LSH against their formulas")
    lsh = minhash_lsh(run, bench)
    print("\n4. duplicated data and dedup")
    dup = duplicates(run, bench, eval_real)
    print("\n5. noise")
    noisy = noise(run, bench, baseline_model, eval_real)

    print_table([{"training data": name, "real val loss": r["real_val"]["loss"], "+-": r["real_val"]["stderr"],
                  "synthetic val loss": r.get("synthetic_val", {}).get("loss", "-")} for name, r in mix["runs"].items()],
                title=f"Real vs synthetic: losses after {sizes['steps']} steps (nats/char)")
    print_table([{"corpus": name, "docs": r["documents"], "held-out": r["held_out"]["loss"],
                  "own corpus": r["train_corpus"]["loss"], "repeated docs": r["repeated_docs"]["loss"], "gap": r["gap"]}
                 for name, r in [*((f"fraction {f:.2f}", r) for f, r in dup["sweep"].items()), *dup["cleaned"].items()]],
                title="Duplicated data (nats/char)")
    print_table([{"model": name, "train noise": r["train_noise"], "clean inputs": r["clean_inputs"]["loss"],
                  "noisy inputs": r["noisy_inputs"]["loss"], "gain": r["noisy_gain_over_baseline"],
                  "+-": r["noisy_gain_stderr"]} for name, r in noisy["models"].items()],
                title=f"Noise: validation loss with clean inputs and with {EVAL_NOISE:.0%} substituted (nats/char)")

    decided = verdicts(floor, mix, dup, noisy, sizes["ratios"])
    d = dup["detection"]
    print("\nKey insights")
    print(f"- Entropy floor: the chain's H = {floor['entropy_rate']:.4f} nats (formula); its own loss on the "
          f"evaluation windows {floor['chain_nll_on_eval_windows']:.4f} (Monte Carlo). The lab model reaches "
          f"{floor['model_loss_with_full_context']:.4f} +- {floor['model_loss_stderr']:.4f} after {floor['steps']} steps, "
          f"{floor['excess_over_floor']:+.4f} above the floor (levels on the way: symbol frequencies "
          f"{floor['unigram_entropy']:.3f}, one symbol of context {floor['order1_entropy']:.3f}).")
    v = decided["synthetic_can_match_real"]
    print(f"- Real vs synthetic: on real validation text real-only {v['real_only']:.3f}, synthetic-only (order-2 "
          f"chain fitted to the corpus) {v['synthetic_only']:.3f}; the chain itself scores {v['order2_chain_loss_on_real_val']:.3f}, "
          f"the level that training on its text approaches in the limit. Mixes within {MATCH_TOLERANCE} of "
          f"real-only: {v['mixes_within_tolerance']}.")
    print(f"- MinHash: mean |error| {lsh['mean_abs_error_in_binomial_std']:.2f} binomial standard deviations, "
          f"{lsh['fraction_within_2_std']:.0%} within 2; LSH measured vs formula, largest gap per bin "
          + ", ".join(f"{n} {c['max_abs_gap']:.2f}" for n, c in lsh["lsh"].items()) + ".")
    print(f"- Dedup found the planted copies with recall {d['recall']:.3f} and precision {d['precision']:.3f} among "
          f"{d['documents']} documents in {d['seconds']:.1f} s; exact dedup keeps the noisy copies.")
    v = decided["deduplication_prevents_overfitting"]
    print(f"- Duplicates: gap raw {v['raw_gap']:.3f}, exact dedup {v['exact_dedup_gap']:.3f}, near dedup "
          f"{v['near_dedup_gap']:.3f} nats; held-out {v['raw_held_out']:.3f} / {v['exact_dedup_held_out']:.3f} / "
          f"{v['near_dedup_held_out']:.3f}.")
    leaks = dup["split_leaks"]
    print(f"- Splits: exact copies in another split than their source: hash split {leaks['exact_copies_split_from_source_hash']:.0%}, "
          f"random split {leaks['exact_copies_split_from_source_random']:.0%}; near copies under the hash split "
          f"{leaks['near_copies_split_from_source_hash']:.0%} (dedup before splitting).")
    v = decided["noise_injection_helps_robustness"]
    print(f"- Noise: {v['best']} changes the loss on corrupted inputs by {v['gain']:+.3f} +- {v['gain_stderr']:.3f} "
          f"and on clean inputs by {v['clean_cost']:+.3f} nats.")
    print("\nVerdicts")
    for claim, verdict in decided.items():
        print(f"- {claim}: {verdict['verdict']}  ({verdict['rule']})")
    run.finish({"sizes": sizes, "corpus": corpus, "context": CONTEXT, "entropy_floor": floor, "real_vs_synthetic": mix,
                "minhash_lsh": lsh, "duplicates": dup, "noise": noisy, "verdicts": decided})


if __name__ == "__main__":
    main()
