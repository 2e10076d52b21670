"""RLHF pieces checked against torch's kl_div, Monte Carlo on a small vocabulary, per-token loops, hand values
and learning properties of the group-relative policy gradient."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from rlhf import (exact_kl, group_advantages, kl_estimators, policy_loss, rl_step, sample_group, train_rl)
from transformer import MiniFormer, TransformerConfig

V, END, TARGET = 11, 10, 7


def tiny_model(seed=0) -> MiniFormer:
    torch.manual_seed(seed)
    return MiniFormer(TransformerConfig(vocab_size=V, context_length=16, num_layers=2, num_heads=2, embed_dim=32))


def first_token_is_target(_prompt, response) -> float:
    return float(response[0] == TARGET)


def target_probability(model, prompts) -> float:
    """Mean over prompts of p(TARGET | prompt) at the first response position."""
    with torch.no_grad():
        return sum(torch.softmax(model(torch.tensor([p]))[0, -1], -1)[TARGET].item() for p in prompts) / len(prompts)


def next_token_kl(policy, reference, prompts) -> float:
    """Mean exact KL of the first response token's distribution, a fixed probe of how far the policy moved."""
    with torch.no_grad():
        return sum(exact_kl(policy(torch.tensor([p]))[0, -1], reference(torch.tensor([p]))[0, -1]).item()
                   for p in prompts) / len(prompts)


PROMPTS = [[1, 2], [3, 4, 5], [2, 6]]


# ---------------------------------------------------------------- KL


def test_exact_kl_equals_torch_kl_div():
    generator = torch.Generator().manual_seed(0)
    policy_logits, reference_logits = torch.randn(2, 3, 5, V, generator=generator) * 2
    expected = F.kl_div(F.log_softmax(reference_logits, -1), F.log_softmax(policy_logits, -1), log_target=True,
                        reduction="none").sum(-1)  # kl_div(input=log q, target=log p) = sum p (log p - log q)
    torch.testing.assert_close(exact_kl(policy_logits, reference_logits), expected)
    assert exact_kl(policy_logits, policy_logits).abs().max().item() == 0.0


def test_kl_estimators_match_the_exact_kl_on_average():
    """Many samples y ~ p on a 6-token vocabulary: mean k1 and mean k3 approach KL(p || q); k2 is biased."""
    generator = torch.Generator().manual_seed(0)
    policy_logits, reference_logits = torch.randn(2, 6, generator=generator)
    log_p, log_q = F.log_softmax(policy_logits, -1), F.log_softmax(reference_logits, -1)
    samples = torch.multinomial(log_p.exp(), 200_000, replacement=True, generator=generator)
    estimates = kl_estimators(log_p[samples], log_q[samples])
    exact = exact_kl(policy_logits, reference_logits).item()
    assert exact > 0.1  # far enough apart for the comparison to mean something
    assert estimates["k1"].mean().item() == pytest.approx(exact, rel=0.03)
    assert estimates["k3"].mean().item() == pytest.approx(exact, rel=0.03)
    assert (estimates["k1"] < 0).any()  # k1 is negative on some samples, k3 never
    assert (estimates["k3"] >= 0).all() and (estimates["k2"] >= 0).all()


def test_kl_estimators_hand_values():
    policy_logp = torch.tensor([math.log(0.5), math.log(0.25), -50.0, 0.0])
    reference_logp = torch.tensor([math.log(0.25), math.log(0.5), 0.0, -50.0])  # log r = -log 2, log 2, 50, -50
    estimates = kl_estimators(policy_logp, reference_logp)
    log_r = reference_logp - policy_logp
    torch.testing.assert_close(estimates["k1"], -log_r)
    torch.testing.assert_close(estimates["k2"], 0.5 * log_r ** 2)
    assert estimates["k3"][:2].tolist() == pytest.approx([0.5 - 1 + math.log(2), 2 - 1 - math.log(2)])
    assert (estimates["k3"] >= 0).all() and torch.isfinite(estimates["k3"][3])


# ---------------------------------------------------------------- sampling


def test_sample_group_mask_stops_at_the_first_end():
    model = tiny_model()
    prompt = [1, 2, 3]
    ids, mask = sample_group(model, prompt, group_size=16, max_new_tokens=12, end_id=END, temperature=1.5,
                             generator=torch.Generator().manual_seed(0))
    assert ids.shape == mask.shape == (16, 15)
    assert (ids[:, :3] == torch.tensor(prompt)).all()
    rows_ending_early = 0
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        response = row[3:]
        stop = response.index(END) + 1 if END in response else len(response)
        rows_ending_early += stop < len(response)
        assert row_mask == [False] * 3 + [True] * stop + [False] * (len(response) - stop)
    assert rows_ending_early >= 2  # the case being tested happened


def test_sample_group_is_reproducible_with_a_seeded_generator():
    model = tiny_model()

    def draw(seed):
        return sample_group(model, [1, 2], 4, 8, END, 1.0, torch.Generator().manual_seed(seed))[0]

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


# ---------------------------------------------------------------- loss


def test_group_advantages_hand_values():
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # mean 0.25, std (n-1) 0.5
    assert advantages.tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    assert group_advantages(torch.full((4,), 3.0)).tolist() == [0.0] * 4


