"""Supervised fine-tuning (SFT): teach a pretrained lab model to answer instructions.

An example is an instruction and its answer (the demo writes 16's task prompts as words). A template renders
the instruction as text in the model's own vocabulary, and the model learns to continue it with the answer
and an end marker (a newline):

    plain      "reverse abc cba\\n"
    dialogue   "QUESTION:\\nreverse abc\\n\\nANSWER:\\ncba\\n"    (the corpus's own 'SPEAKER:\\nspeech' layout)

The loss is next-token cross-entropy on the response only: the targets of prompt positions are IGNORE
(-100, which F.cross_entropy skips), so the model learns to produce answers, not instructions:

    L = -1/|R| * sum_{t in R} log p(x_{t+1} | x_{<=t}),   R = the positions whose next token is answer or END

(loss_on="all" trains on every position instead: the ablation). Batches are right-padded: in a causal model
the padding after a sequence cannot change what its earlier positions see, so no attention mask is needed.
Evaluation is exact: a greedy completion, cut at its first END, graded by the task's own checker (16).

Contents: IGNORE, TEMPLATES, SFTExample, encode_example, make_batch, sft_batch_fn, answer_accuracy.
"""

from dataclasses import dataclass

import torch

IGNORE = -100  # F.cross_entropy's default ignore_index
TEMPLATES = {
    "plain": "{instruction} ",
    "dialogue": "QUESTION:\n{instruction}\n\nANSWER:\n",
}
LOSS_ON = ("response", "all")


@dataclass(frozen=True)
class SFTExample:
    task: str  # the task's name, to find its checker
    prompt: str  # 16's prompt, what the checker grades against
    prompt_ids: tuple  # the rendered instruction, token ids
    answer_ids: tuple  # the answer and END, token ids

    @property
    def ids(self) -> tuple:
        return self.prompt_ids + self.answer_ids


def encode_example(task: str, prompt: str, instruction: str, answer: str, template: str, vocab, max_length: int,
                   end: str = "\n") -> SFTExample:
    """Render `instruction` with `template` and encode it, and answer + end, with the model's vocabulary;
    together they must fit in max_length tokens (the model's context). `prompt` is what the task's checker
    grades against (16's own prompt), kept beside the rendered text."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {template!r}")
    prompt_text = TEMPLATES[template].format(instruction=instruction)
    prompt_ids, answer_ids = (tuple(vocab.encode(text).tolist()) for text in (prompt_text, answer + end))
    if len(prompt_ids) + len(answer_ids) > max_length:
        raise ValueError(f"example {prompt!r} takes {len(prompt_ids) + len(answer_ids)} tokens with the "
                         f"{template} template; max_length (the context) is {max_length}")
    return SFTExample(task, prompt, prompt_ids, answer_ids)


def make_batch(examples: list, pad_id: int, loss_on: str = "response", device="cpu") -> tuple:
    """Inputs x (B, T) and targets y (B, T) for next-token training, right-padded to the longest example:
    y is IGNORE on padding and, with loss_on="response", on every position that predicts a prompt token."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if not examples:
        raise ValueError("examples must be non-empty")
    length = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), length), pad_id, dtype=torch.long)
    y = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.ids)
        x[row, :len(ids) - 1], y[row, :len(ids) - 1] = ids[:-1], ids[1:]
        if loss_on == "response":
            y[row, :len(example.prompt_ids) - 1] = IGNORE  # position t predicts token t + 1
    return x.to(device), y.to(device)


def sft_batch_fn(splits: dict, batch_size: int, pad_id: int, generator: torch.Generator, loss_on: str = "response",
                 device="cpu"):
    """batch_fn(split) -> (x, y) of batch_size examples drawn at random from splits[split], for 00_utils' train."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not splits or any(not examples for examples in splits.values()):
        raise ValueError(f"every split must hold examples, got sizes { {k: len(v) for k, v in splits.items()} }")

    def batch_fn(split: str):
        if split not in splits:
            raise ValueError(f"split must be one of {tuple(splits)}, got {split!r}")
        rows = torch.randint(len(splits[split]), (batch_size,), generator=generator).tolist()
        return make_batch([splits[split][i] for i in rows], pad_id, loss_on, device)

    return batch_fn


@torch.no_grad()
def answer_accuracy(model, examples: list, tasks: dict, vocab, chunk: int = 256) -> dict:
    """Greedy answers to every example, graded by its task's checker (tasks[name].check(prompt, completion),
    as 16's tasks have, which cuts the completion at END): {task name: accuracy, "mean": ...}.
    Prompts of one length are generated as one batch (no padding needed); the model's mode is restored."""
    if not examples:
        raise ValueError("examples must be non-empty")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    by_length: dict = {}
    for example in examples:
        by_length.setdefault(len(example.prompt_ids), []).append(example)
    correct: dict = {name: [] for name in dict.fromkeys(e.task for e in examples)}
    for group in by_length.values():
        for start in range(0, len(group), chunk):
            part = group[start:start + chunk]
            prompts = torch.tensor([e.prompt_ids for e in part], device=device)
            new_tokens = max(len(e.answer_ids) for e in part)
            completions = model.generate(prompts, new_tokens, temperature=0.0)[:, prompts.shape[1]:]
            for example, completion in zip(part, completions.tolist()):
                correct[example.task].append(tasks[example.task].check(example.prompt, vocab.decode(completion)))
    model.train(was_training)
    accuracy = {name: sum(marks) / len(marks) for name, marks in correct.items()}
    accuracy["mean"] = sum(accuracy.values()) / len(accuracy)
    return accuracy
