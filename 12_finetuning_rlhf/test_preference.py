"""Preference learning checked against trl's DPO loss, the Bradley-Terry closed form, a per-token loop, and
learning properties on separable toy pairs."""

import collections
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

from preference import (PairBatch, PreferencePair, RewardModel, bradley_terry_loss, collate_pairs, dpo_accuracy,
                        dpo_loss, response_log_probs, reward_model_accuracy, train_dpo, train_reward_model)
from testing import require
from transformer import MiniFormer, TransformerConfig

V, END = 11, 10


def tiny_model(seed=0) -> MiniFormer:
    torch.manual_seed(seed)
    return MiniFormer(TransformerConfig(vocab_size=V, context_length=16, num_layers=2, num_heads=2, embed_dim=32))


def toy_pairs(count=8):
    """Separable: the chosen response starts with token 3, the rejected one with token 4 (prompts vary)."""
    return [PreferencePair([1 + i % 3, 5 + i % 4], [3, 6 + i % 3, END], [4, 6 + i % 3, END]) for i in range(count)]


def trl_dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    """trl 1.16's sigmoid DPO loss, run as its own code: DPOTrainer._compute_loss called on a stub trainer.

    In trl 1.16 the loss is not a separate function: it sits inside DPOTrainer._compute_loss, which calls the
    model for per-token log-probs. The stub model returns each sequence's log-prob as a single completion
    token, and the reference log-probs come in as precomputed (precompute_ref_logps=True), so trl sums, forms
    the log-ratios and applies its "sigmoid" loss to exactly our inputs. -> (loss, trl's logged metrics)."""
    trl = require("trl")
    B = policy_chosen.shape[0]

    def model(**_kwargs):  # one completion token per row: its log-prob is the sequence's
        zeros = torch.zeros(2 * B, 1)
        return types.SimpleNamespace(log_probs=torch.cat([policy_chosen, policy_rejected]).unsqueeze(1),
                                     entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model.training = True
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t,
                                        gather=lambda t: t)
    trainer = types.SimpleNamespace(
        model=model, accelerator=accelerator, beta=beta, loss_types=["sigmoid"], loss_weights=[1.0],
        f_divergence_type="reverse_kl", precompute_ref_logps=True, ld_alpha=None, use_weighting=False,
        aux_loss_enabled=False, label_smoothing=0.0, _tp_size=1, _total_train_tokens=0,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    inputs = {"input_ids": torch.zeros(2 * B, 2, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1]] * (2 * B)),  # the prompt token, then the completion token
              "ref_chosen_logps": reference_chosen, "ref_rejected_logps": reference_rejected}
    loss = trl.DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, trainer._metrics["train"]


# ---------------------------------------------------------------- DPO loss vs trl


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_dpo_loss_equals_trl(beta):
    generator = torch.Generator().manual_seed(0)
    logps = [torch.randn(6, generator=generator) * 3 - 10 for _ in range(4)]
    loss, chosen_rewards, rejected_rewards = dpo_loss(*logps, beta)
    trl_loss, trl_metrics = trl_dpo_loss(*logps, beta)
    torch.testing.assert_close(loss, trl_loss)
    assert chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"][0], rel=1e-5, abs=1e-7)
    assert rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"][0], rel=1e-5, abs=1e-7)
    accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
    assert accuracy == pytest.approx(trl_metrics["rewards/accuracies"][0])


def test_dpo_loss_hand_values():
    """Policy = reference: every log-ratio is 0, the loss is log 2; rewards are detached and scaled by beta."""
    policy_chosen = torch.tensor([-3.0, -5.0], requires_grad=True)
    policy_rejected = torch.tensor([-4.0, -2.0])
    loss, chosen_rewards, _ = dpo_loss(policy_chosen, policy_rejected, policy_chosen.detach(), policy_rejected, 0.3)
    assert loss.item() == pytest.approx(math.log(2))
    assert not chosen_rewards.requires_grad
    reference_chosen = torch.tensor([-4.0, -5.0])  # pair 0: the policy favours chosen by 1 nat more
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                      policy_rejected, 0.3)
    assert chosen_rewards.tolist() == pytest.approx([0.3, 0.0])
    assert loss.item() == pytest.approx((math.log1p(math.exp(-0.3)) + math.log(2)) / 2)


