"""Where the time of one training step of the lab model goes, and what changing the thread count does.

    python 04_transformer_block/profile_training.py            # writes profile.json here
    python 04_transformer_block/profile_training.py --quick    # fewer steps, temp folder

The lab recipe (4 layers x 128, context 64, batch 12, AdamW) is timed phase by phase with the device
synchronised around each phase: drawing a batch, forward + loss, backward, gradient clipping, the
optimizer step. Evaluation is timed as the reference run does it (20 train + 20 val batches every 250
steps). Variants (thread counts, the id check) are compared in one process, alternating them step by step, so that a change in the
machine's load hits both alike: the ratio is trustworthy even when the absolute times are not.
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import statistics
import time

import torch

from demo_cli import demo_parser, print_table, start_demo
from lab import char_shakespeare_data, lab_model_config, lab_train_config
from plotting import bar, panels
from runtime import synchronize
from training import evaluate, make_optimizer, next_token_loss
from transformer import MiniFormer

PHASES = ("batch", "forward + loss", "backward", "clip", "optimizer")


def timed_step(model, optimizer, data, device, clip: float) -> dict:
    """One optimisation step of the reference recipe, timed phase by phase (seconds)."""
    times = {}

    def mark(name, start):
        synchronize(device)
        now = time.perf_counter()
        times[name] = now - start
        return now

    synchronize(device)
    start = time.perf_counter()
    x, y = data.batch_fn("train")
    start = mark("batch", start)
    loss = next_token_loss(model, x, y)
    start = mark("forward + loss", start)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    start = mark("backward", start)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    start = mark("clip", start)
    optimizer.step()
    mark("optimizer", start)
    return times


def phase_profiles(run, data, steps: int, thread_counts: list[int]) -> list[dict]:
    """Median seconds per phase over `steps` steps (after 10 warm-up steps) for each torch thread count, the
    thread counts alternating step by step (one model and optimizer each, same initial weights)."""
    setups = []
    for threads in thread_counts:
        torch.manual_seed(run.seed)
        model = MiniFormer(lab_model_config(data.vocab.size)).to(run.device)
        setups.append((threads, model, make_optimizer(model, lab_train_config()), []))
    for step in range(10 + steps):
        for threads, model, optimizer, samples in setups:
            torch.set_num_threads(threads)
            times = timed_step(model, optimizer, data, run.device, 1.0)
            if step >= 10:
                samples.append(times)
    profiles = []
    tokens = data.batch_size * data.context_length
    for threads, _, _, samples in setups:
        medians = {phase: statistics.median(s[phase] for s in samples) for phase in PHASES}
        step_seconds = sum(medians.values())
        print(f"  {threads} thread(s): {1000 * step_seconds:.1f} ms per step ({tokens / step_seconds:,.0f} tokens/s); "
              + ", ".join(f"{p} {100 * medians[p] / step_seconds:.0f}%" for p in PHASES))
        profiles.append({"threads": threads, "median_seconds": medians, "step_seconds": step_seconds,
                         "tokens_per_second": tokens / step_seconds,
                         "share": {p: medians[p] / step_seconds for p in PHASES}})
    return profiles


def evaluation_share(run, data, steps: int) -> dict:
    """Seconds one evaluation costs (as the reference run does it) and its share of a 2000-step run."""
    schedule = lab_train_config()
    model = MiniFormer(lab_model_config(data.vocab.size)).to(run.device)
    synchronize(run.device)
    start = time.perf_counter()
    for split in ("train", "val"):
        evaluate(model, data.batch_fn, split, schedule.eval_batches)
    synchronize(run.device)
    one_evaluation = time.perf_counter() - start
    evaluations = schedule.steps // schedule.eval_interval + 1
    return {"seconds_per_evaluation": one_evaluation, "evaluations_per_run": evaluations,
            "batches_per_evaluation": 2 * schedule.eval_batches}


def id_check_cost(run, data, rounds: int) -> dict:
    """MiniFormer checks that every id is in [0, vocab_size) (an out-of-range id is a ValueError, not torch's
    "index out of range in self"): forward + backward with and without that check, alternated."""
    torch.manual_seed(run.seed)
    model = MiniFormer(lab_model_config(data.vocab.size)).to(run.device)
    x, y = data.batch_fn("train")
    unchecked_seconds, checked_seconds = [], []
    original = model._check_ids
    for _ in range(rounds):
        for seconds, check in ((checked_seconds, original), (unchecked_seconds, lambda idx: None)):
            model._check_ids = check
            synchronize(run.device)
            start = time.perf_counter()
            next_token_loss(model, x, y).backward()
            synchronize(run.device)
            seconds.append(time.perf_counter() - start)
    model._check_ids = original
    checked, unchecked = statistics.median(checked_seconds), statistics.median(unchecked_seconds)
    return {"checked_seconds": checked, "unchecked_seconds": unchecked, "ratio_checked_over_unchecked": checked / unchecked}


def main():
    parser = demo_parser(__doc__)
    args = parser.parse_args()
    run = start_demo(args, __file__)
    steps = 30 if args.quick else 300
    data = char_shakespeare_data(64, 12, run.device, seed=args.seed)
    threads_available = torch.get_num_threads()
    profiles = phase_profiles(run, data, steps, sorted({1, threads_available}))
    torch.set_num_threads(threads_available)
    evaluation = evaluation_share(run, data, steps)
    best = min(profiles, key=lambda p: p["step_seconds"])
    evaluation["share_of_run"] = (evaluation["seconds_per_evaluation"] * evaluation["evaluations_per_run"]
                                  / (evaluation["seconds_per_evaluation"] * evaluation["evaluations_per_run"]
                                     + 2000 * best["step_seconds"]))
    check = id_check_cost(run, data, 20 if args.quick else 200)
    print(f"  evaluation: {evaluation['seconds_per_evaluation']:.2f} s each, "
          f"{100 * evaluation['share_of_run']:.1f}% of a 2000-step run")
    print(f"  id range check: forward+backward {check['ratio_checked_over_unchecked']:.3f}x the unchecked time")

    largest = sorted(PHASES, key=lambda p: -best["share"][p])[:2]
    fig, axes = panels(1, len(profiles), width=4.8, height=3.8, constrained=True,
                       title=f"One lab-model training step: {largest[0]} {100 * best['share'][largest[0]]:.0f}% and "
                             f"{largest[1]} {100 * best['share'][largest[1]]:.0f}% of the time; {best['threads']} "
                             f"thread(s) fastest at {1000 * best['step_seconds']:.0f} ms")
    for ax, profile in zip(axes, profiles):
        bar(ax, list(PHASES), [1000 * profile["median_seconds"][p] for p in PHASES], ylabel="median ms per step",
            title=f"{profile['threads']} torch thread(s): {profile['tokens_per_second']:,.0f} tokens/s",
            annotate_fmt="{:.1f}", rotate=35)
    run.save(fig, "training_step_profile")
    rows = [{"threads": p["threads"], "ms/step": 1000 * p["step_seconds"], "tokens/s": p["tokens_per_second"],
             **{p_name: f"{100 * p['share'][p_name]:.0f}%" for p_name in PHASES}} for p in profiles]
    print_table(rows, title="Median time per phase")
    run.finish({"steps_timed": steps, "phases": profiles, "evaluation": evaluation, "id_check": check},
               filename="profile.json")


if __name__ == "__main__":
    main()
