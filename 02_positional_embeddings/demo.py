"""02 — Positional embeddings: what each encoding looks like, and which ones extrapolate.

Experiments:
  1. encoding_heatmaps: the sinusoidal table, its position-position similarity, the RoPE score of one
     query/key pair over all position pairs, and the ALiBi bias of the lab model's heads.
  2. similarity_vs_distance: how the sinusoidal similarity, the RoPE score and the ALiBi bias change
     with the distance between two positions.
  3. extrapolation: the lab model (04's MiniFormer) trained with each encoding (learned, sinusoidal,
     rope, alibi, none) at one context length, then evaluated on validation windows 1x, 2x, 4x, 8x
     as long. The learned table is sized for 8x but only its first 1x rows are ever trained.
  4. learned_table: what the learned model's table looks like in the rows it trained and the rows it did not.
  5. bias_instead_of_vectors: which encodings change the input vectors, and which only the attention scores.
  6. break_it: three would-be repairs beside their baselines: the learned table clamped to its last
     trained row, RoPE with base 100, and a sinusoid scaled down to the size of the token embeddings.
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import numpy as np
import torch
import torch.nn.functional as F

from demo_cli import demo_parser, print_table, report_findings, start_demo
from plotting import bar, heatmap, line, panels
from positional_embeddings import alibi_bias, alibi_slopes, apply_rope, sinusoidal_encoding
from runtime import Timer
from lab import char_shakespeare_data, lab_model_config, short_schedule, train_lab_variant, unigram_loss
from transformer import MiniFormer

ENCODINGS = ("learned", "sinusoidal", "rope", "alibi", "none")
LENGTH_FACTORS = (1, 2, 4, 8)
COLORS = {"learned": "tab:red", "sinusoidal": "tab:orange", "rope": "tab:blue", "alibi": "tab:green",
          "none": "tab:gray"}
# Quick and full runs differ in these sizes only (model: overrides of 04's lab model).
SIZES = {
    "quick": dict(train_length=64, steps=30, batch_size=8, model=dict(num_layers=2, embed_dim=64),
                  eval_tokens=1024, position_bin=32),
    "full": dict(train_length=64, steps=600, batch_size=12, model=dict(), eval_tokens=32768, position_bin=16),
}
# Thresholds of the verdicts, each written beside the claim it decides.
EXTRAPOLATES_RATIO = 1.10  # "extrapolates": loss at 8x the training length within 10% of the loss at 1x ...
LEARNED_MARGIN = 0.1  # ... of a model that learned: its 1x loss at least 0.1 nats below the unigram loss
DISTANCE_ONLY_TOLERANCE = 1e-5  # "depends on m - n only": largest deviation from a constant-diagonal matrix
SAME_INPUT_TOLERANCE = 1e-6  # "adds no vector": input vectors of one repeated token equal at every position


# ---------------------------------------------------------------------------------------------- 1
def encoding_heatmaps(run, embed_dim: int, num_heads: int, num_positions: int = 128) -> dict:
    """Draw the encodings themselves; measure that the similarities depend on the distance only."""
    table = sinusoidal_encoding(num_positions, embed_dim)  # (P, E)
    similarity = table @ table.T / embed_dim * 2  # (P, P); 1 on the diagonal (each pair has sin^2 + cos^2 = 1)
    head_dim = embed_dim // num_heads
    generator = torch.Generator().manual_seed(run.seed)
    vector = torch.randn(head_dim, generator=generator, dtype=torch.float64)
    vector = vector / vector.norm()
    rotated = apply_rope(vector.expand(num_positions, head_dim))  # (P, D): the same vector at every position
    rope_scores = rotated @ rotated.T  # (P, P): q_m . k_n with q = k
    bias = alibi_bias(num_heads, num_positions, num_positions)  # (H, P, P)
    causal = torch.ones(num_positions, num_positions, dtype=torch.bool).tril()

    def toeplitz_deviation(matrix):
        """Largest gap between an entry (m, n) and the entry (m - n, 0) or (0, n - m) of the same distance."""
        m, n = torch.meshgrid(torch.arange(num_positions), torch.arange(num_positions), indexing="ij")
        reference = torch.where(m >= n, matrix[(m - n), 0], matrix[0, (n - m)])
        return (matrix - reference).abs().max().item()

    deviations = {"sinusoidal": toeplitz_deviation(similarity), "rope": toeplitz_deviation(rope_scores),
                  "alibi": max(toeplitz_deviation(b) for b in bias)}
    fig, axes = panels(2, 2, width=5.2, height=4.2,
                       title="Largest deviation of each matrix from a function of m - n only: "
                             + ", ".join(f"{k} {v:.0e}" for k, v in deviations.items()))
    heatmap(axes[0], table.numpy(), xlabel="feature (even = sin, odd = cos)", ylabel="position",
            title=f"sinusoidal table, {num_positions} positions x {embed_dim} dims",
            cmap="RdBu_r", colorbar_label="value", vmin=-1, vmax=1)
    heatmap(axes[1], similarity.numpy(), xlabel="position n", ylabel="position m",
            title="sinusoidal PE[m] . PE[n] / (E/2)", cmap="viridis",
            colorbar_label="similarity")
    heatmap(axes[2], rope_scores.numpy(), xlabel="key position n", ylabel="query position m",
            title=f"RoPE q_m . k_n, one unit vector q = k, D = {head_dim}", cmap="viridis",
            colorbar_label="score")
    heatmap(axes[3], bias[0].masked_fill(~causal, float("nan")).numpy(), xlabel="key position n",
            ylabel="query position m",
            title=f"ALiBi bias, head 1 (slope {alibi_slopes(num_heads)[0]:.3g}), future masked",
            cmap="magma", colorbar_label="added to the score")
    fig.subplots_adjust(wspace=0.45, hspace=0.35)
    run.save(fig, "encoding_heatmaps")
    insights = ["Sinusoidal similarity, RoPE score and ALiBi bias depend on the distance only: largest deviation "
                "from a constant-diagonal matrix " + ", ".join(f"{k} {v:.1e}" for k, v in deviations.items())
                + " (sinusoidal and ALiBi in float32, RoPE in float64)."]
    verdicts = {"fixed_schemes_see_distance_only": {
        "claim": "sinusoidal similarity, RoPE score and ALiBi bias are functions of m - n only",
        "threshold": f"largest deviation from a constant-diagonal matrix <= {DISTANCE_ONLY_TOLERANCE:g}",
        "measured": ", ".join(f"{k} {v:.1e}" for k, v in deviations.items()),
        "verdict": "holds" if max(deviations.values()) <= DISTANCE_ONLY_TOLERANCE else "fails"}}
    return {"sinusoidal_similarity_toeplitz_max_deviation": deviations["sinusoidal"],
            "rope_score_toeplitz_max_deviation": deviations["rope"],
            "alibi_bias_toeplitz_max_deviation": deviations["alibi"], "insights": insights, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- 2
def similarity_vs_distance(run, embed_dim: int, num_heads: int, max_distance: int, train_length: int,
                           num_vectors: int = 256) -> dict:
    """Sinusoidal cosine similarity, RoPE score and ALiBi bias as functions of the distance k."""
    distances = torch.arange(max_distance + 1)
    table = sinusoidal_encoding(max_distance + 1, embed_dim).double()
    sinusoidal_cosine = (table @ table[0]) / (table.norm(dim=1) * table[0].norm())  # (K,)
    head_dim = embed_dim // num_heads
    generator = torch.Generator().manual_seed(run.seed)
    vectors = torch.randn(num_vectors, 1, head_dim, generator=generator, dtype=torch.float64)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True)  # (N, 1, D) unit vectors
    rope_scores = {}
    for base in (10000.0, 100.0):
        at_zero = apply_rope(vectors, base=base)  # (N, 1, D): position 0
        at_k = apply_rope(vectors.expand(-1, max_distance + 1, -1), base=base)  # (N, K, D): positions 0..K-1
        rope_scores[base] = (at_k * at_zero).sum(-1)  # (N, K): q . k with q = k, at distance k
    slopes = alibi_slopes(num_heads)
    bias = alibi_bias(num_heads, 1, max_distance + 1)[:, 0].flip(-1)  # (H, K): bias at distance 0..K-1

    fig, axes = panels(1, 3, width=5.0, height=3.9, constrained=True,
                       title=f"From distance 1 to {max_distance}: sinusoidal cosine {sinusoidal_cosine[1]:.2f} -> "
                             f"{sinusoidal_cosine[max_distance]:.2f}, mean RoPE score {rope_scores[10000.0][:, 1].mean():.2f}"
                             f" -> {rope_scores[10000.0][:, max_distance].mean():.2f}, ALiBi bias {bias[:, 1].min():.2f}"
                             f" -> {bias[:, max_distance].min():.0f} (steepest head)")
    line(axes[0], distances, {"sinusoidal cos(PE[p], PE[p + k])": sinusoidal_cosine.numpy()},
         xlabel="distance k (positions)", ylabel="cosine similarity", markers=False,
         title=f"sinusoidal, dim {embed_dim}")
    for index, (base, scores) in enumerate(rope_scores.items()):
        mean, std = scores.mean(0).numpy(), scores.std(0).numpy()
        color = f"C{index}"
        axes[1].plot(distances, mean, color=color, label=f"base {base:g}: mean over {num_vectors} q = k")
        axes[1].fill_between(distances, mean - std, mean + std, color=color, alpha=0.2, label=f"base {base:g}: +- 1 std")
    axes[1].set(xlabel="distance k (positions)", ylabel="q . k after RoPE (unit vectors)",
                title=f"RoPE, head dim {head_dim}")
    axes[1].legend()
    line(axes[2], distances, {f"head {h + 1}, slope {s:.3g}": bias[h].numpy() for h, s in enumerate(slopes.tolist())},
         xlabel="distance k (positions)", ylabel="bias added to the score", markers=False,
         title=f"ALiBi, {num_heads} heads (output of alibi_bias)")
    for ax in axes:
        _mark_training_length(ax, train_length)
    run.save(fig, "similarity_vs_distance")
    at = [1, train_length, max_distance]
    result = {"distances": at,
              "sinusoidal_cosine": [sinusoidal_cosine[k].item() for k in at],
              "rope_mean_score_base_10000": [rope_scores[10000.0][:, k].mean().item() for k in at],
              "rope_mean_score_base_100": [rope_scores[100.0][:, k].mean().item() for k in at],
              "alibi_slopes": slopes.tolist(),
              "alibi_bias_at_max_distance": bias[:, max_distance].tolist()}
    result["insights"] = [
        f"At distance {max_distance} ALiBi adds " + ", ".join(f"{b:.1f}" for b in result["alibi_bias_at_max_distance"])
        + f" to the scores of its {num_heads} heads: the steep heads are forced to look locally. The mean RoPE score "
        f"of a unit vector with itself falls from {result['rope_mean_score_base_10000'][0]:.3f} at distance 1 to "
        f"{result['rope_mean_score_base_10000'][1]:.3f} at {train_length} and "
        f"{result['rope_mean_score_base_10000'][2]:.3f} at {max_distance} (base 10000; base 100: "
        + ", ".join(f"{v:.3f}" for v in result["rope_mean_score_base_100"]) + ")."]
    return result


# ---------------------------------------------------------------------------------------------- 3
def validation_windows(run, lengths: list, eval_tokens: int) -> dict:
    """{length: (x, y)}: about eval_tokens validation targets per length, drawn once with a fixed seed; the same
    windows for every model."""
    return {length: char_shakespeare_data(length, max(1, eval_tokens // length), run.device,
                                          seed=run.seed + length).batch_fn("val")
            for length in lengths}


@torch.no_grad()
def loss_per_position(model, x, y) -> torch.Tensor:
    """Mean cross-entropy at each position of the windows: (T,)."""
    model.eval()
    logits = model(x)  # (B, T, V)
    losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
    return losses.mean(0).cpu()


def evaluate_lengths(model, windows: dict, train_length: int) -> dict:
    """Validation loss of a trained model at every evaluation length, and position by position at the longest."""
    lengths = list(windows)
    per_position = {length: loss_per_position(model, *windows[length]) for length in lengths}
    losses = [per_position[length].mean().item() for length in lengths]
    longest = per_position[lengths[-1]]
    return {"val_loss": losses,
            "loss_ratio_to_1x": [loss / losses[0] for loss in losses],
            "longest_loss_inside_train_length": longest[:train_length].mean().item(),
            "longest_loss_beyond_train_length": longest[train_length:].mean().item(),
            "longest_loss_per_position": longest}


def train_and_evaluate(run, data, windows: dict, sizes: dict, label: str, prepare=None, **config_overrides):
    """Train the lab model (04's train_lab_variant: same seed, same batches for every variant) at the training
    length, then evaluate it at every length. `prepare(model)` edits the fresh model before training (break_it).

    context_length = the longest evaluation: it sizes the learned table (8x rows, only the first 1x ever trained)
    and the sinusoidal buffer; RoPE, ALiBi and none have no table at all.
    """
    steps = sizes["steps"]
    with Timer(run.device) as timer:
        model, history = train_lab_variant(data, short_schedule(steps), run.seed, run.device, prepare=prepare,
                                           context_length=list(windows)[-1], **sizes["model"], **config_overrides)
    result = {**evaluate_lengths(model, windows, sizes["train_length"]), "train_seconds": timer.seconds,
              "tokens_per_second": history.tokens_per_second, "diverged": history.diverged,
              "val_loss_during_training": history.final_val_loss}
    print(f"  {label:24s} {steps} steps in {timer.seconds:5.1f} s; val loss at "
          + ", ".join(f"{L}: {v:.3f}" for L, v in zip(windows, result["val_loss"])))
    return result, model


def extrapolation(run, data, windows: dict, sizes: dict, unigram: float) -> tuple[dict, dict]:
    """Train the lab model once per encoding at the training length; evaluate at 1x, 2x, 4x, 8x that length.

    A flat loss says nothing about extrapolation when the model learned nothing (a unigram guesser is flat at
    every length): 'extrapolates' needs a 1x loss at least LEARNED_MARGIN below the unigram loss."""
    train_length = sizes["train_length"]
    results, models = {}, {}
    for position in ENCODINGS:
        results[position], models[position] = train_and_evaluate(run, data, windows, sizes, position,
                                                                 position=position)

    ratios = {p: r["loss_ratio_to_1x"][-1] for p, r in results.items()}
    title = "Loss at 8x the training length / loss at 1x: " + ", ".join(
        f"{p} {ratios[p]:.2f}" for p in sorted(ratios, key=ratios.get))
    fig, axes = panels(1, 2, width=6.2, height=4.4, title=title)
    styles = {p: {"color": COLORS[p]} for p in ENCODINGS}
    lengths = list(windows)
    line(axes[0], lengths, {p: r["val_loss"] for p, r in results.items()}, styles=styles, logx=True,
         xlabel="evaluation window length (tokens, log scale)", ylabel="validation loss (nats / char)",
         title=f"mean loss over whole windows; all trained at {train_length}")
    axes[0].set_xticks(lengths, [f"{L}\n({L // train_length}x)" for L in lengths])
    axes[0].minorticks_off()
    bin_size = sizes["position_bin"]
    bin_centres = np.arange(lengths[-1] // bin_size) * bin_size + bin_size / 2
    binned = {p: r["longest_loss_per_position"].reshape(-1, bin_size).mean(1).numpy() for p, r in results.items()}
    line(axes[1], bin_centres, binned, styles=styles, markers=False,
         xlabel=f"token position in a {lengths[-1]}-token window ({bin_size}-position bins)",
         ylabel="validation loss (nats / char)", title="position by position: where the loss goes up")
    _mark_training_length(axes[1], train_length)
    run.save(fig, "extrapolation")

    inside = {p: r["longest_loss_inside_train_length"] for p, r in results.items()}
    beyond = {p: r["longest_loss_beyond_train_length"] for p, r in results.items()}
    at_1x = {p: r["val_loss"][0] for p, r in results.items()}
    best_1x = min(at_1x, key=at_1x.get)
    learned = {p: loss <= unigram - LEARNED_MARGIN for p, loss in at_1x.items()}
    extrapolates = {p: ratio <= EXTRAPOLATES_RATIO and learned[p] for p, ratio in ratios.items()}
    insights = [
        f"Loss at {lengths[-1]} tokens (8x) / loss at {lengths[0]}: "
        + ", ".join(f"{p} {ratios[p]:.2f}" for p in sorted(ratios, key=ratios.get)) + ".",
        f"In {lengths[-1]}-token windows, mean loss at positions >= {train_length} vs < {train_length}: "
        + ", ".join(f"{p} {beyond[p]:.2f} vs {inside[p]:.2f}" for p in ENCODINGS) + " nats/char.",
        f"Loss at the training length ({lengths[0]}): " + ", ".join(
            f"{p} {at_1x[p]:.3f}" for p in sorted(at_1x, key=at_1x.get)) + f" (unigram loss {unigram:.3f}); NoPE is "
        f"{at_1x['none'] - at_1x[best_1x]:.2f} nats behind the best ({best_1x})"
        + ("." if all(learned.values()) else f"; not {LEARNED_MARGIN} nats below the unigram loss, i.e. learned "
           "(almost) nothing from the context: " + ", ".join(p for p in learned if not learned[p]) + "."),
    ]

    def extrapolation_verdict(claim, position, holds):
        return {"claim": claim, "threshold": f"'extrapolates': loss at 8x within {EXTRAPOLATES_RATIO - 1:.0%} of 1x, "
                                             f"and the 1x loss >= {LEARNED_MARGIN} nats below unigram ({unigram:.3f})",
                "measured": f"8x/1x {ratios[position]:.2f} ({at_1x[position]:.3f} -> {results[position]['val_loss'][-1]:.3f})",
                "verdict": "holds" if holds else "fails"}

    published = (not extrapolates["sinusoidal"] and ratios["sinusoidal"] > ratios["rope"] > ratios["alibi"]
                 and extrapolates["alibi"])
    verdicts = {
        "sinusoidal_extrapolates_well": extrapolation_verdict("sinusoidal extrapolates well", "sinusoidal",
                                                              extrapolates["sinusoidal"]),
        "learned_extrapolates_poorly": extrapolation_verdict("learned extrapolates poorly", "learned",
                                                             not extrapolates["learned"]),
        "rope_suits_long_contexts": {
            "claim": "RoPE suits long contexts",
            "threshold": f"holds: extrapolates (8x within {EXTRAPOLATES_RATIO - 1:.0%} of 1x, having learned); depends: it does not, "
                         f"but has the lowest loss of all encodings at the training length; fails: neither",
            "measured": f"8x/1x {ratios['rope']:.2f}; loss at 1x {at_1x['rope']:.3f} (lowest: {best_1x} "
                        f"{at_1x[best_1x]:.3f})",
            "verdict": ("holds" if extrapolates["rope"] else "depends" if best_1x == "rope" else "fails")},
        "published_picture": {
            "claim": "the ALiBi paper's picture: sinusoidal explodes, rotary degrades, ALiBi stays flat",
            "threshold": f"8x/1x: sinusoidal above {EXTRAPOLATES_RATIO:.2f}, rope between sinusoidal and alibi, alibi "
                         f"at most {EXTRAPOLATES_RATIO:.2f}",
            "measured": f"sinusoidal {ratios['sinusoidal']:.2f}, rope {ratios['rope']:.2f}, alibi {ratios['alibi']:.2f}",
            "verdict": "holds" if published else "fails"},
    }
    return {"encodings": results, "unigram_val_loss": unigram, "insights": insights, "verdicts": verdicts}, models


def _mark_training_length(ax, train_length: int) -> None:
    """A dotted vertical line at the training length, named in the legend (a text label could hide behind it)."""
    ax.axvline(train_length, color="black", linestyle=":", linewidth=1, label=f"training length ({train_length})")
    ax.legend()


# ---------------------------------------------------------------------------------------------- 4
def learned_table(run, model, train_length: int) -> dict:
    """The learned table after training: rows < train_length were trained, the rest kept their random init."""
    table = model.position_embedding.weight.detach().float().cpu()  # (8x, E)
    unit = table / table.norm(dim=1, keepdim=True)
    cosine = unit @ unit.T  # (P, P)
    norms = table.norm(dim=1)  # (P,)
    neighbour = cosine.diagonal(1)  # (P - 1,): cos(W[p], W[p + 1])
    numbers = {"mean_row_norm_trained": norms[:train_length].mean().item(),
               "mean_row_norm_untrained": norms[train_length:].mean().item(),
               "mean_neighbour_cosine_trained": neighbour[: train_length - 1].mean().item(),
               "mean_neighbour_cosine_untrained": neighbour[train_length:].mean().item()}
    shown = 2 * train_length
    fig, axes = panels(1, 2, width=5.6, height=4.3,
                       title=f"Learned table: rows 0-{train_length - 1} trained (neighbour cosine "
                             f"{numbers['mean_neighbour_cosine_trained']:.2f}), rows {train_length}+ untouched "
                             f"({numbers['mean_neighbour_cosine_untrained']:.2f})")
    heatmap(axes[0], cosine[:shown, :shown].numpy(), xlabel="position n", ylabel="position m", cmap="RdBu_r",
            vmin=-1, vmax=1, title=f"cosine similarity of rows 0-{shown - 1}", colorbar_label="cos(W[m], W[n])")
    line(axes[1], np.arange(len(norms)), {"row norm ||W[p]||": norms.numpy()}, markers=False,
         xlabel="position p", ylabel="norm of the position vector", title=f"all {len(norms)} rows of the table")
    _mark_training_length(axes[1], train_length)
    fig.subplots_adjust(wspace=0.45)
    run.save(fig, "learned_table")
    numbers["insights"] = [
        f"The learned table learns only the rows it is shown: rows >= {train_length} never get a gradient "
        f"(neighbour cosine {numbers['mean_neighbour_cosine_untrained']:.3f}, mean norm "
        f"{numbers['mean_row_norm_untrained']:.2f}) while the trained rows organise (neighbour cosine "
        f"{numbers['mean_neighbour_cosine_trained']:.2f}, mean norm {numbers['mean_row_norm_trained']:.2f})."]
    return numbers


# ---------------------------------------------------------------------------------------------- 5
@torch.no_grad()
def bias_instead_of_vectors(run, models: dict, length: int) -> dict:
    """Feed one token repeated `length` times: how much does the model's input vector differ between positions?

    Learned and sinusoidal add a vector, so the input differs per position. RoPE, ALiBi and none leave the
    input untouched (RoPE rotates q and k inside attention, ALiBi adds to the scores).
    """
    rows = {}
    for position, model in models.items():
        idx = torch.zeros(1, length, dtype=torch.long, device=run.device)
        _, hidden = model.forward_with_hidden(idx)
        first_input = hidden[0][0]  # (T, E): the embedding layer's output, before any block
        token_norm = model.token_embedding.weight.norm(dim=1).mean().item()
        rows[position] = {
            "input_spread_across_positions": (first_input - first_input[:1]).norm(dim=-1).max().item(),
            "mean_token_embedding_norm": token_norm,
            "position_parameters": sum(p.numel() for name, p in model.named_parameters() if name.startswith("position")),
        }
    fig, axes = panels(1, 2, width=5.0, height=3.6,
                       title="Largest change of the input vector across positions: " + ", ".join(
                           f"{p} {r['input_spread_across_positions']:.2g}" for p, r in rows.items()))
    bar(axes[0], list(rows), [r["input_spread_across_positions"] for r in rows.values()],
        ylabel="max ||x_p - x_0|| (one repeated token)", title=f"input vectors over {length} positions",
        color=[COLORS[p] for p in rows])
    bar(axes[1], list(rows), [r["position_parameters"] for r in rows.values()], annotate_fmt="{:,.0f}",
        ylabel="trainable position parameters", title="parameters spent on position", color=[COLORS[p] for p in rows])
    run.save(fig, "bias_instead_of_vectors")
    alibi, learned, sinusoidal = rows["alibi"], rows["learned"], rows["sinusoidal"]
    insights = [
        f"ALiBi adds a bias instead of vectors: the input vectors of one token repeated {length} times differ by at "
        f"most {alibi['input_spread_across_positions']:.2g} across positions, with {alibi['position_parameters']} "
        f"position parameters (learned: {learned['input_spread_across_positions']:.2f} and "
        f"{learned['position_parameters']:,}; sinusoidal: {sinusoidal['input_spread_across_positions']:.2f} against "
        f"token vectors of norm {sinusoidal['mean_token_embedding_norm']:.2f})."]
    verdicts = {"alibi_bias_not_vectors": {
        "claim": "ALiBi adds a bias instead of vectors",
        "threshold": f"no position parameters and input vectors of a repeated token equal at every position "
                     f"(max ||x_p - x_0|| <= {SAME_INPUT_TOLERANCE:g})",
        "measured": f"{alibi['position_parameters']} parameters, spread {alibi['input_spread_across_positions']:.2g}",
        "verdict": ("holds" if alibi["position_parameters"] == 0
                    and alibi["input_spread_across_positions"] <= SAME_INPUT_TOLERANCE else "fails")}}
    return {"encodings": rows, "insights": insights, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- 6
@torch.no_grad()
def clamp_learned_table(model, train_length: int):
    """Explicit clamp: every position >= train_length reuses the last trained row (in place)."""
    table = model.position_embedding.weight
    table[train_length:] = table[train_length - 1]
    return model


@torch.no_grad()
def match_sinusoid_to_token_scale(model):
    """Scale the sinusoidal table (in place) so its per-feature RMS equals the token embeddings' init std.

    The table's entries have RMS sqrt(1/2) ~ 0.71, GPT-2-initialised token vectors have std 0.02: unscaled,
    the position signal is ~35x louder than the token signal it is added to. The table is sized for the
    longest evaluation, so the model never falls back to recomputing the unscaled formula.
    """
    table = model.sinusoidal_table
    table.mul_(model.token_embedding.weight.std() / table.pow(2).mean().sqrt())
    return model


def break_it(run, data, windows: dict, sizes: dict, baselines: dict, learned_model) -> dict:
    """Three repairs that sound plausible, measured against their baselines: clamp the learned table to its
    last trained row; RoPE with a much smaller base; a sinusoid as quiet as the token embeddings."""
    train_length = sizes["train_length"]
    lengths = list(windows)
    variants = {"learned, clamped": evaluate_lengths(clamp_learned_table(learned_model, train_length), windows,
                                                     train_length)}
    variants["rope, base 100"], _ = train_and_evaluate(run, data, windows, sizes, "rope, base 100", position="rope",
                                                       rope_base=100.0)
    variants["sinusoidal, token scale"], _ = train_and_evaluate(run, data, windows, sizes, "sinusoidal, token scale",
                                                                prepare=match_sinusoid_to_token_scale,
                                                                position="sinusoidal")
    short_table = MiniFormer(lab_model_config(data.vocab.size, position="learned", context_length=train_length))
    try:
        short_table(windows[lengths[1]][0][:1].cpu())
        error = "no error"
    except ValueError as raised:
        error = str(raised)
    pairs = {"learned": ("learned (untrained rows)", "learned, clamped"),
             "rope": ("rope, base 10000", "rope, base 100"),
             "sinusoidal": ("sinusoidal (amplitude 1)", "sinusoidal, token scale")}
    series, styles, ratio = {}, {}, {}
    for baseline, (baseline_name, variant_name) in pairs.items():
        for name, values, style in ((baseline_name, baselines[baseline]["val_loss"], {}),
                                    (variant_name, variants[variant_name]["val_loss"], {"linestyle": "--", "marker": "s"})):
            ratio[name] = values[-1] / values[0]
            series[f"{name} (8x/1x {ratio[name]:.2f})"] = values
            styles[f"{name} (8x/1x {ratio[name]:.2f})"] = {"color": COLORS[baseline], **style}
    title = "; ".join(f"{variant}: 8x/1x {ratio[base]:.2f} -> {ratio[variant]:.2f}" for base, variant in pairs.values())
    fig, axes = panels(1, 1, width=7.5, height=4.6, title=title)
    line(axes[0], lengths, series, styles=styles, logx=True,
         xlabel="evaluation window length (tokens, log scale)", ylabel="validation loss (nats / char)",
         title=f"break it: three would-be repairs (dashed) beside their baselines, all trained at {train_length}")
    axes[0].set_xticks(lengths, [f"{L}\n({L // train_length}x)" for L in lengths])
    axes[0].minorticks_off()
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    run.save(fig, "break_it")
    token_scale = variants["sinusoidal, token scale"]["val_loss"]
    insights = [
        f"Clamping the learned table to row {train_length - 1} gives 8x/1x {ratio['learned, clamped']:.2f} instead of "
        f"{ratio['learned (untrained rows)']:.2f}; RoPE with base 100 instead of 10000: {ratio['rope, base 100']:.2f} "
        f"instead of {ratio['rope, base 10000']:.2f}; the sinusoid scaled down to the token embeddings' size: 1x loss "
        f"{token_scale[0]:.3f} instead of {baselines['sinusoidal']['val_loss'][0]:.3f}, 8x/1x "
        f"{ratio['sinusoidal, token scale']:.2f} instead of {ratio['sinusoidal (amplitude 1)']:.2f}."]
    return {"variants": variants, "loss_ratio_8x_to_1x": ratio, "learned_table_without_rows_error": error,
            "insights": insights}


# ---------------------------------------------------------------------------------------------- main
def main():
    parser = demo_parser(__doc__)
    args = parser.parse_args()
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if run.quick else "full"]
    train_length = sizes["train_length"]
    lengths = [train_length * f for f in LENGTH_FACTORS]
    data = char_shakespeare_data(train_length, sizes["batch_size"], run.device, run.seed)
    windows = validation_windows(run, lengths, sizes["eval_tokens"])
    reference = lab_model_config(data.vocab.size, **sizes["model"])  # the trained models' width and head count
    embed_dim, num_heads = reference.embed_dim, reference.num_heads

    print("\n1. encoding heatmaps")
    heatmaps = encoding_heatmaps(run, embed_dim, num_heads)
    print("\n2. similarity vs distance")
    distance = similarity_vs_distance(run, embed_dim, num_heads, lengths[-1], train_length)
    print(f"\n3. extrapolation: train at {train_length}, evaluate at {lengths} on {data.corpus}")
    extrapolated, models = extrapolation(run, data, windows, sizes, unigram_loss(data, seed=run.seed))
    encodings = extrapolated["encodings"]
    print("\n4. the learned table")
    table = learned_table(run, models["learned"], train_length)
    print("\n5. bias instead of vectors")
    inputs = bias_instead_of_vectors(run, models, train_length)
    print("\n6. break it")
    broken = break_it(run, data, windows, sizes, encodings, models["learned"])

    rows = [{"encoding": p, **{f"loss@{L}": v for L, v in zip(lengths, r["val_loss"])},
             "8x/1x": r["loss_ratio_to_1x"][-1], f"pos<{train_length}": r["longest_loss_inside_train_length"],
             f"pos>={train_length}": r["longest_loss_beyond_train_length"], "train s": r.get("train_seconds", "-")}
            for p, r in [*encodings.items(), *broken["variants"].items()]]
    print_table(rows, title=f"Validation loss (nats/char) of the lab model trained at {train_length} tokens for "
                            f"{sizes['steps']} steps of {sizes['batch_size']} windows, {data.corpus}; "
                            f"pos<{train_length} / pos>={train_length}: positions of the {lengths[-1]}-token windows")

    experiments = (heatmaps, distance, extrapolated, table, inputs, broken)
    insights, verdicts = report_findings(experiments)
    run.finish({"sizes": sizes, "corpus": data.corpus, "eval_lengths": lengths, "heatmaps": heatmaps,
                "similarity_vs_distance": distance, "extrapolation": encodings, "learned_table": table,
                "unigram_val_loss": extrapolated["unigram_val_loss"], "bias_instead_of_vectors": inputs,
                "break_it": broken, "key_insights": insights,
                "verdicts": verdicts})


if __name__ == "__main__":
    main()
