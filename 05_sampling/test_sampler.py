"""Tests for sampler.py: every filter equals Hugging Face's logits processor on the same logits (ties and
min_tokens_to_keep included), sampling and beam search equal Hugging Face generate() on the same GPT-2
weights, hand-computed cases, properties, a frequency test with a 5-sigma binomial tolerance, bad values."""

import itertools
import math

import pytest
import torch

from hf_interop import miniformer_from_hf_gpt2
from sampler import (PRESETS, BeamSearchResult, Sampler, SamplingConfig, apply_repetition_penalty, apply_temperature,
                     beam_search, effective_vocabulary, entropy, min_p_filter, next_token_probabilities, process_logits,
                     top_k_filter, top_p_filter)
from testing import require
from transformer import MiniFormer, TransformerConfig

V = 50


def random_logits(rows: int = 6, vocab: int = V, seed: int = 0) -> torch.Tensor:
    """Random logits (rows, vocab) with a row of integer values (many ties), a flat row, and a peaked row."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(rows, vocab, generator=generator)
    logits[1] = torch.randint(-3, 4, (vocab,), generator=generator).float()  # ties everywhere, also at boundaries
    logits[2] = 0.0  # all tied
    logits[3, 7] += 12.0  # one near-certain token
    return logits


def random_tokens(rows: int = 6, length: int = 12, vocab: int = V, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits_processors():
    return require("transformers.generation.logits_process")


# ------------------------------------------------------------------------------------------------
# Each filter equals its Hugging Face counterpart on the same logits
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 1.5, 3.0])
def test_temperature_equals_hugging_face(temperature):
    hf = logits_processors()
    logits, tokens = random_logits(), random_tokens()
    expected = hf.TemperatureLogitsWarper(temperature)(tokens, logits.clone())
    torch.testing.assert_close(apply_temperature(logits, temperature), expected, rtol=0, atol=0)


@pytest.mark.parametrize("top_k, min_tokens_to_keep", [(1, 1), (3, 1), (10, 1), (V, 1), (V + 10, 1), (1, 5), (4, 9)])
def test_top_k_equals_hugging_face(top_k, min_tokens_to_keep):
    hf = logits_processors()
    logits, tokens = random_logits(), random_tokens()
    expected = hf.TopKLogitsWarper(top_k, min_tokens_to_keep=min_tokens_to_keep)(tokens, logits.clone())
    assert torch.equal(top_k_filter(logits, top_k, min_tokens_to_keep), expected)


@pytest.mark.parametrize("top_p, min_tokens_to_keep", [(0.05, 1), (0.3, 1), (0.5, 1), (0.9, 1), (0.99, 1), (1.0, 1),
                                                      (0.3, 4), (0.9, 20)])
def test_top_p_equals_hugging_face(top_p, min_tokens_to_keep):
    hf = logits_processors()
    for seed in range(5):
        logits, tokens = random_logits(seed=seed), random_tokens()
        expected = hf.TopPLogitsWarper(top_p, min_tokens_to_keep=min_tokens_to_keep)(tokens, logits.clone())
        assert torch.equal(top_p_filter(logits, top_p, min_tokens_to_keep), expected)


@pytest.mark.parametrize("min_p, min_tokens_to_keep", [(0.0, 1), (0.01, 1), (0.1, 1), (0.5, 1), (1.0, 1), (0.5, 3),
                                                      (1.0, 6)])
def test_min_p_equals_hugging_face(min_p, min_tokens_to_keep):
    hf = logits_processors()
    for seed in range(5):
        logits, tokens = random_logits(seed=seed), random_tokens()
        expected = hf.MinPLogitsWarper(min_p, min_tokens_to_keep=min_tokens_to_keep)(tokens, logits.clone())
        assert torch.equal(min_p_filter(logits, min_p, min_tokens_to_keep), expected)


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.2, 2.0])
def test_repetition_penalty_equals_hugging_face(penalty):
    hf = logits_processors()
    logits, tokens = random_logits(), random_tokens(length=30)  # tokens repeat within a row
    expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(tokens, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, tokens, penalty), expected)


@pytest.mark.parametrize("config", [
    SamplingConfig(repetition_penalty=1.3, temperature=0.7, top_k=10, top_p=0.9, min_p=0.05),
    SamplingConfig(repetition_penalty=0.8, temperature=1.8, top_k=30, top_p=0.6, min_p=0.2, min_tokens_to_keep=3),
    PRESETS["focused"], PRESETS["creative"],
])
def test_pipeline_equals_hugging_face_processor_list(config):
    """Our one order (penalty, temperature, top-k, top-p, min-p) chained with HF's own processors."""
    hf = logits_processors()
    chain = hf.LogitsProcessorList([
        hf.RepetitionPenaltyLogitsProcessor(float(config.repetition_penalty)),
        hf.TemperatureLogitsWarper(float(config.temperature)),
        hf.TopKLogitsWarper(config.top_k, min_tokens_to_keep=config.min_tokens_to_keep),
        hf.TopPLogitsWarper(config.top_p, min_tokens_to_keep=config.min_tokens_to_keep),
        hf.MinPLogitsWarper(config.min_p, min_tokens_to_keep=config.min_tokens_to_keep)])
    for seed in range(3):
        logits, tokens = random_logits(seed=seed), random_tokens(length=20, seed=seed)
        assert torch.equal(process_logits(logits, tokens, config), chain(tokens, logits.clone()))


