"""Tests of the objectives: masking statistics against Hugging Face's DataCollatorForLanguageModeling, the
three visibility matrices against a hand-written rule and against what 04's model actually reads, loss
only where it belongs, span masking against its closed-form rate, and argument errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from objectives import (IGNORE_INDEX, CausalLM, MaskedLM, PrefixLM, VisibilityAttention, attention_visibility,
                        bidirectional_visibility, causal_visibility, corrupt, objective_loss, prefix_visibility,
                        select_spans, select_tokens)
from testing import require
from transformer import CausalSelfAttention, MiniFormer, TransformerConfig

VOCAB = 30  # ordinary tokens 0..29; [PAD] = 30 and [MASK] = 31 in the Hugging Face tokenizer below
MASK_ID = 31


def tiny_model(seed=0, **overrides) -> MiniFormer:
    settings = dict(vocab_size=MASK_ID + 1, context_length=16, num_layers=2, num_heads=2, embed_dim=16,
                    attention_module="visibility")
    settings.update(overrides)
    torch.manual_seed(seed)
    return MiniFormer(TransformerConfig(**settings)).eval()


def random_tokens(batch, length, seed=0, high=VOCAB):
    return torch.randint(0, high, (batch, length), generator=torch.Generator().manual_seed(seed))


def masking_statistics(original, corrupted, selected) -> dict:
    """Fraction selected; among the selected: fraction [MASK], changed to another token, left as it was."""
    chosen = selected.sum().item()
    return {"selected": chosen / original.numel(),
            "masked": (corrupted[selected] == MASK_ID).sum().item() / chosen,
            "random": ((corrupted[selected] != MASK_ID) & (corrupted[selected] != original[selected])).sum().item() / chosen,
            "unchanged": (corrupted[selected] == original[selected]).sum().item() / chosen}


# ------------------------------------------------------------------------------------------------
# Masking statistics == Hugging Face's collator at the same probability
# ------------------------------------------------------------------------------------------------

def hf_collator(rate, seed):
    require("tokenizers")
    transformers = require("transformers")
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)} | {"[PAD]": VOCAB, "[MASK]": MASK_ID}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                                     mask_token="[MASK]", pad_token="[PAD]")
    assert tokenizer.mask_token_id == MASK_ID and len(tokenizer) == MASK_ID + 1
    return transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=rate, seed=seed)


@pytest.mark.parametrize("rate", [0.15, 0.4])
def test_masking_statistics_match_hugging_face_collator(rate):
    tokens = random_tokens(400, 128, seed=1)  # 51,200 positions
    collator = hf_collator(rate, seed=0)
    hf_inputs, hf_labels = collator.torch_mask_tokens(tokens.clone(), special_tokens_mask=torch.zeros_like(tokens))
    hf = masking_statistics(tokens, hf_inputs, hf_labels != -100)
    # Hugging Face draws random replacements from all len(tokenizer) ids; so do we here.
    objective = MaskedLM(mask_id=MASK_ID, vocab_size=MASK_ID + 1, rate=rate, seed=0)
    batch = objective.make_batch(tokens, None)
    ours = masking_statistics(tokens, batch.inputs, batch.targets != IGNORE_INDEX)
    # Expected values: a random replacement equals the original (or is [MASK]) with probability 1/32 each.
    expected = {"selected": rate, "masked": 0.8 + 0.1 / 32, "random": 0.1 * 30 / 32, "unchanged": 0.1 + 0.1 / 32}
    for key, p in expected.items():
        n = tokens.numel() if key == "selected" else tokens.numel() * rate
        standard_error = math.sqrt(p * (1 - p) / n)
        # each within 4 standard errors of the expectation, and of each other (difference of two: sqrt(2) x)
        assert abs(ours[key] - p) < 4 * standard_error, (key, ours[key], p)
        assert abs(hf[key] - p) < 4 * standard_error, (key, hf[key], p)
        assert abs(ours[key] - hf[key]) < 4 * math.sqrt(2) * standard_error, (key, ours[key], hf[key])


def test_masked_positions_per_sequence_vary_like_hugging_face():
    """Independent per-token choices: the count per sequence has the binomial variance, in both."""
    rate, length = 0.15, 64
    tokens = random_tokens(3000, length, seed=2)
    _, hf_labels = hf_collator(rate, seed=1).torch_mask_tokens(tokens.clone(), special_tokens_mask=torch.zeros_like(tokens))
    ours = select_tokens(tokens.shape, rate, torch.Generator().manual_seed(3))
    binomial_variance = length * rate * (1 - rate)
    for counts in ((hf_labels != -100).sum(1).float(), ours.sum(1).float()):
        assert abs(counts.var().item() / binomial_variance - 1) < 0.1  # 3000 sequences: sd of the ratio ~0.03


def test_protected_positions_are_never_selected():
    protected = torch.zeros(50, 40, dtype=torch.bool)
    protected[:, :5] = True
    for selected in (select_tokens((50, 40), 0.9, protected=protected), select_spans((50, 40), 0.9, 4, protected=protected)):
        assert not selected[:, :5].any() and selected[:, 5:].any()


def test_corrupt_hand_example_and_extremes():
    tokens = torch.tensor([[1, 2, 3, 4]])
    selected = torch.tensor([[True, False, True, False]])
    assert corrupt(tokens, selected, MASK_ID, VOCAB, mask_fraction=1.0, random_fraction=0.0).tolist() == [[MASK_ID, 2, MASK_ID, 4]]
    assert corrupt(tokens, selected, MASK_ID, VOCAB, mask_fraction=0.0, random_fraction=0.0).tolist() == [[1, 2, 3, 4]]


# ------------------------------------------------------------------------------------------------
# Span masking
# ------------------------------------------------------------------------------------------------

def interior_run_lengths(selected: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs of True in each row that touch neither end (a span cut by the edge is shorter)."""
    lengths = []
    for row in selected.tolist():
        start = None
        for t, value in enumerate(row + [False]):
            if value and start is None:
                start = t
            elif not value and start is not None:
                if start > 0 and t < len(row):
                    lengths.append(t - start)
                start = None
    return torch.tensor(lengths, dtype=torch.float)