# ---------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_equals_closed_form_and_bce():
    generator = torch.Generator().manual_seed(1)
    reward_chosen, reward_rejected = torch.randn(7, generator=generator) * 2, torch.randn(7, generator=generator)
    # -log(e^rc / (e^rc + e^rr)), written with logsumexp
    closed_form = (torch.logaddexp(reward_chosen, reward_rejected) - reward_chosen).mean()
    torch.testing.assert_close(bradley_terry_loss(reward_chosen, reward_rejected), closed_form)
    bce = F.binary_cross_entropy_with_logits(reward_chosen - reward_rejected, torch.ones(7))
    torch.testing.assert_close(bradley_terry_loss(reward_chosen, reward_rejected), bce)


def test_bradley_terry_is_stable_for_large_gaps():
    """A 200-nat wrong-way gap: log(sigmoid(-200)) underflows to -inf, logsigmoid gives 200."""
    loss = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([200.0]))
    assert loss.item() == pytest.approx(200.0)


# ---------------------------------------------------------------- batches and log-probs


UNEVEN_PAIRS = [PreferencePair([1, 2], [3, END], [4, 5, END]), PreferencePair([2], [3, 3, END], [5, END])]


def test_collate_pairs_layout_by_hand():
    batch = collate_pairs(UNEVEN_PAIRS, pad_id=9)
    assert batch.ids.tolist() == [[1, 2, 3, END, 9], [2, 3, 3, END, 9], [1, 2, 4, 5, END], [2, 5, END, 9, 9]]
    assert batch.response_mask.int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1],
                                                  [0, 1, 1, 0, 0]]
    assert batch.lengths.tolist() == [4, 4, 5, 3]


def test_response_log_probs_equals_a_per_token_loop():
    model = tiny_model().eval()
    batch = collate_pairs(UNEVEN_PAIRS + toy_pairs(2))
    ours = response_log_probs(model, batch.ids, batch.response_mask)
    with torch.no_grad():
        for row in range(batch.ids.shape[0]):
            ids = batch.ids[row, :batch.lengths[row]]  # unpadded
            log_probs = F.log_softmax(model(ids.unsqueeze(0))[0], dim=-1)  # (T, V)
            expected = sum(log_probs[t - 1, ids[t]] for t in range(1, len(ids)) if batch.response_mask[row, t])
            assert ours[row].item() == pytest.approx(expected.item(), abs=1e-5)