# ------------------------------------------------------------------------------------------------
# Sampling and beam search equal Hugging Face generate() on the same random GPT-2 weights (04's interop)
# ------------------------------------------------------------------------------------------------

def gpt2_pair(vocab: int = 23, seed: int = 0):
    """A random-weight transformers GPT-2 (weights perturbed so the logits are far from uniform) and the same
    weights in 04's MiniFormer. Token 1 is the eos token of the beam-search tests."""
    transformers = require("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return hf_model, miniformer_from_hf_gpt2(hf_model)


@pytest.mark.parametrize("config", [SamplingConfig(), SamplingConfig(temperature=0.6, top_k=5),
                                    SamplingConfig(temperature=1.3, top_p=0.8, repetition_penalty=1.4),
                                    SamplingConfig(min_p=0.1, repetition_penalty=0.9), PRESETS["focused"],
                                    PRESETS["deterministic"]])
def test_sampling_through_generate_equals_hugging_face(config):
    """04's generate with our Sampler draws the same tokens as HF's sampling loop: both call
    torch.multinomial on the global generator once per step, on the same distribution."""
    hf_model, ours = gpt2_pair()
    prompt = torch.randint(0, 23, (3, 4), generator=torch.Generator().manual_seed(5))
    settings = dict(do_sample=not config.greedy, top_k=config.top_k or 0, top_p=config.top_p, min_p=config.min_p or None,
                    repetition_penalty=config.repetition_penalty, eos_token_id=None, pad_token_id=0)
    if not config.greedy:
        settings["temperature"] = config.temperature
    torch.manual_seed(123)
    expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, **settings)
    torch.manual_seed(123)
    actual = ours.generate(prompt, 20, sampler=Sampler(config))
    assert torch.equal(actual, expected)


BEAM_CASES = [dict(num_beams=3, length_penalty=1.0, early_stopping=False, eos_token_id=1),
              dict(num_beams=3, length_penalty=0.0, early_stopping=True, eos_token_id=1),
              dict(num_beams=4, length_penalty=2.0, early_stopping="never", eos_token_id=1),
              dict(num_beams=2, length_penalty=-1.0, early_stopping=False, eos_token_id=1),
              dict(num_beams=4, length_penalty=1.0, early_stopping=True, eos_token_id=None),
              dict(num_beams=1, length_penalty=1.0, early_stopping=False, eos_token_id=1)]


def hf_beam_search(hf_model, prompt, max_new_tokens, case):
    output = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=max_new_tokens, num_beams=case["num_beams"],
                               length_penalty=case["length_penalty"], early_stopping=case["early_stopping"],
                               eos_token_id=case["eos_token_id"], pad_token_id=0, return_dict_in_generate=True,
                               output_scores=True)
    return output.sequences, getattr(output, "sequences_scores", None)  # num_beams=1 runs HF's greedy path