def test_policy_loss_equals_a_per_token_loop():
    policy, reference = tiny_model(0), tiny_model(1)
    ids, mask = sample_group(policy, [1, 2], 4, 6, END, 1.0, torch.Generator().manual_seed(0))
    advantages = torch.tensor([1.0, -0.5, 0.2, -0.7])
    loss, kl, kl_k3 = policy_loss(policy, reference, ids, mask, advantages, kl_coef=0.3)
    expected_loss, expected_kl = 0.0, []
    with torch.no_grad():
        for g in range(4):
            log_p = F.log_softmax(policy(ids[g:g + 1])[0], -1)  # (T, V)
            log_q = F.log_softmax(reference(ids[g:g + 1])[0], -1)
            terms, kl_sum = [], 0.0
            for t in range(1, ids.shape[1]):
                if mask[g, t]:
                    token = ids[g, t]
                    log_r = (log_q[t - 1, token] - log_p[t - 1, token]).item()
                    terms.append(-advantages[g].item() * log_p[t - 1, token].item()
                                 + 0.3 * (math.exp(log_r) - 1 - log_r))
                    kl_sum += (log_p[t - 1].exp() * (log_p[t - 1] - log_q[t - 1])).sum().item()
            expected_loss += sum(terms) / len(terms) / 4
            expected_kl.append(kl_sum)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-5)
    assert kl.tolist() == pytest.approx(expected_kl, abs=1e-5)
    assert (kl_k3 >= 0).all()


# ---------------------------------------------------------------- learning properties


def test_rl_without_penalty_raises_the_rewarded_token():
    reference = tiny_model()
    policy = copy.deepcopy(reference)
    before = target_probability(policy, PROMPTS)

    def measure_every_fourth_step(step, current):  # on_step sees the policy being trained, after the update
        assert current is policy
        return {"target_probability": target_probability(current, PROMPTS)} if step % 4 == 3 else None

    history = train_rl(policy, reference, PROMPTS, first_token_is_target, steps=12, prompts_per_step=3,
                       group_size=8, kl_coef=0.0, learning_rate=1e-2, max_new_tokens=3, end_id=END,
                       temperature=1.0, generator=torch.Generator().manual_seed(0), on_step=measure_every_fourth_step)
    assert [h["step"] for h in history if "target_probability" in h] == [3, 7, 11]
    assert history[-1]["target_probability"] == target_probability(policy, PROMPTS)
    assert target_probability(policy, PROMPTS) > max(0.5, 3 * before)
    assert history[-1]["reward_mean"] > history[0]["reward_mean"]
    assert history[-1]["kl"] > 0.1


def test_policy_equal_to_reference_has_zero_kl():
    reference = tiny_model()
    policy = copy.deepcopy(reference)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    record = rl_step(policy, reference, optimizer, PROMPTS, lambda _prompt, response: float(sum(response)),
                     group_size=4, kl_coef=0.5, max_new_tokens=4, end_id=END, temperature=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert record["kl"] == 0.0 and record["kl_k3"] == 0.0  # measured before the update
    assert next_token_kl(policy, reference, PROMPTS) > 1e-4  # the update itself did move the policy


def test_a_huge_kl_coefficient_keeps_the_policy_near_the_reference():
    reference = tiny_model()
    drift = {}
    for kl_coef in (0.0, 50.0):
        policy = copy.deepcopy(reference)
        train_rl(policy, reference, PROMPTS, first_token_is_target, steps=10, prompts_per_step=3, group_size=8,
                 kl_coef=kl_coef, learning_rate=1e-2, max_new_tokens=3, end_id=END, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
        drift[kl_coef] = next_token_kl(policy, reference, PROMPTS)
    assert drift[50.0] < drift[0.0] / 5


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("name, value, match", [
    ("group_size", 1, "group_size must be an integer >= 2"),
    ("kl_coef", -0.1, "kl_coef must be a finite number >= 0"),
    ("kl_coef", float("nan"), "kl_coef must be a finite number >= 0"),
    ("temperature", 0.0, "temperature must be a finite number > 0"),
    ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"),
    ("max_new_tokens", 20, r"prompt length \+ max_new_tokens must be <= context_length \(16\)"),
    ("prompts", [], "prompts must hold at least 1 prompt"),
    ("prompts", [[]], "a prompt must hold at least 1 token"),
])
def test_rl_step_bad_arguments_raise(name, value, match):
    policy = tiny_model()
    arguments = dict(policy=policy, reference=policy, optimizer=torch.optim.AdamW(policy.parameters()),
                     prompts=PROMPTS, reward_fn=first_token_is_target, group_size=2, kl_coef=0.1,
                     max_new_tokens=2, end_id=END, temperature=1.0)
    arguments[name] = value
    with pytest.raises(ValueError, match=match):
        rl_step(**arguments)


@pytest.mark.parametrize("name, value, match", [
    ("steps", 0, "steps must be an integer >= 1"),
    ("prompts_per_step", 0, "prompts_per_step must be an integer >= 1"),
    ("learning_rate", -1.0, "learning_rate must be a finite number > 0"),
])
def test_train_rl_bad_arguments_raise(name, value, match):
    policy = tiny_model()
    arguments = dict(policy=policy, reference=policy, prompts=PROMPTS, reward_fn=first_token_is_target, steps=1,
                     prompts_per_step=1, group_size=2, kl_coef=0.1, learning_rate=1e-3, max_new_tokens=2,
                     end_id=END, temperature=1.0)
    arguments[name] = value
    with pytest.raises(ValueError, match=match):
        train_rl(**arguments)


def test_non_finite_reward_raises():
    policy = tiny_model()
    with pytest.raises(ValueError, match="reward_fn must return finite numbers"):
        rl_step(policy, policy, torch.optim.AdamW(policy.parameters()), PROMPTS, lambda p, r: float("nan"), 2,
                0.1, 2, END, 1.0)
