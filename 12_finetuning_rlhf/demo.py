"""12 — Fine-tuning and RLHF: teach the pretrained lab model to follow instructions, classify, and prefer.

Every experiment starts from 04's trained lab model (character-level Shakespeare). The instructions are 16's
tasks with checkable answers (copy, reverse, key-value lookup; lowercase letters, since the Shakespeare
vocabulary has no digits besides 3), written as words, so every accuracy below is exact, not judged.

Experiments (each draws one figure and fills one section of results.json):
  1. sft_curves: supervised fine-tuning of the pretrained model vs the same architecture from scratch:
     exact-answer accuracy and response loss against steps.
  2. format_ablation: plain "reverse abc cba" vs the dialogue template "QUESTION:\\n...\\n\\nANSWER:\\n..." (the
     corpus's own speaker layout), each with the loss on the response only and on every token.
  3. new_task: instruction-tune on copy and lookup only, then measure reverse (never trained): zero-shot, and
     while fine-tuning on it, against the base model given the same reverse training.
  4. parameter_efficient: full fine-tuning vs LoRA vs QLoRA (LoRA on 14's NF4 base) vs prefix tuning:
     trainable parameters, training memory (counted), accuracy, time per step.
  5. classification: which of 4 speakers says a 64-character piece: a class head on the frozen model (probe),
     the whole model fine-tuned, and TF-IDF + logistic regression.
  6. preferences: pairs (correct vs wrong answer) sampled from the SFT model; a Bradley-Terry reward model and
     DPO on them; accuracy on held-out pairs and on the task.
  7. rlhf: a group-relative policy gradient (GRPO-style) on the exact task reward with KL coefficients from 0
     up: reward vs KL to the SFT model; then the reward model as the reward with the KL penalty off and on,
     against the true (exact) accuracy: reward hacking.
  8. gpt2_lora: the same LoRA on real GPT-2 small when its weights are in the local Hugging Face cache
     (skipped with a message otherwise).

Every claim's verdict is decided in code against the threshold written beside it (results.json "verdicts").
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

import copy
import math
import string

import numpy as np
import torch

from classification import (SequenceClassifier, classification_batch_fn, classification_loss, classifier_accuracy,
                            tfidf_baseline)
from data import load_corpus
from demo_cli import demo_parser, print_table, report_findings, start_demo
from hf_interop import load_pretrained_gpt2, miniformer_from_hf_gpt2
from lab import short_schedule, trained_lab_model
from lora import apply_lora, apply_qlora, count_parameters, training_memory
from plotting import bar, panels
from preference import (PreferencePair, RewardModel, dpo_accuracy, reward_model_accuracy, train_dpo,
                        train_reward_model)
from prefix_tuning import PrefixTunedModel
from quantization import quantize_nf4
from quantized_model import QuantizedLinear
from rlhf import sample_group, train_rl
from sft import TEMPLATES, answer_accuracy, encode_example, sft_batch_fn
from speakers import speaker_pieces
from synthetic_tasks import END, CopyTask, KeyValueTask, make_task
from training import evaluate, next_token_loss, train
from transformer import MiniFormer

# Quick and full runs differ in these sizes only.
SIZES = {
    "quick": dict(preset="quick", train_per_task=200, test_per_task=20, sft_steps=20, evaluations=2, new_task_steps=8,
                  speakers=3, per_speaker=60, classify_steps=10, pair_prompts=24, samples_per_prompt=4,
                  preference_steps=6, rl_steps=2, rl_prompts_per_step=2, group_size=4, kl_coefs=(0.0, 0.5),
                  hacking_steps=2, gpt2_steps=2, lora_longer=2, rl_test_prompts=20),
    "full": dict(preset="full", train_per_task=2000, test_per_task=150, sft_steps=400, evaluations=8,
                 new_task_steps=150, speakers=4, per_speaker=600, classify_steps=200, pair_prompts=300,
                 samples_per_prompt=8, preference_steps=150, rl_steps=80, rl_prompts_per_step=4, group_size=8,
                 kl_coefs=(0.0, 0.1, 1.0), hacking_steps=80, gpt2_steps=100, lora_longer=2, rl_test_prompts=500),
}
BATCH = 32
LEARNING_RATE = {"full": 1e-3, "LoRA": 3e-3, "QLoRA": 3e-3, "prefix": 1e-2}  # each method's own (see README)
LORA_RANK, LORA_ALPHA = 8, 16
PREFIX_LENGTH = 8
MAX_LENGTH = 64 - PREFIX_LENGTH  # every example fits every method, prefix tuning included
# RL and DPO move a trained policy: ten times larger steps wrecked the SFT model's accuracy in an earlier
# run whatever the reward, so both use the small steps RLHF recipes use.
RL_LEARNING_RATE, RL_TEMPERATURE, DPO_BETA, DPO_LEARNING_RATE = 3e-5, 1.0, 0.1, 1e-5
HACKING_KL = 0.1
# Verdict thresholds, written where they are used:
FAST = 0.5  # "SFT converges fast": 90% of the final accuracy reached within half the steps
CLEARLY = 2.0  # a difference counts when it exceeds 2 standard errors (binomial, on the test examples)
LORA_GAP = 0.05  # "LoRA matches full fine-tuning": accuracy within 5 points
HACKED = 0.05  # reward hacking: the proxy reward rises while the true accuracy ends >= 5 points below its start
COLORS = {"pretrained": "tab:blue", "from scratch": "tab:gray", "full": "tab:blue", "LoRA": "tab:orange",
          "QLoRA": "tab:red", "prefix": "tab:green"}


# ---------------------------------------------------------------------------------------------- data
def task_set(names=("copy", "reverse", "lookup")) -> dict:
    """16's tasks on lowercase letters (characters the Shakespeare vocabulary has)."""
    settings = {"copy": dict(max_length=8), "reverse": dict(max_length=8),
                "lookup": dict(num_pairs=3, alphabet=string.ascii_lowercase)}
    return {name: make_task(name, **settings[name]) for name in names}