def assert_same_beams(result: BeamSearchResult, sequences, scores, num_beams):
    for row, ours in enumerate(result.sequences):
        # HF pads every row to the longest; a row that finished earlier continues with padding
        assert torch.equal(sequences[row, :len(ours)], ours), (ours.tolist(), sequences[row].tolist())
        assert sequences.shape[1] >= len(ours)
    if scores is not None:
        torch.testing.assert_close(result.scores, scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", BEAM_CASES)
def test_beam_search_equals_hugging_face_on_its_own_logits(case):
    """The search itself: our loop fed HF's own model (so the logits are bit-identical) returns HF's answer,
    with eos hypotheses, length penalties of every sign and every early_stopping mode."""
    hf_model, _ = gpt2_pair()
    for seed in range(3):
        prompt = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(seed))
        sequences, scores = hf_beam_search(hf_model, prompt, 12, case)
        result = beam_search(lambda ids: hf_model(ids).logits, prompt, case["num_beams"], 12,
                             length_penalty=case["length_penalty"], eos_token_id=case["eos_token_id"],
                             early_stopping=case["early_stopping"])
        assert_same_beams(result, sequences, scores, case["num_beams"])


@pytest.mark.parametrize("case", BEAM_CASES[:3])
def test_beam_search_with_miniformer_equals_hugging_face(case):
    """The same weights in 04's MiniFormer (converted by hf_interop) give HF's beams (logits differ by ~1e-6,
    far below the gaps between the competing scores of these prompts)."""
    hf_model, ours = gpt2_pair()
    for seed in range(2):
        prompt = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(seed))
        sequences, scores = hf_beam_search(hf_model, prompt, 12, case)
        result = beam_search(ours, prompt, case["num_beams"], 12, length_penalty=case["length_penalty"],
                             eos_token_id=case["eos_token_id"], early_stopping=case["early_stopping"])
        assert_same_beams(result, sequences, scores, case["num_beams"])


@pytest.mark.parametrize("case", BEAM_CASES[:3])
def test_beam_search_with_a_reordered_kv_cache_equals_hugging_face(case):
    """With model.new_cache each step feeds one token per beam and reorders the cache when beams swap
    parents; the beams are still HF's."""
    hf_model, ours = gpt2_pair()
    prompt = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(1))
    sequences, scores = hf_beam_search(hf_model, prompt, 12, case)
    result = beam_search(ours, prompt, case["num_beams"], 12, length_penalty=case["length_penalty"],
                         eos_token_id=case["eos_token_id"], early_stopping=case["early_stopping"],
                         cache_factory=ours.new_cache)
    assert_same_beams(result, sequences, scores, case["num_beams"])


def test_beam_search_with_a_cache_refills_it_past_the_context_length():
    """Past context_length the cached search refills its cache from the last context_length tokens, as the
    uncached search re-reads them: same beams, same scores."""
    _, ours = gpt2_pair()
    prompt = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(2))
    settings = dict(length_penalty=1.0, context_length=8)
    plain = beam_search(ours, prompt, 3, 14, **settings)
    cached = beam_search(ours, prompt, 3, 14, cache_factory=ours.new_cache, **settings)
    for a, b in zip(plain.sequences, cached.sequences):
        assert torch.equal(a, b)
    torch.testing.assert_close(plain.scores, cached.scores, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cache_factory"):
        beam_search(ours, prompt, 3, 4, cache_factory="concat")


# ------------------------------------------------------------------------------------------------
# Hand-computed cases
# ------------------------------------------------------------------------------------------------

def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    tokens = torch.tensor([[0, 1, 1]])  # 0 and 1 seen (1 twice: penalised once)
    expected = torch.tensor([[1.0, -4.0, 1.0, 0.5]])
    assert torch.equal(apply_repetition_penalty(logits, tokens, 2.0), expected)


def test_filters_by_hand():
    # probabilities 0.4, 0.3, 0.2, 0.1
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    inf = float("-inf")
    assert torch.equal(top_k_filter(logits, 2), torch.tensor([[logits[0, 0], logits[0, 1], inf, inf]]))
    # nucleus 0.65: 0.4 < 0.65 <= 0.4 + 0.3 -> two tokens; 0.75 -> three
    assert torch.isinf(top_p_filter(logits, 0.65)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.75)).tolist() == [[False, False, False, True]]
    # min-p 0.6: keep p >= 0.6 * 0.4 = 0.24 -> two tokens
    assert torch.isinf(min_p_filter(logits, 0.6)).tolist() == [[False, False, True, True]]
    # the three most likely tokens are kept whatever the filter says
    assert torch.isinf(top_k_filter(logits, 1, min_tokens_to_keep=3)).tolist() == [[False, False, False, True]]
    assert torch.isinf(top_p_filter(logits, 0.1, min_tokens_to_keep=3)).tolist() == [[False, False, False, True]]
    assert torch.isinf(min_p_filter(logits, 1.0, min_tokens_to_keep=3)).tolist() == [[False, False, False, True]]


