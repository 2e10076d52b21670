"""08 — Mixture of experts: more parameters at the same FLOPs, what the router does, and what it costs.

Experiments (all on character-level Shakespeare, the lab model with its FFN swapped, same seed and batches):
  1. dense_vs_moe (the key figure): the dense lab model (GELU FFN, 512 hidden), a MoE with 8 GELU experts of
     256 hidden and top-2 routing (the same active FFN FLOPs, 3x the parameters), and a dense model as large
     as the MoE (FFN 2048 hidden, 4x the FFN FLOPs); validation loss against training FLOPs counted by torch's
     FlopCounterMode and against wall time; dense and MoE are trained with two seeds each (the dense pair gives
     the seed-to-seed spread; each MoE is compared with the dense model of its seed).
  2. balance: the MoE trained without the balancing loss and z-loss beside the balanced one: the share of
     tokens each expert receives, per layer, on validation text.
  3. capacity: the MoE trained with capacity factors 0.5, 1.0, 1.5 (and none): assignments dropped vs loss.
  4. specialisation: which characters each expert of the balanced MoE receives, and the mutual information
     between the input character and the router's first choice against a shuffled baseline.
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ticker import NullFormatter
from torch.utils.flop_counter import FlopCounterMode

from demo_cli import demo_parser, print_table, start_demo
from lab import (char_shakespeare_data, fixed_validation_windows, short_schedule, train_lab_variant, unigram_loss,
                 validation_loss)
from moe_layer import model_active_parameters, moe_layers, register_moe, reset_utilisation
from plotting import heatmap, panels
from training import next_token_loss

# Quick and full runs differ in these sizes only.
SIZES = {
    "quick": dict(steps=10, evaluations=2, eval_batches=2, val_batches=2),
    "full": dict(steps=400, evaluations=8, eval_batches=8, val_batches=20),
}
NUM_EXPERTS, TOP_K = 8, 2
DENSE_HIDDEN = 512  # the lab model's FFN: 4 x 128
EXPERT_HIDDEN = DENSE_HIDDEN // TOP_K  # k experts of half the width = the dense FFN's FLOPs per token
BALANCE, Z_LOSS = 0.01, 0.001  # Switch's and ST-MoE's coefficients
CAPACITY_FACTORS = (0.5, 1.0, 1.5)
TOP_CHARACTERS = 24  # columns of the specialisation heatmap
# Verdict thresholds, written where they are used:
SAME_FLOPS = 0.05  # "equal active FLOPs": training FLOPs per token within 5%
MAINTAINED = 0.05  # "capacity maintained": MoE's loss within 0.05 nats of the dense model of equal total size
SAVING = 0.5  # "FLOP savings": MoE needs at most half that model's FLOPs per token
CONCENTRATED = 2.0  # "tokens go to the same expert": the busiest expert gets >= 2x its fair share of tokens
COLORS = {"dense": "tab:blue", "dense, second seed": "tab:cyan", "MoE 8x top-2": "tab:red",
          "MoE 8x top-2, second seed": "salmon",
          "dense as large as the MoE": "tab:green", "MoE without balancing": "tab:orange"}


def moe_ffn(**settings) -> str:
    """The registry name of the demo's MoE (8 GELU experts of 256, top-2) with `settings` changed."""
    base = dict(num_experts=NUM_EXPERTS, top_k=TOP_K, expert="gelu", expert_hidden_size=EXPERT_HIDDEN,
                balance_coefficient=BALANCE, z_loss_coefficient=Z_LOSS)
    return register_moe(**{**base, **settings})