def as_words(task, prompt: str) -> str:
    """16's prompt as an instruction: 'reverse:abc=' -> 'reverse abc', 'ab:xy,cd:uv|cd=' -> 'ab:xy,cd:uv find cd'."""
    body = prompt[:-1]
    if isinstance(task, CopyTask):
        return f"{task.name} {body[len(task.prefix):]}"
    if isinstance(task, KeyValueTask):
        pairs, _, query = body.partition("|")
        return f"{pairs} find {query}"
    raise TypeError(f"no word form for the {task.name!r} task")


def make_examples(tasks: dict, count: int, seed: int, template: str, vocab, exclude=frozenset()) -> list:
    """`count` encoded examples per task (task i from seed + 1000 i), none whose prompt is in `exclude`."""
    examples = []
    for i, (name, task) in enumerate(tasks.items()):
        for example in task.examples(count, seed + 1000 * i):
            if example.prompt not in exclude:
                examples.append(encode_example(name, example.prompt, as_words(task, example.prompt), example.answer,
                                               template, vocab, MAX_LENGTH))
    return examples


def task_data(sizes, tasks, template, vocab, seed) -> dict:
    """Train and test examples; no test prompt was seen in training."""
    train_examples = make_examples(tasks, sizes["train_per_task"], seed, template, vocab)
    test = make_examples(tasks, sizes["test_per_task"], seed + 10_000, template, vocab,
                         exclude={e.prompt for e in train_examples})
    return {"train": train_examples, "test": test}


def moving_mean(values, window: int) -> np.ndarray:
    return np.convolve(values, np.ones(window) / window, mode="valid")


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