def test_entropy_by_hand():
    uniform = torch.zeros(1, 8)
    torch.testing.assert_close(entropy(uniform), torch.tensor([math.log(8)]))
    torch.testing.assert_close(effective_vocabulary(uniform), torch.tensor([8.0]))
    three_kept = torch.tensor([[1.0, 1.0, 1.0, float("-inf"), float("-inf")]])  # excluded tokens add 0, not NaN
    torch.testing.assert_close(effective_vocabulary(three_kept), torch.tensor([3.0]))
    certain = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    assert entropy(certain).item() == 0.0
    two = torch.tensor([[0.75, 0.25]]).log()
    torch.testing.assert_close(entropy(two), torch.tensor([-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]))


def test_entropy_equals_torch_categorical():
    logits = random_logits()
    torch.testing.assert_close(entropy(logits), torch.distributions.Categorical(logits=logits).entropy())


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------

CONFIGS = [SamplingConfig(), SamplingConfig(temperature=0.3), SamplingConfig(temperature=2.5, top_k=7),
           SamplingConfig(top_p=0.5), SamplingConfig(min_p=0.3, repetition_penalty=1.5),
           SamplingConfig(temperature=0.0, repetition_penalty=2.0), *PRESETS.values()]


@pytest.mark.parametrize("config", CONFIGS)
def test_probabilities_sum_to_one(config):
    probs = next_token_probabilities(random_logits(), random_tokens(), config)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]))
    assert (probs >= 0).all()


def test_temperature_to_zero_is_argmax():
    logits = random_logits()[[0, 3, 4, 5]]  # rows with a unique maximum
    argmax = logits.argmax(-1, keepdim=True)
    assert torch.equal(Sampler(SamplingConfig(temperature=0.0))(logits, None), argmax)
    probs = next_token_probabilities(logits, None, SamplingConfig(temperature=1e-3))
    torch.testing.assert_close(probs, torch.zeros_like(probs).scatter_(1, argmax, 1.0))


def test_higher_temperature_higher_entropy():
    """dH/dT = Var_p(z) / T^3 >= 0: the entropy of softmax(z / T) never falls as T grows."""
    logits = random_logits(rows=20)
    temperatures = [0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0]
    entropies = torch.stack([entropy(apply_temperature(logits, t)) for t in temperatures])  # (T, B)
    assert (entropies.diff(dim=0) >= -1e-5).all()


def test_top_k_keeps_k_distinct_logits():
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(3))  # no ties
    for k in (1, 5, 17, V):
        kept = torch.isfinite(top_k_filter(logits, k))
        assert (kept.sum(-1) == k).all()
        assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, logits.topk(k).indices, True))