@pytest.mark.parametrize("rate, span_length", [(0.15, 3), (0.4, 5), (0.15, 1)])
def test_span_masking_rate_equals_closed_form_and_runs_are_long(rate, span_length):
    selected = select_spans((2000, 64), rate, span_length, torch.Generator().manual_seed(0))
    # Positions within a span are correlated: the per-sequence fraction's spread gives the standard error.
    per_sequence = selected.float().mean(1)
    standard_error = per_sequence.std().item() / math.sqrt(len(per_sequence))
    assert abs(per_sequence.mean().item() - rate) < 4 * standard_error
    assert abs(selected[:, 0].float().mean().item() - rate) < 4 * math.sqrt(rate * (1 - rate) / 2000)  # no edge effect
    # Token masking's runs are geometric with mean 1 / (1 - rate); spans make them at least span_length long.
    runs = interior_run_lengths(selected)
    assert runs.min() >= span_length
    if span_length == 1:
        assert abs(runs.mean().item() - 1 / (1 - rate)) < 0.05


# ------------------------------------------------------------------------------------------------
# Visibility matrices and what the model actually reads
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [0, 1, 3, 7, 8])
def test_prefix_visibility_is_bidirectional_exactly_over_the_prefix(prefix):
    length = 8
    matrix = prefix_visibility(torch.tensor([prefix]), length)[0]
    for i in range(length):
        for j in range(length):
            assert matrix[i, j].item() == (j <= i or (i < prefix and j < prefix) or j < prefix)
    assert torch.equal(prefix_visibility(torch.tensor([0, 1]), length)[0], causal_visibility(length))
    assert torch.equal(prefix_visibility(torch.tensor([length]), length)[0], bidirectional_visibility(length))


def which_outputs_change(model, tokens, visibility) -> torch.Tensor:
    """(T, T) bool: entry [i, j] is True when changing input token j changes the model's output at position i."""
    T = tokens.shape[1]
    with torch.no_grad(), attention_visibility(model, visibility):
        base = model(tokens)
        changed = torch.zeros(T, T, dtype=torch.bool)
        for j in range(T):
            edited = tokens.clone()
            edited[0, j] = (edited[0, j] + 1) % VOCAB
            changed[:, j] = (model(edited) - base)[0].abs().amax(-1) > 1e-6
    return changed


@pytest.mark.parametrize("prefix", [1, 5, 12])
def test_model_outputs_depend_exactly_on_the_prefix_mask(prefix):
    """Outputs inside the prefix read the whole prefix (also later prefix tokens) but nothing after it;
    outputs after it read the prefix and their own past. Measured by editing one input at a time."""
    model, tokens = tiny_model(), random_tokens(1, 12, seed=4)
    visibility = prefix_visibility(torch.tensor([prefix]), 12)
    assert torch.equal(which_outputs_change(model, tokens, visibility), visibility[0])


def test_bidirectional_and_default_masks_in_the_model():
    model, tokens = tiny_model(), random_tokens(1, 10, seed=5)
    assert which_outputs_change(model, tokens, bidirectional_visibility(10)).all()
    assert torch.equal(which_outputs_change(model, tokens, None), causal_visibility(10))


def test_visibility_attention_without_a_mask_equals_causal_attention_and_sdpa_equals_scratch():
    tokens = random_tokens(2, 16, seed=6)
    plain = tiny_model(attention_module="causal")
    ours = tiny_model()
    ours.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), plain(tokens))
        scratch = tiny_model(attention="scratch")
        scratch.load_state_dict(plain.state_dict())
        visibility = prefix_visibility(torch.tensor([4, 9]), 16)
        with attention_visibility(ours, visibility), attention_visibility(scratch, visibility):
            torch.testing.assert_close(ours(tokens), scratch(tokens))
    assert all(layer.visibility is None for layer in ours.modules() if isinstance(layer, VisibilityAttention))