def test_right_padding_does_not_change_response_log_probs():
    model = tiny_model().eval()
    batch = collate_pairs(UNEVEN_PAIRS)
    padded_ids = torch.cat([batch.ids, torch.randint(0, V, (batch.ids.shape[0], 4))], dim=1)
    padded_mask = torch.cat([batch.response_mask, torch.zeros(batch.ids.shape[0], 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(response_log_probs(model, padded_ids, padded_mask),
                               response_log_probs(model, batch.ids, batch.response_mask))


def test_response_mask_on_the_first_token_raises():
    model = tiny_model()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"response_mask\[:, 0\] must be False"):
        response_log_probs(model, ids, torch.tensor([[True, True, True]]))


# ---------------------------------------------------------------- reward model


def test_reward_model_reads_the_last_real_token():
    model = tiny_model()
    reward_model = RewardModel(model).eval()
    with torch.no_grad():  # a nonzero head so the reward depends on the hidden state
        reward_model.reward_head.weight.normal_(0.0, 1.0)
        batch = collate_pairs(UNEVEN_PAIRS)
        rewards = reward_model(batch.ids, batch.lengths)
        padded = batch.ids.clone()
        after_end = torch.arange(padded.shape[1]) >= batch.lengths.unsqueeze(1)  # (2B, T) padding positions
        assert after_end.sum() >= 3  # the rows do have padding to change
        padded[after_end] = (padded[after_end] + 1 + torch.arange(int(after_end.sum())) % (V - 1)) % V
        torch.testing.assert_close(reward_model(padded, batch.lengths), rewards)
        last_changed = batch.ids.clone()
        rows = torch.arange(batch.ids.shape[0])
        last_changed[rows, batch.lengths - 1] = (last_changed[rows, batch.lengths - 1] + 1) % V
        assert not torch.allclose(reward_model(last_changed, batch.lengths), rewards)


def test_reward_model_trains_a_copy():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    reward_model = RewardModel(model)
    train_reward_model(reward_model, toy_pairs(), steps=2, batch_size=4, learning_rate=1e-2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# ---------------------------------------------------------------- learning


def test_train_reward_model_separates_toy_pairs():
    reward_model = RewardModel(tiny_model())
    assert abs(reward_model_accuracy(reward_model, toy_pairs())["margin"]) < 0.1  # a fresh head scores ~0
    history = train_reward_model(reward_model, toy_pairs(), steps=40, batch_size=8, learning_rate=3e-3,
                                 generator=torch.Generator().manual_seed(0))
    assert history[-1]["loss"] < history[0]["loss"]
    held_out = toy_pairs(12)[8:]
    assert reward_model_accuracy(reward_model, toy_pairs())["accuracy"] == 1.0
    assert reward_model_accuracy(reward_model, held_out)["margin"] > 1.0


def test_train_dpo_increases_the_chosen_margin():
    reference = tiny_model()
    policy = copy.deepcopy(reference)
    pairs = toy_pairs()
    batch = collate_pairs(pairs)

    def log_prob_margin():  # mean log pi(chosen) - log pi(rejected)
        with torch.no_grad():
            chosen, rejected = response_log_probs(policy, batch.ids, batch.response_mask).chunk(2)
        return (chosen - rejected).mean().item()

    start = log_prob_margin()
    assert dpo_accuracy(policy, reference, pairs, beta=0.1)["margin"] == pytest.approx(0.0, abs=1e-6)
    history = train_dpo(policy, reference, pairs, steps=25, batch_size=8, learning_rate=3e-3, beta=0.1,
                        generator=torch.Generator().manual_seed(0))
    assert log_prob_margin() > start + 2.0
    assert history[-1]["loss"] < history[0]["loss"]
    evaluation = dpo_accuracy(policy, reference, pairs, beta=0.1)
    assert evaluation["accuracy"] == 1.0 and evaluation["margin"] > 0.2


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf")])
def test_bad_beta_raises(beta):
    logps = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        dpo_loss(logps, logps, logps, logps, beta)


def test_bad_arguments_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="pairs must hold at least 1"):
        collate_pairs([])
    with pytest.raises(ValueError, match="prompt, chosen and rejected must each hold >= 1 token"):
        collate_pairs([PreferencePair([], [1], [2])])
    with pytest.raises(TypeError, match="PreferencePair"):
        collate_pairs([([1], [2], [3])])
    with pytest.raises(ValueError, match="pairs must hold at least 1"):
        train_dpo(model, model, [], steps=1, batch_size=1, learning_rate=1e-3, beta=0.1)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        train_reward_model(RewardModel(model), toy_pairs(), steps=0, batch_size=1, learning_rate=1e-3)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        train_dpo(model, model, toy_pairs(), steps=1, batch_size=0, learning_rate=1e-3, beta=0.1)
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        train_reward_model(RewardModel(model), toy_pairs(), steps=1, batch_size=1, learning_rate=float("nan"))
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        train_dpo(model, model, toy_pairs(), steps=1, batch_size=1, learning_rate=1e-3, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    batch: PairBatch = collate_pairs(toy_pairs(2))
    with pytest.raises(ValueError, match=r"lengths must have shape \(4,\) with values in \[1, 5\]"):
        RewardModel(model)(batch.ids, batch.lengths + 1)