def test_top_k_keeps_every_tie_at_the_boundary():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, True, True, True, False]]


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.8, 0.95])
def test_top_p_keeps_the_smallest_prefix_with_enough_mass(top_p):
    logits = 2 * torch.randn(16, V, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kept = torch.isfinite(top_p_filter(logits, top_p))
    probs = logits.softmax(-1)
    for row in range(logits.shape[0]):
        ordered = probs[row].sort(descending=True)
        prefix = int((ordered.values.cumsum(0) < top_p).sum()) + 1  # smallest m with mass of top m >= p
        expected = torch.zeros(V, dtype=torch.bool)
        expected[ordered.indices[:prefix]] = True
        assert torch.equal(kept[row], expected)
        assert probs[row][kept[row]].sum() >= top_p


def test_min_p_keeps_tokens_above_the_scaled_threshold():
    logits = random_logits()
    probs = logits.softmax(-1)
    kept = torch.isfinite(min_p_filter(logits, 0.2))
    assert torch.equal(kept, probs >= 0.2 * probs.max(-1, keepdim=True).values)


@pytest.mark.parametrize("config", CONFIGS)
def test_batched_equals_row_by_row(config):
    logits, tokens = random_logits(), random_tokens()
    batched = next_token_probabilities(logits, tokens, config)
    for row in range(logits.shape[0]):
        single = next_token_probabilities(logits[row:row + 1], tokens[row:row + 1], config)
        torch.testing.assert_close(batched[row:row + 1], single, rtol=0, atol=0)


def test_same_seed_same_tokens():
    logits = random_logits(rows=64)
    draw = lambda seed: Sampler(PRESETS["creative"], torch.Generator().manual_seed(seed))(logits, None)  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))  # 64 draws from broad distributions: a collision is ~impossible


def test_frequencies_match_the_filtered_distribution():
    """N draws of one row: each token's count is Binomial(N, p_i); allow 5 standard deviations (a false
    failure has probability < 1e-6 per token), and excluded tokens must never appear."""
    N = 20000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    config = SamplingConfig(temperature=0.8, top_k=6, top_p=0.95)
    # reference distribution computed independently: softmax(z / T) on the top 6, then the nucleus by hand
    scaled = (logits[0] / 0.8).double()
    top6 = scaled[:6].softmax(0)
    nucleus = int((top6.cumsum(0) < 0.95).sum()) + 1
    expected = torch.zeros(8, dtype=torch.float64)
    expected[:nucleus] = scaled[:nucleus].softmax(0)
    samples = Sampler(config, torch.Generator().manual_seed(0))(logits.expand(N, -1), None)  # (N, 1)
    counts = torch.bincount(samples[:, 0], minlength=8).double()
    sigma = (N * expected * (1 - expected)).sqrt()
    assert (counts[expected == 0] == 0).all()
    assert ((counts - N * expected).abs() <= 5 * sigma).all(), (counts.tolist(), (N * expected).tolist())


def test_greedy_sampler_in_generate_equals_argmax_generation():
    torch.manual_seed(0)
    model = MiniFormer(TransformerConfig(vocab_size=17, context_length=8, num_layers=2, num_heads=2, embed_dim=16)).eval()
    prompt = torch.randint(0, 17, (3, 3))
    ours = model.generate(prompt, 12, sampler=Sampler.from_preset("deterministic"))
    assert torch.equal(ours, model.generate(prompt, 12, temperature=0.0))
    beam_of_one = beam_search(model, prompt, num_beams=1, max_new_tokens=12)
    assert all(torch.equal(beam_of_one.sequences[row], ours[row]) for row in range(3))


def test_sampler_keeps_the_device_and_accepts_low_precision():
    logits = random_logits().to(torch.bfloat16)
    ids = Sampler(PRESETS["focused"], torch.Generator().manual_seed(0))(logits, random_tokens())
    assert ids.shape == (logits.shape[0], 1) and ids.dtype == torch.long and ids.device == logits.device


# ------------------------------------------------------------------------------------------------
# Beam search: exhaustive search on a tiny Markov model
# ------------------------------------------------------------------------------------------------

def markov_model(transition_logits: torch.Tensor):
    """A 'model' whose next-token logits depend only on the last token: ids (N, T) -> logits (N, T, V)."""
    return lambda ids: transition_logits[ids]


def test_beam_search_finds_what_greedy_misses():
    # from token 0: greedy takes 1 (p 0.6) whose continuations are flat; 2 (p 0.4) leads to a sure token
    probs = torch.tensor([[0.0, 0.6, 0.4],
                          [0.34, 0.33, 0.33],
                          [0.0, 0.0, 1.0]]).clamp_min(1e-9)
    model = markov_model(probs.log())
    prompt = torch.tensor([[0]])
    greedy = beam_search(model, prompt, num_beams=1, max_new_tokens=2).sequences[0]
    beams = beam_search(model, prompt, num_beams=2, max_new_tokens=2, length_penalty=0.0)
    assert greedy.tolist() == [0, 1, 0]  # 0.6 * 0.34 = 0.204
    assert beams.sequences[0].tolist() == [0, 2, 2]  # 0.4 * 1.0 = 0.4
    torch.testing.assert_close(beams.scores, torch.tensor([math.log(0.4)]))