# ---------------------------------------------------------------------------------------------- fine-tuning
def fine_tune(run, model, split, tasks, vocab, steps, learning_rate, evaluations, loss_on="response",
              seed=None) -> dict:
    """00_utils' train on the examples, with exact test accuracy measured at every evaluation."""
    pad_id = vocab.index[END]
    generator = torch.Generator().manual_seed(run.seed if seed is None else seed)
    batch_fn = sft_batch_fn({"train": split["train"], "val": split["test"]}, BATCH, pad_id, generator, loss_on,
                            run.device)
    eval_split = sft_batch_fn({"train": split["train"], "val": split["test"]}, BATCH, pad_id,
                              torch.Generator().manual_seed(1), "response", run.device)
    curve = {"step": [], "accuracy": [], "response_loss": []}

    def measure(step):
        curve["step"].append(step)
        curve["accuracy"].append(answer_accuracy(model, split["test"], tasks, vocab)["mean"])
        curve["response_loss"].append(evaluate(model, eval_split, "val", 4))

    schedule = short_schedule(steps, learning_rate=learning_rate, eval_interval=max(1, steps // evaluations),
                              eval_batches=2)
    history = train(model, batch_fn, schedule, device=run.device, on_eval=measure)
    accuracy = answer_accuracy(model, split["test"], tasks, vocab)
    return {"curve": curve, "accuracy": accuracy, "seconds_per_step": history.train_seconds / steps,
            "test_examples": len(split["test"])}


def sft_curves(run, sizes, lab, tasks, split) -> tuple[dict, MiniFormer]:
    """Fine-tune the pretrained lab model and a fresh one (same architecture, seed and batches)."""
    vocab, steps = lab.data.vocab, sizes["sft_steps"]
    models = {"pretrained": copy.deepcopy(lab.model).train(), "from scratch": MiniFormer(lab.model.config).to(run.device)}
    rows = {name: fine_tune(run, model, split, tasks, vocab, steps, LEARNING_RATE["full"], sizes["evaluations"])
            for name, model in models.items()}
    for name, row in rows.items():
        print(f"  {name}: accuracy {row['accuracy']['mean']:.1%} after {steps} steps "
              f"({', '.join(f'{t} {a:.0%}' for t, a in row['accuracy'].items() if t != 'mean')})")
    fig, axes = panels(1, 2, width=5.6, title=f"SFT: exact-answer accuracy on {len(split['test'])} unseen prompts",
                       constrained=True)
    for name, row in rows.items():
        axes[0].plot(row["curve"]["step"], row["curve"]["accuracy"], "o-", color=COLORS[name], label=name)
        axes[1].plot(row["curve"]["step"], row["curve"]["response_loss"], "o-", color=COLORS[name], label=name)
    axes[0].set(xlabel="fine-tuning step", ylabel="accuracy (greedy, exact)", ylim=(0, 1),
                title="pretraining is what makes SFT work")
    axes[1].set(xlabel="fine-tuning step", ylabel="loss on the response (nats/token)", yscale="log",
                title="response-only loss")
    for ax in axes:
        ax.legend(frameon=False)
    run.save(fig, "sft_curves")

    curve = rows["pretrained"]["curve"]
    final = rows["pretrained"]["accuracy"]["mean"]
    reached = next((s for s, a in zip(curve["step"], curve["accuracy"]) if final > 0 and a >= 0.9 * final), None)
    n = len(split["test"])
    gap = final - rows["from scratch"]["accuracy"]["mean"]
    verdicts = {
        "sft_converges_fast": {
            "claim": "SFT converges fast", "threshold": f"90% of the final accuracy within {FAST:.0%} of the steps",
            "measured": f"90% of {final:.1%} first reached at step {reached} of {steps}",
            "verdict": "holds" if reached is not None and reached <= FAST * steps and final > 0 else "fails"},
        "pretraining_makes_sft_work": {
            "claim": "SFT on the pretrained model beats the same training from scratch",
            "threshold": f"accuracy higher by > {CLEARLY} s.e.",
            "measured": f"{final:.1%} vs {rows['from scratch']['accuracy']['mean']:.1%}",
            "verdict": "holds" if gap > CLEARLY * standard_error(final, n) else "fails"}}
    insights = [f"SFT ({steps} steps of {BATCH} examples): the pretrained model answers {final:.1%} of unseen "
                f"prompts exactly, the same model from scratch {rows['from scratch']['accuracy']['mean']:.1%}; 90% of "
                f"the final accuracy is first reached at step {reached}."]
    return {"steps": steps, "runs": rows, "insights": insights, "verdicts": verdicts}, models["pretrained"]


def format_ablation(run, sizes, lab, tasks, dialogue_run: dict) -> dict:
    """Plain vs dialogue template, loss on the response vs on every token."""
    vocab = lab.data.vocab
    rows = {("dialogue", "response"): dialogue_run}
    for template, loss_on in (("plain", "response"), ("dialogue", "all"), ("plain", "all")):
        split = task_data(sizes, tasks, template, vocab, run.seed)
        rows[(template, loss_on)] = fine_tune(run, copy.deepcopy(lab.model).train(), split, tasks, vocab,
                                              sizes["sft_steps"], LEARNING_RATE["full"], 1, loss_on)
        print(f"  {template:8s} loss on {loss_on:8s}: accuracy {rows[(template, loss_on)]['accuracy']['mean']:.1%}")
    fig, (ax,) = panels(width=8, height=3.8)
    names = list(tasks) + ["mean"]
    width = 0.2
    for i, ((template, loss_on), row) in enumerate(rows.items()):
        xs = np.arange(len(names)) + (i - 1.5) * width
        ax.bar(xs, [row["accuracy"][t] for t in names], width, label=f"{template}, loss on {loss_on}")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(ylabel="accuracy (greedy, exact)", ylim=(0, 1),
           title=f"Instruction format after {sizes['sft_steps']} SFT steps (same examples, seed and schedule)")
    ax.legend(frameon=False, fontsize=8)
    run.save(fig, "format_ablation")

    dialogue, plain = rows[("dialogue", "response")]["accuracy"]["mean"], rows[("plain", "response")]["accuracy"]["mean"]
    n = dialogue_run["test_examples"]
    s_e = math.hypot(standard_error(dialogue, n), standard_error(plain, n))
    verdicts = {"format_matters": {
        "claim": "instruction format matters (QA > plain)", "threshold": f"dialogue - plain > {CLEARLY} s.e.",
        "measured": f"dialogue {dialogue:.1%} vs plain {plain:.1%} (s.e. of the difference {s_e:.1%})",
        "verdict": "holds" if dialogue - plain > CLEARLY * s_e else "fails"}}
    response_only = {t: rows[(t, "response")]["accuracy"]["mean"] - rows[(t, "all")]["accuracy"]["mean"]
                     for t in TEMPLATES}
    insights = [f"Format: the dialogue template reaches {dialogue:.1%}, plain text {plain:.1%}; a loss on the response "
                f"only changes accuracy by {response_only['dialogue']:+.1%} (dialogue) and {response_only['plain']:+.1%} "
                f"(plain) against a loss on every token."]
    return {"rows": [{"template": t, "loss_on": l, **row["accuracy"]} for (t, l), row in rows.items()],
            "insights": insights, "verdicts": verdicts}


def new_task(run, sizes, lab, tasks) -> dict:
    """Instruction-tune on copy + lookup, then learn reverse (never seen) from it and from the base model."""
    vocab = lab.data.vocab
    seen_tasks = {name: task for name, task in tasks.items() if name != "reverse"}
    held_out = {"reverse": tasks["reverse"]}
    tuned = copy.deepcopy(lab.model).train()
    fine_tune(run, tuned, task_data(sizes, seen_tasks, "dialogue", vocab, run.seed), seen_tasks, vocab,
              sizes["sft_steps"], LEARNING_RATE["full"], 1)
    split = task_data(sizes, held_out, "dialogue", vocab, run.seed + 1)
    rows = {}
    for name, model in (("base model", copy.deepcopy(lab.model).train()), ("instruction-tuned on copy + lookup", tuned)):
        zero_shot = answer_accuracy(model, split["test"], held_out, vocab)["mean"]
        rows[name] = fine_tune(run, model, split, held_out, vocab, sizes["new_task_steps"], LEARNING_RATE["full"],
                               sizes["evaluations"])
        rows[name]["zero_shot"] = zero_shot
        print(f"  {name}: reverse zero-shot {zero_shot:.1%}, after {sizes['new_task_steps']} steps on it "
              f"{rows[name]['accuracy']['mean']:.1%}")
    fig, (ax,) = panels(width=6.5)
    for name, row in rows.items():
        ax.plot(row["curve"]["step"], row["curve"]["accuracy"], "o-", label=name)
    ax.set(xlabel="fine-tuning steps on reverse", ylabel="reverse accuracy (greedy, exact)", ylim=(0, 1),
           title="A new task (reverse): learned from the base model or the instruction-tuned one")
    ax.legend(frameon=False)
    run.save(fig, "new_task")

    base, tuned_row = rows["base model"], rows["instruction-tuned on copy + lookup"]
    n = len(split["test"])
    gap = tuned_row["accuracy"]["mean"] - base["accuracy"]["mean"]
    s_e = math.hypot(standard_error(tuned_row["accuracy"]["mean"], n), standard_error(base["accuracy"]["mean"], n))
    zero_gap = tuned_row["zero_shot"] - base["zero_shot"]
    better_after = gap > CLEARLY * s_e
    better_zero = zero_gap > CLEARLY * math.hypot(standard_error(tuned_row["zero_shot"], n),
                                                  standard_error(base["zero_shot"], n))
    verdicts = {"instruction_tuning_generalises": {
        "claim": "instruction tuning generalises better to new tasks",
        "threshold": f"held-out task accuracy higher by > {CLEARLY} s.e., zero-shot and after "
                     f"{sizes['new_task_steps']} steps on it (one of the two: depends)",
        "measured": f"zero-shot {tuned_row['zero_shot']:.1%} vs {base['zero_shot']:.1%}; after training "
                    f"{tuned_row['accuracy']['mean']:.1%} vs {base['accuracy']['mean']:.1%}",
        "verdict": "holds" if better_after and better_zero else "depends" if better_after or better_zero else "fails"}}
    insights = [f"New task: reverse zero-shot is {tuned_row['zero_shot']:.1%} after instruction tuning on copy + lookup "
                f"({base['zero_shot']:.1%} for the base); after {sizes['new_task_steps']} steps on reverse, "
                f"{tuned_row['accuracy']['mean']:.1%} vs {base['accuracy']['mean']:.1%}."]
    return {"rows": {k: {**v, "accuracy": v["accuracy"]["mean"]} for k, v in rows.items()}, "insights": insights,
            "verdicts": verdicts}


def nf4_base(linear):
    """14's NF4 (block 64, double-quantized scales): the frozen base of QLoRA."""
    return QuantizedLinear(quantize_nf4(linear.weight.detach(), 64, double_quant=True), linear.bias)


def parameter_efficient(run, sizes, lab, tasks, split, full_run: dict) -> dict:
    """Full fine-tuning (experiment 1's run) against LoRA, QLoRA and prefix tuning on the same examples."""
    vocab = lab.data.vocab
    full_model = copy.deepcopy(lab.model)
    rows = {"full": {**full_run, "parameters": count_parameters(full_model), "memory": training_memory(full_model)}}
    for method in ("LoRA", "QLoRA", "prefix"):
        model = copy.deepcopy(lab.model)
        if method == "LoRA":
            apply_lora(model, LORA_RANK, LORA_ALPHA)
        elif method == "QLoRA":
            apply_qlora(model, LORA_RANK, LORA_ALPHA, nf4_base)
        else:
            model = PrefixTunedModel(model, PREFIX_LENGTH, init_ids=vocab.encode("QUESTION"))
        model.to(run.device).train()
        row = fine_tune(run, model, split, tasks, vocab, sizes["sft_steps"], LEARNING_RATE[method],
                        sizes["evaluations"])
        rows[method] = {**row, "parameters": count_parameters(model), "memory": training_memory(model)}
        print(f"  {method:6s}: {rows[method]['parameters']['trainable']:,} trainable parameters, accuracy "
              f"{row['accuracy']['mean']:.1%}, {row['seconds_per_step'] * 1e3:.0f} ms/step")
    # Slower or stuck? The same LoRA given lora_longer times the steps (its schedule stretched to match).
    longer_steps = sizes["sft_steps"] * sizes["lora_longer"]
    model = copy.deepcopy(lab.model)
    apply_lora(model, LORA_RANK, LORA_ALPHA)
    longer = fine_tune(run, model.to(run.device).train(), split, tasks, vocab, longer_steps, LEARNING_RATE["LoRA"],
                       sizes["evaluations"])
    print(f"  LoRA with {longer_steps} steps: accuracy {longer['accuracy']['mean']:.1%}")
    fig, axes = panels(1, 2, width=5.6, title=f"Parameter-efficient fine-tuning, {sizes['sft_steps']} steps each",
                       constrained=True)
    for method, row in rows.items():
        axes[0].plot(row["curve"]["step"], row["curve"]["accuracy"], "o-", color=COLORS[method], label=method)
        axes[1].bar(method, row["memory"]["total"] / 2**20, color=COLORS[method])
        axes[1].annotate(f"{row['parameters']['trainable'] / 1e3:.0f}k trainable", (method, row["memory"]["total"] / 2**20),
                         ha="center", va="bottom", fontsize=8)
    axes[0].plot(longer["curve"]["step"], longer["curve"]["accuracy"], "o--", color=COLORS["LoRA"],
                 label=f"LoRA, {longer_steps} steps")
    axes[0].set(xlabel="fine-tuning step", ylabel="accuracy (greedy, exact)", ylim=(0, 1), title="accuracy")
    axes[0].legend(frameon=False)
    axes[1].set(ylabel="training memory (MiB)", title="weights + gradients + AdamW state, counted\n(activations excluded)")
    run.save(fig, "parameter_efficient")

    full, lora = rows["full"]["accuracy"]["mean"], rows["LoRA"]["accuracy"]["mean"]
    share = rows["LoRA"]["parameters"]["trainable"] / rows["full"]["parameters"]["trainable"]
    verdicts = {"lora_matches_full": {
        "claim": "LoRA matches full fine-tuning at a fraction of the trainable parameters",
        "threshold": f"accuracy within {LORA_GAP:.0%} at the same steps",
        "measured": f"LoRA r={LORA_RANK} {lora:.1%} with {share:.1%} of the trainable parameters vs full {full:.1%} "
                    f"({longer['accuracy']['mean']:.1%} with {longer_steps} steps)",
        "verdict": "holds" if lora >= full - LORA_GAP else "fails"}}
    insights = [f"PEFT: LoRA (r={LORA_RANK}) trains {share:.1%} of the parameters and reaches {lora:.1%} against full "
                f"fine-tuning's {full:.1%} ({longer['accuracy']['mean']:.1%} given {longer_steps} steps); QLoRA {rows['QLoRA']['accuracy']['mean']:.1%} on a 4-bit base; prefix "
                f"tuning ({rows['prefix']['parameters']['trainable']:,} parameters) {rows['prefix']['accuracy']['mean']:.1%}."]
    table = [{"method": m, "trainable": r["parameters"]["trainable"], "memory_bytes": r["memory"]["total"],
              "accuracy": r["accuracy"]["mean"], "ms_per_step": r["seconds_per_step"] * 1e3,
              "learning_rate": LEARNING_RATE[m]} for m, r in rows.items()]
    return {"rows": table, "curves": {m: r["curve"] for m, r in rows.items()},
            "lora_longer": {"steps": longer_steps, "accuracy": longer["accuracy"], "curve": longer["curve"]},
            "memory": {m: r["memory"] for m, r in rows.items()}, "insights": insights, "verdicts": verdicts}


def classification(run, sizes, lab) -> dict:
    """Speaker classification: frozen probe vs full fine-tune vs TF-IDF + logistic regression."""
    text, _ = load_corpus("auto")
    pieces = speaker_pieces(text, sizes["speakers"], sizes["per_speaker"], lab.model.config.context_length, run.seed)
    encode = lab.data.vocab.encode
    x_train, x_test = (torch.stack([encode(t) for t in texts]) for texts in (pieces.train_texts, pieces.test_texts))
    y_train, y_test = torch.from_numpy(pieces.train_labels), torch.from_numpy(pieces.test_labels)
    rows = {}
    for name, freeze in (("class head on the frozen model", True), ("whole model fine-tuned", False)):
        model = SequenceClassifier(copy.deepcopy(lab.model), len(pieces.names), freeze_backbone=freeze).to(run.device)
        batch_fn = classification_batch_fn({"train": (x_train, y_train), "val": (x_test, y_test)}, BATCH,
                                           torch.Generator().manual_seed(run.seed), run.device)
        schedule = short_schedule(sizes["classify_steps"], learning_rate=1e-2 if freeze else 3e-4)
        history = train(model, batch_fn, schedule, device=run.device, loss_fn=classification_loss)
        rows[name] = {"accuracy": classifier_accuracy(model, x_test, y_test), "val_loss": history.val_loss,
                      "eval_steps": history.eval_steps,
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    rows["TF-IDF + logistic regression"] = {"accuracy": tfidf_baseline(pieces.train_texts, pieces.train_labels,
                                                                        pieces.test_texts, pieces.test_labels)}
    for name, row in rows.items():
        print(f"  {name}: {row['accuracy']:.1%}")
    chance = 1 / len(pieces.names)
    fig, (ax,) = panels(width=7)
    bar(ax, list(rows), [r["accuracy"] for r in rows.values()], ylabel=f"accuracy on {len(y_test)} held-out pieces",
        title=f"Which of {len(pieces.names)} speakers? (pieces of {lab.model.config.context_length} characters)",
        annotate_fmt="{:.1%}")
    ax.axhline(chance, color="gray", linestyle="--", label=f"chance {chance:.0%}")
    ax.legend(frameon=False)
    ax.tick_params(axis="x", labelsize=8)
    run.save(fig, "classification")
    best_model = max(rows["class head on the frozen model"]["accuracy"], rows["whole model fine-tuned"]["accuracy"])
    tfidf = rows["TF-IDF + logistic regression"]["accuracy"]
    n = len(y_test)
    s_e = math.hypot(standard_error(best_model, n), standard_error(tfidf, n))
    verdicts = {"fine_tuned_head_beats_tfidf": {
        "claim": "a fine-tuned language model classifies better than TF-IDF + logistic regression",
        "threshold": f"best model - TF-IDF > {CLEARLY} s.e. (below by more: fails; else depends)",
        "measured": f"model {best_model:.1%} vs TF-IDF {tfidf:.1%} (chance {chance:.0%})",
        "verdict": "holds" if best_model - tfidf > CLEARLY * s_e else "fails" if tfidf - best_model > CLEARLY * s_e
        else "depends"}}
    insights = [f"Classification ({', '.join(pieces.names)}): " + ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in rows.items())
                + f" (chance {chance:.0%})."]
    return {"speakers": pieces.names, "train_pieces": len(y_train), "test_pieces": n, "rows": rows,
            "insights": insights, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- preferences
def sample_pairs(run, sizes, policy, task, vocab) -> tuple[list, dict]:
    """For each prompt, samples from the SFT policy; a correct (else the true) answer and a wrong one make a pair."""
    examples = make_examples({"reverse": task}, sizes["pair_prompts"], run.seed + 20_000, "dialogue", vocab)
    end_id = vocab.index[END]
    generator = torch.Generator(device=run.device).manual_seed(run.seed)
    pairs, correct_share, gold_used = [], [], 0
    for example in examples:
        ids, mask = sample_group(policy, list(example.prompt_ids), sizes["samples_per_prompt"], 10, end_id,
                                 RL_TEMPERATURE, generator)
        responses = [row[m].tolist() for row, m in zip(ids, mask)]
        marks = [task.check(example.prompt, vocab.decode(r)) for r in responses]
        correct_share.append(sum(marks) / len(marks))
        good = [r for r, ok in zip(responses, marks) if ok]
        bad = [r for r, ok in zip(responses, marks) if not ok]
        if bad:  # no sampled answer right: the true answer is the chosen one (as a human-written answer would be)
            gold_used += not good
            pairs.append(PreferencePair(list(example.prompt_ids), good[0] if good else list(example.answer_ids), bad[0]))
    return pairs, {"prompts": len(examples), "pairs": len(pairs), "pairs_with_the_true_answer_chosen": gold_used,
                   "sampled_accuracy": float(np.mean(correct_share))}


def preferences(run, sizes, lab, policy, tasks) -> tuple[dict, RewardModel]:
    """A Bradley-Terry reward model and DPO on pairs sampled from the SFT model."""
    vocab, task = lab.data.vocab, tasks["reverse"]
    pairs, sampled = sample_pairs(run, sizes, policy, task, vocab)
    if len(pairs) < 4:
        raise RuntimeError(f"only {len(pairs)} preference pairs: the SFT model is almost always right")
    cut = int(0.8 * len(pairs))
    train_pairs, test_pairs = pairs[:cut], pairs[cut:]
    generator = torch.Generator(device=run.device).manual_seed(run.seed)
    reward_model = RewardModel(policy).to(run.device)
    reward_history = train_reward_model(reward_model, train_pairs, sizes["preference_steps"], BATCH, 1e-4, generator)
    reward_test = reward_model_accuracy(reward_model, test_pairs)
    dpo_policy, reference = copy.deepcopy(policy), copy.deepcopy(policy).eval()
    split = {"test": make_examples({"reverse": task}, sizes["test_per_task"], run.seed + 10_000, "dialogue", vocab)}
    before = answer_accuracy(policy, split["test"], {"reverse": task}, vocab)["mean"]
    dpo_history = train_dpo(dpo_policy, reference, train_pairs, sizes["preference_steps"], BATCH, DPO_LEARNING_RATE,
                            DPO_BETA, generator)
    tail = dpo_history[-max(1, len(dpo_history) // 10):]  # log pi - log pi_ref of chosen and rejected, per answer
    chosen_shift = float(np.mean([h["chosen_reward"] for h in tail])) / DPO_BETA
    rejected_shift = float(np.mean([h["rejected_reward"] for h in tail])) / DPO_BETA
    dpo_test = dpo_accuracy(dpo_policy, reference, test_pairs, DPO_BETA)
    after = answer_accuracy(dpo_policy, split["test"], {"reverse": task}, vocab)["mean"]
    print(f"  {sampled['pairs']} pairs from {sampled['prompts']} prompts (sampled answers right {sampled['sampled_accuracy']:.1%}); "
          f"reward model held-out pair accuracy {reward_test['accuracy']:.1%}; DPO implicit-reward accuracy "
          f"{dpo_test['accuracy']:.1%}; reverse accuracy {before:.1%} -> {after:.1%} after DPO")
    fig, axes = panels(1, 2, width=5.6, title=f"Learning from {len(train_pairs)} preference pairs (correct vs wrong reverse)",
                       constrained=True)
    window = max(1, len(reward_history) // 10)

    for name, history in (("reward model (Bradley-Terry)", reward_history), (f"DPO (beta {DPO_BETA})", dpo_history)):
        axes[0].plot(moving_mean([h["loss"] for h in history], window), label=name)
        axes[1].plot(moving_mean([h["accuracy"] for h in history], window), label=name)
    axes[0].set(xlabel="step", ylabel=f"training loss ({window}-step mean)", title="loss")
    axes[1].set(xlabel="step", ylabel="pairs ranked right in the batch", ylim=(0, 1), title="pair accuracy (training batches)")
    axes[1].legend(frameon=False)
    run.save(fig, "preferences")
    insights = [f"Preferences: the reward model ranks {reward_test['accuracy']:.1%} of {len(test_pairs)} held-out pairs "
                f"right; DPO's implicit reward {dpo_test['accuracy']:.1%}; DPO moves reverse accuracy {before:.1%} -> "
                f"{after:.1%}, while the log-probability of the chosen answers changes by {chosen_shift:+.2f} nats and "
                f"of the rejected by {rejected_shift:+.2f} (last tenth of training)."]
    return {"sampling": sampled, "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
            "reward_model": {"held_out": reward_test, "history": reward_history[-1]},
            "dpo": {"beta": DPO_BETA, "learning_rate": DPO_LEARNING_RATE, "held_out": dpo_test,
                    "reverse_accuracy_before": before, "reverse_accuracy_after": after,
                    "chosen_log_prob_change": chosen_shift, "rejected_log_prob_change": rejected_shift},
            "insights": insights, "verdicts": {}}, reward_model


def rlhf(run, sizes, lab, policy, tasks, reward_model) -> dict:
    """GRPO on the exact reward at several KL coefficients; then on the reward model, KL off and on."""
    vocab, task = lab.data.vocab, tasks["reverse"]
    end_id = vocab.index[END]
    prompts_split = make_examples({"reverse": task}, sizes["pair_prompts"], run.seed + 30_000, "dialogue", vocab)
    prompt_of = {e.prompt_ids: e.prompt for e in prompts_split}
    prompts = [list(e.prompt_ids) for e in prompts_split]
    test = make_examples({"reverse": task}, sizes["rl_test_prompts"], run.seed + 40_000, "dialogue", vocab)

    def exact_reward(prompt, response):
        return float(task.check(prompt_of[tuple(prompt)], vocab.decode(response)))

    @torch.no_grad()
    def learned_reward(prompt, response):
        ids = torch.tensor([prompt + response], device=run.device)
        return reward_model(ids, torch.tensor([ids.shape[1]], device=run.device)).item()

    def run_rl(reward_fn, kl_coef, steps, every):
        model = copy.deepcopy(policy).train()
        generator = torch.Generator(device=run.device).manual_seed(run.seed)

        def on_step(step, current):
            if (step + 1) % every == 0 or step + 1 == steps:
                return {"test_accuracy": answer_accuracy(current, test, {"reverse": task}, vocab)["mean"]}
        history = train_rl(model, copy.deepcopy(policy).eval(), prompts, reward_fn, steps, sizes["rl_prompts_per_step"],
                           sizes["group_size"], kl_coef, RL_LEARNING_RATE, 10, end_id, RL_TEMPERATURE, generator,
                           on_step=on_step)
        return history

    start = answer_accuracy(policy, test, {"reverse": task}, vocab)["mean"]
    sweep = {}
    for kl_coef in sizes["kl_coefs"]:
        history = run_rl(exact_reward, kl_coef, sizes["rl_steps"], sizes["rl_steps"])
        tail = history[-max(1, len(history) // 4):]
        rewards = [h["reward_mean"] for h in tail]
        sweep[kl_coef] = {"reward": float(np.mean(rewards)), "reward_se": float(np.std(rewards) / math.sqrt(len(tail))),
                          "kl": float(np.mean([h["kl"] for h in tail])), "test_accuracy": history[-1]["test_accuracy"],
                          "curve": [{k: h[k] for k in ("step", "reward_mean", "kl")} for h in history]}
        print(f"  exact reward, kl_coef {kl_coef:<5}: reward {sweep[kl_coef]['reward']:.3f}, KL {sweep[kl_coef]['kl']:.3f} "
              f"nats/answer, greedy accuracy {start:.1%} -> {sweep[kl_coef]['test_accuracy']:.1%}")
    every = max(1, sizes["hacking_steps"] // 6)
    hacking = {}
    for kl_coef in (0.0, HACKING_KL):
        history = run_rl(learned_reward, kl_coef, sizes["hacking_steps"], every)
        hacking[kl_coef] = [{k: h[k] for k in ("step", "reward_mean", "kl", "test_accuracy") if k in h} for h in history]
        print(f"  reward model, kl_coef {kl_coef}: proxy reward {history[0]['reward_mean']:.2f} -> "
              f"{history[-1]['reward_mean']:.2f}, greedy accuracy {start:.1%} -> {history[-1]['test_accuracy']:.1%}")

    fig, axes = panels(1, 3, width=4.6, title="RLHF on reverse (GRPO-style), from the SFT model", constrained=True)
    coefs = list(sweep)
    axes[0].plot([sweep[c]["kl"] for c in coefs], [sweep[c]["reward"] for c in coefs], "o-")
    for c in coefs:
        axes[0].annotate(f"kl_coef {c:g}", (sweep[c]["kl"], sweep[c]["reward"]), fontsize=8, xytext=(4, -10),
                         textcoords="offset points")
    axes[0].set(xlabel="KL(policy || SFT model), nats per answer", ylabel="exact reward (mean of the last quarter)",
                title=f"exact reward: reward vs KL, {sizes['rl_steps']} steps")
    window = max(1, sizes["hacking_steps"] // 10)
    for kl_coef, history in hacking.items():
        scores = moving_mean([h["reward_mean"] for h in history], window)
        axes[1].plot(np.arange(window, len(history) + 1), scores, label=f"kl_coef {kl_coef:g}")
        measured = [(h["step"] + 1, h["test_accuracy"]) for h in history if "test_accuracy" in h]
        axes[2].plot([0] + [s for s, _ in measured], [start] + [a for _, a in measured], "o-", label=f"kl_coef {kl_coef:g}")
    axes[1].set(xlabel="RL step", ylabel=f"reward-model score ({window}-step mean)", title="reward model as the reward: its score")
    axes[2].set(xlabel="RL step", ylabel="greedy accuracy, exact (held-out prompts)", ylim=(0, 1),
                title="... and the true accuracy")
    for ax in axes[1:]:
        ax.legend(frameon=False)
    run.save(fig, "rlhf")

    low, high = min(coefs), max(coefs)
    reward_gap = sweep[low]["reward"] - sweep[high]["reward"]
    reward_clear = reward_gap > CLEARLY * math.hypot(sweep[low]["reward_se"], sweep[high]["reward_se"])
    kl_ordered = sweep[low]["kl"] > sweep[high]["kl"]
    free = hacking[0.0]
    quarter = max(1, len(free) // 4)
    proxy_rise = float(np.mean([h["reward_mean"] for h in free[-quarter:]]) - np.mean([h["reward_mean"] for h in free[:quarter]]))
    true_change = free[-1]["test_accuracy"] - start
    drop_needed = max(HACKED, CLEARLY * math.hypot(standard_error(start, len(test)),
                                                   standard_error(free[-1]["test_accuracy"], len(test))))
    verdicts = {
        "rlhf_trades_reward_for_kl": {
            "claim": "RLHF trades reward against staying close to the base model (KL)",
            "threshold": f"the smallest KL coefficient ends with more KL and more reward (by > {CLEARLY} s.e. of the "
                         "last-quarter means) than the largest; KL ordered but reward within noise: depends",
            "measured": f"kl_coef {low:g}: reward {sweep[low]['reward']:.3f}, KL {sweep[low]['kl']:.3f}; kl_coef {high:g}: "
                        f"reward {sweep[high]['reward']:.3f}, KL {sweep[high]['kl']:.3f}",
            "verdict": "holds" if kl_ordered and reward_clear else "depends" if kl_ordered else "fails"},
        "reward_hacking_without_kl": {
            "claim": "with the KL penalty off, optimising a learned reward hacks it",
            "threshold": f"the reward-model score (first vs last quarter) rises while the true accuracy ends below its "
                         f"start by >= {HACKED:.0%} and > {CLEARLY} s.e.",
            "measured": f"score {proxy_rise:+.2f}, true accuracy {start:.1%} -> {free[-1]['test_accuracy']:.1%} "
                        f"(needed drop {drop_needed:.1%}, {len(test)} prompts)",
            "verdict": "holds" if proxy_rise > 0 and true_change <= -drop_needed else "fails"}}
    insights = [f"RLHF: with the exact reward, kl_coef {low:g} reaches reward {sweep[low]['reward']:.2f} at KL "
                f"{sweep[low]['kl']:.2f} nats, kl_coef {high:g} {sweep[high]['reward']:.2f} at {sweep[high]['kl']:.2f}; "
                f"optimising the reward model with the KL off moves its score by {proxy_rise:+.2f} and the true "
                f"accuracy {start:.1%} -> {free[-1]['test_accuracy']:.1%}."]
    return {"start_accuracy": start, "sweep": {str(k): v for k, v in sweep.items()},
            "hacking": {str(k): v for k, v in hacking.items()}, "insights": insights, "verdicts": verdicts}


def gpt2_lora(run, sizes) -> dict:
    """LoRA on real GPT-2 small (from the local Hugging Face cache only) on Shakespeare: loss before and after."""
    try:
        hf_model, encode, _ = load_pretrained_gpt2(download=False)
    except RuntimeError as error:
        print(f"  skipped: {error}")
        return {"skipped": str(error), "insights": [], "verdicts": {}}
    model = miniformer_from_hf_gpt2(hf_model).to(run.device)
    text, _ = load_corpus("auto")
    ids = torch.tensor(encode(text[:400_000]))
    cut = int(0.9 * len(ids))
    generator = torch.Generator().manual_seed(run.seed)

    def batch_fn(split, length=128):
        data = ids[:cut] if split == "train" else ids[cut:]
        starts = torch.randint(len(data) - length - 1, (8,), generator=generator)
        window = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
        return window[:, :-1].to(run.device), window[:, 1:].to(run.device)

    before = evaluate(model, batch_fn, "val", 4)
    apply_lora(model, LORA_RANK, LORA_ALPHA, targets=("qkv", "out"))
    history = train(model, batch_fn, short_schedule(sizes["gpt2_steps"], learning_rate=LEARNING_RATE["LoRA"]),
                    device=run.device, loss_fn=next_token_loss)
    counts = count_parameters(model)
    print(f"  GPT-2 + LoRA: val loss {before:.3f} -> {history.final_val_loss:.3f} training {counts['trainable']:,} of "
          f"{counts['total']:,} parameters")
    return {"val_loss_before": before, "val_loss_after": history.final_val_loss, "parameters": counts,
            "insights": [f"GPT-2 small + LoRA on Shakespeare: val loss {before:.3f} -> {history.final_val_loss:.3f} "
                         f"training {counts['trainable'] / counts['total']:.2%} of the parameters."],
            "verdicts": {}}


def main():
    parser = demo_parser(__doc__)
    args = parser.parse_args()
    run = start_demo(args, __file__)
    sizes = SIZES["quick" if run.quick else "full"]
    lab = trained_lab_model(sizes["preset"], device=run.device, seed=run.seed)
    tasks = task_set()
    split = task_data(sizes, tasks, "dialogue", lab.data.vocab, run.seed)
    print(f"  {len(split['train'])} training and {len(split['test'])} test examples of {', '.join(tasks)}")

    print("\n1. SFT: pretrained vs from scratch")
    curves, sft_model = sft_curves(run, sizes, lab, tasks, split)
    print("\n2. instruction format and where the loss goes")
    formats = format_ablation(run, sizes, lab, tasks, curves["runs"]["pretrained"])
    print("\n3. a task never trained on")
    held_out = new_task(run, sizes, lab, tasks)
    print("\n4. full fine-tuning vs LoRA vs QLoRA vs prefix tuning")
    efficient = parameter_efficient(run, sizes, lab, tasks, split, curves["runs"]["pretrained"])
    print("\n5. classification: class head vs TF-IDF")
    classified = classification(run, sizes, lab)
    print("\n6. preferences: reward model and DPO")
    preferred, reward_model = preferences(run, sizes, lab, sft_model, tasks)
    print("\n7. RLHF: reward vs KL, and reward hacking")
    reinforced = rlhf(run, sizes, lab, sft_model, tasks, reward_model)
    print("\n8. LoRA on real GPT-2")
    gpt2 = gpt2_lora(run, sizes)

    print_table(efficient["rows"], title="Parameter-efficient fine-tuning")
    experiments = [curves, formats, held_out, efficient, classified, preferred, reinforced, gpt2]
    insights, verdicts = report_findings(experiments)
    run.finish({"sizes": sizes, "lab_model": lab.record, "tasks": list(tasks), "batch_size": BATCH,
                "learning_rates": LEARNING_RATE, "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA},
                "prefix_length": PREFIX_LENGTH, "sft_curves": curves, "format_ablation": formats, "new_task": held_out,
                "parameter_efficient": efficient, "classification": classified, "preferences": preferred,
                "rlhf": reinforced, "gpt2_lora": gpt2, "insights": insights, "verdicts": verdicts})


if __name__ == "__main__":
    main()