def test_generation_still_works_with_the_visibility_attention():
    model = tiny_model()
    assert isinstance(model.blocks[0].attn, CausalSelfAttention)
    out = model.generate(random_tokens(1, 3), 5, temperature=0.0)
    assert out.shape == (1, 8)


# ------------------------------------------------------------------------------------------------
# Loss only where it belongs
# ------------------------------------------------------------------------------------------------

def loss_gradient_positions(model, batch) -> torch.Tensor:
    """(B, T) bool: positions whose logits receive a gradient from the objective's loss."""
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.head.register_forward_hook(keep)
    objective_loss(model, batch).backward()
    handle.remove()
    return captured["logits"].grad.abs().amax(-1) > 0


def test_causal_loss_everywhere_equals_plain_cross_entropy():
    model, x, y = tiny_model(), random_tokens(3, 16), random_tokens(3, 16, seed=1)
    batch = CausalLM().make_batch(x, y)
    assert loss_gradient_positions(model, batch).all()
    with torch.no_grad():
        reference = F.cross_entropy(model(x).reshape(-1, MASK_ID + 1), y.reshape(-1))
        torch.testing.assert_close(objective_loss(model, batch), reference)


def test_masked_loss_only_on_selected_positions_and_reads_the_corrupted_input():
    model, x = tiny_model(), random_tokens(4, 16)
    batch = MaskedLM(MASK_ID, VOCAB, rate=0.3, seed=2).make_batch(x, None)
    selected = batch.targets != IGNORE_INDEX
    assert torch.equal(loss_gradient_positions(model, batch), selected)
    assert torch.equal(batch.targets[selected], x[selected])  # the targets are the original tokens
    with torch.no_grad(), attention_visibility(model, bidirectional_visibility(16)):
        logits = model(batch.inputs)
    manual = F.cross_entropy(logits[selected], x[selected])
    torch.testing.assert_close(objective_loss(model, batch).detach(), manual)


def test_prefix_loss_starts_at_the_last_prefix_position():
    model, x, y = tiny_model(), random_tokens(3, 16), random_tokens(3, 16, seed=1)
    prefix = torch.tensor([1, 6, 16])
    batch = PrefixLM().make_batch(x, y, prefix_lengths=prefix)
    expected = torch.arange(16)[None, :] >= prefix[:, None] - 1  # position P-1 predicts the first hidden token
    assert torch.equal(batch.targets != IGNORE_INDEX, expected)
    assert torch.equal(loss_gradient_positions(model, batch), expected)
    assert torch.equal(batch.visibility, prefix_visibility(prefix, 16))


def test_prefix_lengths_cover_the_requested_range():
    objective = PrefixLM(0.25, 0.75, seed=0)
    lengths = objective.prefix_lengths(5000, 64)
    assert lengths.min() == 16 and lengths.max() == 48


# ------------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, name", [
    (lambda: MaskedLM(MASK_ID, VOCAB, rate=0.0), "rate"),
    (lambda: MaskedLM(MASK_ID, VOCAB, rate=1.5), "rate"),
    (lambda: MaskedLM(MASK_ID, VOCAB, rate=float("nan")), "rate"),
    (lambda: MaskedLM(MASK_ID, VOCAB, strategy="word"), "strategy"),
    (lambda: MaskedLM(MASK_ID, VOCAB, span_length=0), "span_length"),
    (lambda: MaskedLM(MASK_ID, 0), "vocab_size"),
    (lambda: MaskedLM(-1, VOCAB), "mask_id"),
    (lambda: MaskedLM(MASK_ID, VOCAB, mask_fraction=0.95, random_fraction=0.1), r"mask_fraction \+ random_fraction"),
    (lambda: MaskedLM(MASK_ID, VOCAB, random_fraction=-0.1), "random_fraction"),
    (lambda: PrefixLM(0.8, 0.2), "min_prefix_fraction"),
    (lambda: PrefixLM(0.1, 1.2), "max_prefix_fraction"),
    (lambda: select_spans((2, 8), 0.2, 2.5), "span_length"),
    (lambda: causal_visibility(0), "length"),
    (lambda: prefix_visibility(torch.tensor([9]), 8), "prefix_lengths"),
    (lambda: attention_visibility(tiny_model(attention_module="causal"), None).__enter__(), "visibility"),
    (lambda: attention_visibility(tiny_model(), torch.ones(4, 4)).__enter__(), "visibility"),
])
def test_bad_arguments_raise_value_error_naming_them(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_visibility_of_the_wrong_length_is_refused():
    model = tiny_model()
    with attention_visibility(model, causal_visibility(5)), pytest.raises(ValueError, match="visibility"):
        model(random_tokens(1, 6))