def test_wide_beam_equals_exhaustive_search():
    """With num_beams >= V^(L-1) no prefix is ever dropped, so beam search is exact: it returns the most
    likely sequence of all V^L."""
    vocab, length = 3, 4
    transition = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    prompt = torch.tensor([[0]])
    best = max(itertools.product(range(vocab), repeat=length),
               key=lambda seq: sum(transition[a, b].item() for a, b in zip((0, *seq), seq)))
    result = beam_search(markov_model(transition), prompt, num_beams=vocab ** (length - 1), max_new_tokens=length,
                         length_penalty=0.0)
    assert result.sequences[0].tolist() == [0, *best]


def test_length_penalty_decides_between_short_and_long():
    """Token 1 is eos. From 0: eos at once (p 0.5) or token 2 (p 0.5), then 2 -> 2 (p 0.9) until the end.
    Raw log-probability prefers stopping; dividing by length ** 2 prefers the long hypothesis."""
    probs = torch.tensor([[1e-9, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3], [1e-9, 0.1, 0.9]])
    model, prompt = markov_model(probs.log()), torch.tensor([[0]])
    short = beam_search(model, prompt, 2, 5, length_penalty=0.0, eos_token_id=1, early_stopping="never")
    long = beam_search(model, prompt, 2, 5, length_penalty=2.0, eos_token_id=1, early_stopping="never")
    assert short.sequences[0].tolist() == [0, 1]
    assert long.sequences[0].tolist() == [0, 2, 2, 2, 2, 2]
    torch.testing.assert_close(long.scores, torch.tensor([(math.log(0.5) + 4 * math.log(0.9)) / 25]))


# ------------------------------------------------------------------------------------------------
# Bad values name their argument
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arguments, name", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="hot"), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=-3), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.01), "min_p"), (dict(min_p=float("nan")), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(min_tokens_to_keep=0), "min_tokens_to_keep"),
])
def test_bad_config_values_name_the_argument(arguments, name):
    with pytest.raises(ValueError, match=name):
        SamplingConfig(**arguments)


def test_bad_filter_arguments_name_the_argument():
    logits, tokens = random_logits(), random_tokens()
    cases = [(lambda: apply_temperature(logits, -1.0), "temperature"),
             (lambda: apply_temperature(logits, 0.0), "temperature"),
             (lambda: top_k_filter(logits, 0), "top_k"), (lambda: top_p_filter(logits, 1.2), "top_p"),
             (lambda: min_p_filter(logits, 2.0), "min_p"),
             (lambda: apply_repetition_penalty(logits, tokens, 0.0), "repetition_penalty"),
             (lambda: top_p_filter(logits, 0.5, min_tokens_to_keep=0), "min_tokens_to_keep"),
             (lambda: apply_repetition_penalty(logits, tokens[:2], 1.2), "tokens"),
             (lambda: apply_repetition_penalty(logits, tokens + V, 1.2), "tokens"),
             (lambda: top_k_filter(logits[0], 3), "logits"),
             (lambda: Sampler.from_preset("wild"), "preset")]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
    with pytest.raises(TypeError, match="logits"):
        top_k_filter(torch.zeros(2, 3, dtype=torch.long), 1)


@pytest.mark.parametrize("arguments, name", [
    (dict(num_beams=0), "num_beams"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(length_penalty=float("nan")), "length_penalty"), (dict(eos_token_id=-1), "eos_token_id"),
    (dict(early_stopping="sometimes"), "early_stopping"),
])
def test_bad_beam_arguments_name_the_argument(arguments, name):
    settings = {"num_beams": 2, "max_new_tokens": 3, **arguments}
    with pytest.raises(ValueError, match=name):
        beam_search(markov_model(torch.zeros(3, 3)), torch.tensor([[0]]), **settings)
