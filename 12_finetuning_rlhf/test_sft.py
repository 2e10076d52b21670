"""SFT: rendering, response-only targets, padding that changes nothing, and exact greedy grading."""

import pytest
import torch
import torch.nn.functional as F

from data import CharVocab
from sft import IGNORE, TEMPLATES, answer_accuracy, encode_example, make_batch, sft_batch_fn
from synthetic_tasks import make_task
from transformer import MiniFormer, TransformerConfig

VOCAB = CharVocab("abcdefghijklmnopqrstuvwxyz :,\nQUESTIONANSWER")
END_ID = VOCAB.index["\n"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MiniFormer(TransformerConfig(vocab_size=VOCAB.size, context_length=48, num_layers=2, num_heads=2,
                                        embed_dim=32)).eval()


def example(prompt="copy:abc=", instruction="copy abc", answer="abc", template="dialogue", max_length=48):
    return encode_example("copy", prompt, instruction, answer, template, VOCAB, max_length)


def test_encoding_is_the_rendered_text_then_answer_and_end():
    for template, text in TEMPLATES.items():
        e = example(template=template)
        assert VOCAB.decode(e.prompt_ids) == text.format(instruction="copy abc")
        assert VOCAB.decode(e.answer_ids) == "abc\n" and e.ids == e.prompt_ids + e.answer_ids
    assert VOCAB.decode(example(template="dialogue").prompt_ids) == "QUESTION:\ncopy abc\n\nANSWER:\n"


def test_response_only_targets_ignore_exactly_the_prompt_predictions_and_the_padding():
    short, long = example(), example("copy:abcdefgh=", "copy abcdefgh", "abcdefgh")
    x, y = make_batch([short, long], pad_id=END_ID, loss_on="response")
    assert x.shape == y.shape == (2, len(long.ids) - 1)
    for row, e in enumerate((short, long)):
        ids, P = torch.tensor(e.ids), len(e.prompt_ids)
        assert torch.equal(x[row, :len(ids) - 1], ids[:-1])
        assert (x[row, len(ids) - 1:] == END_ID).all()  # right padding
        # position t predicts token t + 1: the first answer token is predicted at P - 1
        assert (y[row, :P - 1] == IGNORE).all() and torch.equal(y[row, P - 1:len(ids) - 1], ids[P:])
        assert (y[row, len(ids) - 1:] == IGNORE).all()
    _, y_all = make_batch([short, long], END_ID, loss_on="all")
    assert torch.equal(y_all[1], torch.tensor(long.ids[1:]))


def test_batched_padded_loss_equals_the_loss_of_each_example_alone():
    """Right padding in a causal model changes nothing: the batch's response loss equals the token-weighted
    mean of each example's response loss computed without any padding."""
    model = tiny_model()
    examples = [example(), example("copy:abcdefgh=", "copy abcdefgh", "abcdefgh"), example("copy:z=", "copy z", "z")]
    x, y = make_batch(examples, END_ID)
    batched = F.cross_entropy(model(x).flatten(0, 1), y.flatten())  # IGNORE is cross_entropy's ignore_index
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e.ids])
        log_probs = F.log_softmax(model(ids[:, :-1]), dim=-1)[0]
        for t in range(len(e.prompt_ids) - 1, len(e.ids) - 1):
            total -= log_probs[t, e.ids[t + 1]].item()
            count += 1
    assert batched.item() == pytest.approx(total / count, rel=1e-5)


def test_batches_are_seeded_and_splits_checked():
    splits = {"train": [example(), example("copy:xy=", "copy xy", "xy")], "val": [example()]}
    first = sft_batch_fn(splits, 4, END_ID, torch.Generator().manual_seed(3))("train")
    again = sft_batch_fn(splits, 4, END_ID, torch.Generator().manual_seed(3))("train")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with pytest.raises(ValueError, match="split"):
        sft_batch_fn(splits, 4, END_ID, torch.Generator())("test")
    with pytest.raises(ValueError, match="split"):
        sft_batch_fn({"train": []}, 4, END_ID, torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        sft_batch_fn(splits, 0, END_ID, torch.Generator())


class Answering(torch.nn.Module):
    """A stand-in model whose greedy 'generation' is a fixed function of the prompt text."""

    def __init__(self, answer_of):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answer_of = answer_of

    def generate(self, prompts, max_new_tokens, temperature):
        assert temperature == 0.0
        rows = []
        for row in prompts.tolist():
            text = (self.answer_of(VOCAB.decode(row)) + "\n" * max_new_tokens)[:max_new_tokens]
            rows.append(row + VOCAB.encode(text).tolist())
        return torch.tensor(rows)


def test_accuracy_grades_with_each_tasks_checker_across_prompt_lengths():
    tasks = {"copy": make_task("copy"), "reverse": make_task("reverse")}
    examples = [encode_example(name, f"{name}:{payload}=", f"{name} {payload}", tasks[name].solve(f"{name}:{payload}="),
                               "plain", VOCAB, 48) for name in tasks for payload in ("ab", "xyz", "q")]
    always_copies = Answering(lambda text: text.split()[1])  # 'reverse ab ' -> 'ab'
    accuracy = answer_accuracy(always_copies, examples, tasks, VOCAB)
    # copying is right for copy, and for reverse only when the payload is a palindrome ('q')
    assert accuracy == {"copy": 1.0, "reverse": pytest.approx(1 / 3), "mean": pytest.approx(2 / 3)}


def test_a_real_models_answers_are_its_greedy_continuations():
    """answer_accuracy batches prompts of one length and generates with the model: a checker that accepts
    exactly the continuation a hand-written greedy loop produces must give accuracy 1."""
    model, task = tiny_model(1), make_task("copy", max_length=4)
    examples = [encode_example("copy", e.prompt, "copy " + e.prompt[5:-1], e.answer, "dialogue", VOCAB, 48)
                for e in task.examples(12, seed=2)]
    greedy = {}
    for e in examples:
        ids = list(e.prompt_ids)
        for _ in range(len(e.answer_ids)):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        greedy[e.prompt] = VOCAB.decode(ids[len(e.prompt_ids):])

    class MatchesGreedy:
        def check(self, prompt, completion):
            return completion == greedy[prompt]

    assert answer_accuracy(model, examples, {"copy": MatchesGreedy()}, VOCAB, chunk=5)["copy"] == 1.0


@pytest.mark.parametrize("call, name", [
    (lambda: example(template="chat"), "template"),
    (lambda: example(max_length=10), "max_length"),
    (lambda: make_batch([example()], END_ID, loss_on="prompt"), "loss_on"),
    (lambda: make_batch([], END_ID), "examples"),
    (lambda: answer_accuracy(tiny_model(), [], {}, VOCAB), "examples"),
])
def test_bad_arguments_name_themselves(call, name):
    with pytest.raises(ValueError, match=name):
        call()