def training_flops_per_token(model, x, y) -> float:
    """Matrix-multiply FLOPs of one training step (forward + backward), counted by FlopCounterMode, per token."""
    with FlopCounterMode(display=False) as counter:
        next_token_loss(model, x, y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / y.numel()


def train_variant(run, sizes, data, windows, label, seed=None, **overrides) -> tuple[dict, torch.nn.Module]:
    """Train one lab variant; its losses, FLOPs, parameters and time as a dict, and the model."""
    schedule = short_schedule(sizes["steps"], eval_batches=sizes["eval_batches"],
                              eval_interval=max(1, sizes["steps"] // sizes["evaluations"]))
    model, history = train_lab_variant(data, schedule, seed=run.seed if seed is None else seed, device=run.device,
                                       **overrides)
    x, y = windows[0]
    flops_per_token = training_flops_per_token(model, x, y)
    tokens_per_step = data.batch_size * data.context_length
    row = {"label": label, "ffn": model.config.ffn, "parameters": model.num_parameters(),
           "active_parameters": model_active_parameters(model), "training_flops_per_token": flops_per_token,
           "val_loss": validation_loss(model, windows), "train_seconds": history.train_seconds,
           "tokens_per_second": history.tokens_per_second, "diverged": history.diverged,
           "curve_steps": history.eval_steps, "curve_val_loss": history.val_loss,
           "curve_flops": [s * tokens_per_step * flops_per_token for s in history.eval_steps],
           "curve_seconds": [s * history.train_seconds / max(1, len(history.train_loss)) for s in history.eval_steps]}
    print(f"  {label:28s} val loss {row['val_loss']:.3f}  params {row['parameters']:,} (active "
          f"{row['active_parameters']:,})  {flops_per_token / 1e6:.2f} MFLOP/token  "
          f"{history.tokens_per_second:,.0f} tok/s")
    return row, model


# ---------------------------------------------------------------------------------------------- 1
def dense_vs_moe(run, sizes, data, windows):
    rows, models = {}, {}
    for label, seed, overrides in (("dense", None, dict(ffn="gelu")),
                                   ("dense, second seed", run.seed + 1, dict(ffn="gelu")),
                                   ("MoE 8x top-2", None, dict(ffn=moe_ffn())),
                                   ("MoE 8x top-2, second seed", run.seed + 1, dict(ffn=moe_ffn())),
                                   ("dense as large as the MoE", None,
                                    dict(ffn="gelu", ffn_hidden_size=NUM_EXPERTS * EXPERT_HIDDEN))):
        rows[label], models[label] = train_variant(run, sizes, data, windows, label, seed, **overrides)
    dense, moe, large = rows["dense"], rows["MoE 8x top-2"], rows["dense as large as the MoE"]
    spread = abs(dense["val_loss"] - rows["dense, second seed"]["val_loss"])
    flops_ratio = moe["training_flops_per_token"] / dense["training_flops_per_token"]
    saving = moe["training_flops_per_token"] / large["training_flops_per_token"]
    # > 0: MoE better at the same FLOPs; seed by seed (each MoE against the dense model of the same seed)
    gains = [dense["val_loss"] - moe["val_loss"],
             rows["dense, second seed"]["val_loss"] - rows["MoE 8x top-2, second seed"]["val_loss"]]
    gain = sum(gains) / len(gains)
    gap_to_large = moe["val_loss"] - large["val_loss"]  # > 0: MoE worse than the dense model of its size
    speed_ratio = dense["tokens_per_second"] / moe["tokens_per_second"]

    same_flops = abs(flops_ratio - 1) <= SAME_FLOPS
    larger = moe["parameters"] / dense["parameters"]
    if not same_flops or (max(gains) < 0 and gain < -spread):
        larger_verdict = "fails"
    else:
        larger_verdict = "holds" if min(gains) > 0 and gain > spread else "depends"
    saving_verdict = "holds" if saving <= SAVING and gap_to_large <= MAINTAINED else "fails"
    verdicts = {
        "flop_savings_with_maintained_capacity": {
            "verdict": saving_verdict, "moe_over_large_dense_flops": saving, "loss_gap_to_large_dense": gap_to_large,
            "threshold": f"MoE uses <= {SAVING} of the FLOPs per token of the dense model with as many parameters "
                         f"and ends within {MAINTAINED} nats of its validation loss"},
        "much_larger_model_at_same_compute": {
            "verdict": larger_verdict, "parameter_ratio": larger, "flops_ratio": flops_ratio, "loss_gain": gain,
            "loss_gain_per_seed": gains, "seed_spread": spread,
            "threshold": f"training FLOPs per token within {SAME_FLOPS:.0%} of dense; holds when MoE's loss is lower "
                         f"than dense's for both seeds and on average by more than the dense seed spread, fails "
                         f"when higher for both seeds and on average by more than the spread, depends otherwise"},
    }

    plot_dense_vs_moe(run, rows, spread)
    insight = (f"At {flops_ratio:.2f}x the dense model's training FLOPs per token and {larger:.1f}x its parameters, "
               f"the MoE's loss is {abs(gain):.3f} nats {'lower' if gain > 0 else 'higher'} than dense's (mean of 2 "
               f"seeds; per seed {gains[0]:+.3f}, {gains[1]:+.3f} in MoE's favour; dense seed spread {spread:.3f}); "
               f"the dense model as large as the "
               f"MoE costs {1 / saving:.1f}x the MoE's FLOPs and ends {abs(gap_to_large):.3f} nats "
               f"{'above' if gap_to_large < 0 else 'below'} the MoE. "
               f"Per second of CPU time the MoE trains {moe['tokens_per_second']:,.0f} tokens/s vs dense "
               f"{dense['tokens_per_second']:,.0f} ({speed_ratio:.1f}x slower: routing, gathers and one small "
               f"matrix product per expert).")
    return {"variants": rows, "seed_spread": spread, "verdicts": verdicts, "insight": insight}, models


def plot_dense_vs_moe(run, rows: dict, spread: float) -> None:
    """Loss vs training FLOPs and vs wall time, drawn from the stored numbers only (rows as in results.json)."""
    dense, moe = rows["dense"], rows["MoE 8x top-2"]
    gain = (dense["val_loss"] + rows["dense, second seed"]["val_loss"] - moe["val_loss"]
            - rows["MoE 8x top-2, second seed"]["val_loss"]) / 2
    fig, axes = panels(1, 2, width=5.6, height=4.2,
                       title=f"MoE ({moe['parameters'] / dense['parameters']:.1f}x the parameters, "
                             f"{moe['training_flops_per_token'] / dense['training_flops_per_token']:.2f}x the FLOPs) "
                             f"ends {abs(gain):.3f} nats {'below' if gain > 0 else 'above'} dense (mean of 2 seeds; "
                             f"dense seed spread {spread:.3f});\non this CPU a MoE step takes "
                             f"{dense['tokens_per_second'] / moe['tokens_per_second']:.1f}x the dense step's time")
    for label, row in rows.items():
        style = dict(color=COLORS[label], marker="o", markersize=3, linestyle="--" if "seed" in label else "-")
        axes[0].plot(row["curve_flops"][1:], row["curve_val_loss"][1:], label=f"{label}: {row['val_loss']:.3f}",
                     **style)  # step 0 has 0 FLOPs: off a log axis
        axes[1].plot(row["curve_seconds"], row["curve_val_loss"], label=label, **style)
    axes[0].set(xscale="log", xlabel="training FLOPs, 10^12 (FlopCounterMode, fwd + bwd, log scale)",
                ylabel="validation loss (nats / char)", title="loss vs compute (from the first evaluation)")
    flops = [f for r in rows.values() for f in r["curve_flops"][1:]]
    ticks = [m * 10.0 ** p for p in range(6, 20) for m in (1, 2, 5) if min(flops) <= m * 10.0 ** p <= max(flops)]
    axes[0].set_xticks(ticks, [f"{t / 1e12:g}" for t in ticks])  # a 1-2-5 ladder: a short log axis has few decades
    axes[0].xaxis.set_minor_formatter(NullFormatter())
    axes[1].set(xlabel="training wall time (s; steps x mean step time, shared cores)",
                ylabel="validation loss (nats / char)", title="loss vs wall time (step 0 above the axis)")
    top = max(r["curve_val_loss"][1] for r in rows.values()) + 0.05  # the untrained value (~4.2) hides the rest
    bottom = min(min(r["curve_val_loss"]) for r in rows.values()) - 0.03
    for ax in axes:
        ax.set_ylim(bottom, top)
        ax.legend(fontsize=7)
    fig.tight_layout()
    run.save(fig, "dense_vs_moe")


# ---------------------------------------------------------------------------------------------- 2
@torch.no_grad()
def routing_on(model, windows) -> dict:
    """Route the validation windows: per layer, the share of tokens each expert is chosen by (any rank), the
    first choice per token, and the share of assignments dropped."""
    model.eval()
    reset_utilisation(model)
    first_choices = [[] for _ in moe_layers(model)]
    chosen = [torch.zeros(NUM_EXPERTS) for _ in moe_layers(model)]
    for x, _ in windows:
        model(x)
        for i, layer in enumerate(moe_layers(model)):
            index = layer.last.routing.expert_index  # (B*T, k)
            chosen[i] += F.one_hot(index, NUM_EXPERTS).sum(dim=(0, 1)).float()
            first_choices[i].append(index[:, 0])
    model.train()
    tokens = sum(x.numel() for x, _ in windows)
    dropped = [int(layer.dropped_assignments) / (TOP_K * tokens) for layer in moe_layers(model)]
    return {"token_share": [(c / tokens).tolist() for c in chosen],  # f_e per layer; sums to k
            "first_choice": [torch.cat(f) for f in first_choices], "dropped_share": dropped}


def balance(run, sizes, data, windows, balanced_model):
    row, unbalanced_model = train_variant(run, sizes, data, windows, "MoE without balancing",
                                          ffn=moe_ffn(balance_coefficient=0.0, z_loss_coefficient=0.0))
    fair = TOP_K / NUM_EXPERTS  # every expert's share of tokens when routing is uniform
    measured = {}
    for label, model in (("MoE 8x top-2", balanced_model), ("MoE without balancing", unbalanced_model)):
        shares = np.array(routing_on(model, windows)["token_share"])  # (L, N)
        measured[label] = {"token_share": shares.tolist(), "busiest_over_fair": (shares.max(axis=1) / fair).tolist(),
                           "idle_experts": int((shares < 0.1 * fair).sum())}
    worst_without = max(measured["MoE without balancing"]["busiest_over_fair"])
    worst_with = max(measured["MoE 8x top-2"]["busiest_over_fair"])
    verdict = "holds" if worst_without >= CONCENTRATED and worst_with < CONCENTRATED else (
        "fails" if worst_without < CONCENTRATED else "depends")

    fig, axes = panels(1, 2, width=5.4, height=3.6, constrained=True,
                       title=f"Without the balancing loss the busiest expert gets {worst_without:.1f}x its fair share "
                             f"of tokens (worst layer); with it, {worst_with:.1f}x")
    vmax = max(float(np.max(m["token_share"])) for m in measured.values())
    for ax, (label, m) in zip(axes, measured.items()):
        heatmap(ax, m["token_share"], xlabel="expert", ylabel="layer", cmap="magma", vmin=0, vmax=vmax,
                title=f"{label}: busiest {max(m['busiest_over_fair']):.1f}x fair, {m['idle_experts']} idle",
                colorbar_label=f"share of tokens routed there (fair = {fair})",
                xticklabels=[str(e) for e in range(NUM_EXPERTS)],
                yticklabels=[str(layer) for layer in range(len(m["token_share"]))])
    run.save(fig, "utilisation")
    insight = (f"Busiest expert vs its fair share ({fair:.2f} of tokens), worst layer: {worst_without:.2f}x without "
               f"the balancing loss, {worst_with:.2f}x with it; validation loss {row['val_loss']:.3f} without.")
    return {"unbalanced": row, "routing": measured, "fair_share": fair, "insight": insight,
            "verdicts": {"without_balancing_tokens_go_to_the_same_expert": {
                "verdict": verdict, "busiest_over_fair_without": worst_without, "busiest_over_fair_with": worst_with,
                "threshold": f"without balancing the busiest expert of some layer gets >= {CONCENTRATED}x its fair "
                             f"share of tokens ({fair:.2f}) and with balancing none does (fails when without "
                             f"balancing none does; depends when both do)"}}}


# ---------------------------------------------------------------------------------------------- 3
def capacity(run, sizes, data, windows, unlimited_row, unlimited_model):
    rows = []
    for factor in CAPACITY_FACTORS:
        row, model = train_variant(run, sizes, data, windows, f"MoE, capacity factor {factor}",
                                   ffn=moe_ffn(capacity_factor=factor))
        routing = routing_on(model, windows)
        rows.append({"capacity_factor": factor, "val_loss": row["val_loss"],
                     "tokens_per_second": row["tokens_per_second"],
                     "dropped_share": float(np.mean(routing["dropped_share"])),
                     "dropped_share_per_layer": routing["dropped_share"]})
    rows.append({"capacity_factor": None, "val_loss": unlimited_row["val_loss"],
                 "tokens_per_second": unlimited_row["tokens_per_second"], "dropped_share": 0.0,
                 "dropped_share_per_layer": routing_on(unlimited_model, windows)["dropped_share"]})
    names = [str(r["capacity_factor"]) if r["capacity_factor"] else "none" for r in rows]
    cost = rows[0]["val_loss"] - rows[-1]["val_loss"]
    fig, axes = panels(1, 2, width=5.0, height=3.8,
                       title=f"Capacity factor {CAPACITY_FACTORS[0]} drops {rows[0]['dropped_share']:.0%} of "
                             f"assignments and costs {cost:+.3f} nats vs no limit")
    positions = np.arange(len(rows))
    axes[0].bar(positions, [100 * r["dropped_share"] for r in rows], color="tab:purple")
    axes[1].plot(positions, [r["val_loss"] for r in rows], marker="o", color="tab:red")
    for ax, ylabel in zip(axes, ("assignments dropped (% of k x tokens, validation)", "validation loss (nats / char)")):
        ax.set_xticks(positions, names)
        ax.set(xlabel="capacity factor (C = factor x k x tokens / experts)", ylabel=ylabel)
    for position, r in zip(positions, rows):
        axes[0].annotate(f"{100 * r['dropped_share']:.1f}%", (position, 100 * r["dropped_share"]), ha="center",
                         va="bottom", fontsize=8)
        axes[1].annotate(f"{r['val_loss']:.3f}", (position, r["val_loss"]), textcoords="offset points",
                         xytext=(0, 5), ha="center", fontsize=8)
    fig.tight_layout()
    run.save(fig, "capacity")
    insight = ", ".join(f"factor {n}: {100 * r['dropped_share']:.1f}% dropped, loss {r['val_loss']:.3f}"
                        for n, r in zip(names, rows))
    return {"rows": rows, "insight": insight}


# ---------------------------------------------------------------------------------------------- 4
def mutual_information_bits(a: torch.Tensor, b: torch.Tensor) -> float:
    """I(A; B) in bits from paired samples of two discrete variables (plug-in estimate from counts)."""
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1)
    joint.index_put_((a, b), torch.ones(len(a)), accumulate=True)
    joint /= joint.sum()
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nonzero = joint > 0
    return float((joint[nonzero] * torch.log2(joint[nonzero] / outer[nonzero])).sum())


def shown(character: str) -> str:
    return {" ": "sp", "\n": "\\n"}.get(character, character)


def specialisation(run, data, windows, model):
    routing = routing_on(model, windows)
    characters = torch.cat([x.flatten() for x, _ in windows])  # (tokens,) the input character of each position
    shuffled = characters[torch.randperm(len(characters), generator=torch.Generator().manual_seed(run.seed))]
    layers = []
    for i, first in enumerate(routing["first_choice"]):
        layers.append({"layer": i, "mutual_information_bits": mutual_information_bits(characters, first),
                       "shuffled_baseline_bits": mutual_information_bits(shuffled, first)})
    frequent = torch.bincount(characters, minlength=data.vocab.size).argsort(descending=True)[:TOP_CHARACTERS]
    shown_layers = (0, len(layers) - 1)
    fig, axes = panels(1, 2, width=7.0, height=3.4, constrained=True,
                       title=f"The router's first choice carries {layers[0]['mutual_information_bits']:.2f} bits about "
                             f"the input character in layer 0 (shuffled: {layers[0]['shuffled_baseline_bits']:.2f}), "
                             f"{layers[-1]['mutual_information_bits']:.2f} in layer {len(layers) - 1}")
    top_characters = {}
    for ax, i in zip(axes, shown_layers):
        first = routing["first_choice"][i]
        table = torch.zeros(NUM_EXPERTS, TOP_CHARACTERS)  # (N, C): share of a character's tokens per expert
        for column, char_id in enumerate(frequent):
            picks = first[characters == char_id]
            table[:, column] = torch.bincount(picks, minlength=NUM_EXPERTS).float() / max(1, len(picks))
        heatmap(ax, table.numpy(), xlabel="input character (the 24 most frequent)", ylabel="first-choice expert",
                cmap="Blues", vmin=0, vmax=1, colorbar_label="share of that character's tokens",
                title=f"layer {i}: {layers[i]['mutual_information_bits']:.2f} bits",
                xticklabels=[shown(data.vocab.decode([int(c)])) for c in frequent],
                yticklabels=[str(e) for e in range(NUM_EXPERTS)])
        ax.set_xticks(range(TOP_CHARACTERS), [shown(data.vocab.decode([int(c)])) for c in frequent], rotation=0,
                      fontsize=8)
        counts = torch.zeros(NUM_EXPERTS, data.vocab.size)
        counts.index_put_((first, characters), torch.ones(len(first)), accumulate=True)
        top_characters[f"layer {i}"] = {
            str(e): [shown(data.vocab.decode([int(c)])) for c in counts[e].argsort(descending=True)[:5]
                     if counts[e, c] > 0]
            for e in range(NUM_EXPERTS)}
    run.save(fig, "specialisation")
    insight = "; ".join(f"layer {r['layer']}: {r['mutual_information_bits']:.2f} bits (shuffled "
                        f"{r['shuffled_baseline_bits']:.2f})" for r in layers)
    return {"layers": layers, "top_characters_per_expert": top_characters,
            "character_entropy_bits": mutual_information_bits(characters, characters), "insight": insight}


def main():
    parser = demo_parser(__doc__)
    args = parser.parse_args()
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if run.quick else "full"]
    data = char_shakespeare_data(64, 12, run.device, run.seed)
    windows = fixed_validation_windows(data, sizes["val_batches"], run.seed)
    unigram = unigram_loss(data)

    print(f"\n1. dense vs MoE at equal active FLOPs: {sizes['steps']} steps each on {data.corpus}")
    compared, models = dense_vs_moe(run, sizes, data, windows)
    print("\n2. utilisation with and without the balancing loss")
    balanced = balance(run, sizes, data, windows, models["MoE 8x top-2"])
    print("\n3. capacity factor vs dropped assignments vs loss")
    capped = capacity(run, sizes, data, windows, compared["variants"]["MoE 8x top-2"], models["MoE 8x top-2"])
    print("\n4. what the experts specialise in")
    special = specialisation(run, data, windows, models["MoE 8x top-2"])

    print_table([{"model": k, "params": v["parameters"], "active": v["active_parameters"],
                  "MFLOP/token": v["training_flops_per_token"] / 1e6, "val loss": v["val_loss"],
                  "tok/s": v["tokens_per_second"]} for k, v in compared["variants"].items()],
                title=f"Dense vs MoE ({sizes['steps']} steps; unigram loss {unigram:.3f})")
    print_table([{"capacity factor": r["capacity_factor"] or "none", "dropped": r["dropped_share"],
                  "val loss": r["val_loss"]} for r in capped["rows"]], title="Capacity")
    print_table(special["layers"], title="Mutual information between input character and first-choice expert")
    insights = [compared["insight"], balanced["insight"], "Capacity: " + capped["insight"],
                "Specialisation (I(character; first expert)): " + special["insight"]]
    print("\nInsights:")
    for line in insights:
        print(f"  - {line}")
    verdicts = {**compared["verdicts"], **balanced["verdicts"]}
    for name, verdict in verdicts.items():
        print(f"  verdict {name}: {verdict['verdict']}")
    run.finish({"sizes": sizes, "corpus": data.corpus, "unigram_loss": unigram,
                "moe": {"num_experts": NUM_EXPERTS, "top_k": TOP_K, "expert_hidden_size": EXPERT_HIDDEN,
                        "dense_hidden_size": DENSE_HIDDEN, "balance_coefficient": BALANCE,
                        "z_loss_coefficient": Z_LOSS},
                "dense_vs_moe": {k: v for k, v in compared.items() if k != "verdicts"},
                "balance": {k: v for k, v in balanced.items() if k != "verdicts"},
                "capacity": capped, "specialisation": special, "insights": insights, "verdicts": verdicts})


if __name__ == "__main__":
    main()
