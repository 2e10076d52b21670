"""Learning from preferences: a Bradley-Terry reward model, and DPO, which needs no reward model at all.

The data are pairs (x, y_c, y_r): a prompt and two responses, the chosen one preferred by a judge. A response's
log-probability under a causal model is the sum over its tokens (the prompt is given, not scored):

    log pi(y | x) = sum_{t in response} log p(ids_t | ids_<t)

Bradley-Terry models the judge as P(y_c > y_r | x) = sigmoid(r(x, y_c) - r(x, y_r)); a reward model r (the SFT
model with a scalar head, read at the last real token) is fitted by maximum likelihood:

    L_RM = -mean log sigmoid(r_c - r_r)

DPO (Rafailov et al., 2023) uses the policy's own log-ratio to a frozen reference as an implicit reward,
r(x, y) = beta * log(pi(y | x) / pi_ref(y | x)), and fits the same Bradley-Terry likelihood with it:

    L_DPO = -mean log sigmoid(beta * [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])

beta sets how far the policy may move from the reference: a small beta needs a large log-ratio for the same loss.
Batches put the chosen rows first, then the rejected rows, right-padded: in a causal model the padding after a
sequence cannot change what its earlier positions see, so no attention mask is needed.

Contents: PreferencePair, PairBatch, collate_pairs, token_log_probs, response_log_probs, bradley_terry_loss,
RewardModel, dpo_loss, train_reward_model, train_dpo, reward_model_accuracy, dpo_accuracy.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD_ID = 0  # any valid id: padding sits after every real token, so nothing ever reads it


@dataclass(frozen=True)
class PreferencePair:
    prompt: list  # token ids
    chosen: list  # token ids of the preferred response (ending with END)
    rejected: list  # token ids of the other response


@dataclass
class PairBatch:
    ids: torch.Tensor  # (2B, T) chosen rows then rejected rows, right-padded
    response_mask: torch.Tensor  # (2B, T) bool, True on response tokens
    lengths: torch.Tensor  # (2B,) number of real tokens per row


def _check_pairs(pairs) -> None:
    if len(pairs) == 0:
        raise ValueError("pairs must hold at least 1 PreferencePair, got 0")


def collate_pairs(pairs, pad_id: int = PAD_ID, device=None) -> PairBatch:
    """Stack pairs into one batch: rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected."""
    _check_pairs(pairs)
    for pair in pairs:
        if not isinstance(pair, PreferencePair):
            raise TypeError(f"pairs must hold PreferencePair items, got {type(pair).__name__}")
        if len(pair.prompt) == 0 or len(pair.chosen) == 0 or len(pair.rejected) == 0:
            raise ValueError(f"a pair's prompt, chosen and rejected must each hold >= 1 token, got lengths "
                             f"{len(pair.prompt)}, {len(pair.chosen)}, {len(pair.rejected)}")
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    T = max(len(prompt) + len(response) for prompt, response in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    response_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for row, (prompt, response) in enumerate(rows):
        ids[row, :len(prompt) + len(response)] = torch.tensor(list(prompt) + list(response))
        response_mask[row, len(prompt):len(prompt) + len(response)] = True
    lengths = torch.tensor([len(prompt) + len(response) for prompt, response in rows])
    return PairBatch(ids.to(device), response_mask.to(device), lengths.to(device))


def token_log_probs(logits, ids):
    """log p(ids_t | ids_<t) for t = 1..T-1: logits (B, T, V), ids (B, T) -> (B, T-1). Position t-1 predicts t."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)


def response_log_probs(model, ids, response_mask):
    """Sum of log p(ids_t | ids_<t) over the masked (response) positions: ids (B, T) -> (B,).

    The first token has no context to be predicted from, so response_mask[:, 0] must be False."""
    if ids.shape != response_mask.shape:
        raise ValueError(f"ids and response_mask must have the same shape, got {tuple(ids.shape)} and "
                         f"{tuple(response_mask.shape)}")
    if response_mask[:, 0].any():
        raise ValueError("response_mask[:, 0] must be False: the first token has no context to score it "
                         "(a response needs a prompt of >= 1 token)")
    per_token = token_log_probs(model(ids), ids)  # (B, T-1)
    return (per_token * response_mask[:, 1:]).sum(dim=-1)  # (B,)


def bradley_terry_loss(reward_chosen, reward_rejected):
    """-mean log sigmoid(r_c - r_r): the negative log-likelihood of the judge's choices (logsigmoid is
    stable where log(sigmoid(.)) would underflow to log 0)."""
    if reward_chosen.shape != reward_rejected.shape:
        raise ValueError(f"reward_chosen and reward_rejected must have the same shape, got "
                         f"{tuple(reward_chosen.shape)} and {tuple(reward_rejected.shape)}")
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


class RewardModel(nn.Module):
    """A copy of a MiniFormer (trainable; the model passed in is not changed) with a Linear(E, 1) reward head
    read at the last real token's final-normed hidden state: the one position that has seen the whole response."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.reward_head = nn.Linear(backbone.config.embed_dim, 1)
        nn.init.normal_(self.reward_head.weight, std=0.02)
        nn.init.zeros_(self.reward_head.bias)

    def forward(self, ids, lengths):
        """ids (B, T) right-padded, lengths (B,) real tokens per row -> rewards (B,)."""
        if lengths.shape != (ids.shape[0],) or int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]:
            raise ValueError(f"lengths must have shape ({ids.shape[0]},) with values in [1, {ids.shape[1]}], got "
                             f"shape {tuple(lengths.shape)} and values {lengths.tolist()}")
        _, hidden = self.backbone.forward_with_hidden(ids)
        normed = self.backbone.final_norm(hidden[-1])  # (B, T, E)
        last = normed[torch.arange(ids.shape[0], device=ids.device), lengths - 1]  # (B, E)
        return self.reward_head(last).squeeze(-1)  # (B,)


def _check_beta(beta) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta: float):
    """The sigmoid DPO loss on sequence log-probs (B,) -> (loss, chosen_rewards (B,), rejected_rewards (B,)).

    The rewards are the implicit ones, beta * (log pi - log pi_ref), detached: for logging and accuracy."""
    _check_beta(beta)
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                       reference_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must have the same shape, got {sorted(shapes)}")
    chosen_log_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratio = policy_rejected_logps - reference_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_log_ratio - rejected_log_ratio)).mean()
    return loss, beta * chosen_log_ratio.detach(), beta * rejected_log_ratio.detach()


def _pair_metrics(chosen_scores, rejected_scores) -> dict:
    """accuracy = fraction of pairs scored chosen > rejected; margin = mean(chosen - rejected)."""
    return {"accuracy": (chosen_scores > rejected_scores).float().mean().item(),
            "margin": (chosen_scores - rejected_scores).mean().item()}


def _check_training_arguments(pairs, steps, batch_size, learning_rate) -> None:
    _check_pairs(pairs)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}")


def _sample_batch(pairs, batch_size, generator, device) -> PairBatch:
    """batch_size distinct pairs (all of them when there are fewer), drawn with the caller's generator."""
    order = torch.randperm(len(pairs), generator=generator, device=generator.device if generator else "cpu")
    return collate_pairs([pairs[i] for i in order[:batch_size].tolist()], device=device)


def _device(model):
    return next(model.parameters()).device


def train_reward_model(reward_model: RewardModel, pairs, steps: int, batch_size: int, learning_rate: float,
                       generator: torch.Generator | None = None) -> list:
    """Fit the reward model to the pairs with AdamW on the Bradley-Terry loss; one dict per step:
    step, loss, accuracy (fraction of the batch with r_c > r_r), margin (mean r_c - r_r)."""
    _check_training_arguments(pairs, steps, batch_size, learning_rate)
    # weight_decay 0: decay would pull the weights toward zero, not toward the SFT model they started from
    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=learning_rate, weight_decay=0.0)
    reward_model.train()
    history = []
    for step in range(steps):
        batch = _sample_batch(pairs, batch_size, generator, _device(reward_model))
        rewards = reward_model(batch.ids, batch.lengths)  # (2B,)
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item(), **_pair_metrics(chosen.detach(), rejected.detach())})
    return history


def train_dpo(policy, reference, pairs, steps: int, batch_size: int, learning_rate: float, beta: float,
              generator: torch.Generator | None = None) -> list:
    """DPO: AdamW on dpo_loss, the reference frozen (run under no_grad); one dict per step: step, loss,
    accuracy and margin of the implicit rewards, chosen_reward and rejected_reward (batch means)."""
    _check_training_arguments(pairs, steps, batch_size, learning_rate)
    _check_beta(beta)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=0.0)
    policy.train()
    reference.eval()
    history = []
    for step in range(steps):
        batch = _sample_batch(pairs, batch_size, generator, _device(policy))
        policy_chosen, policy_rejected = response_log_probs(policy, batch.ids, batch.response_mask).chunk(2)
        with torch.no_grad():
            reference_chosen, reference_rejected = response_log_probs(reference, batch.ids,
                                                                      batch.response_mask).chunk(2)
        loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, reference_chosen,
                                                          reference_rejected, beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item(), **_pair_metrics(chosen_rewards, rejected_rewards),
                        "chosen_reward": chosen_rewards.mean().item(),
                        "rejected_reward": rejected_rewards.mean().item()})
    return history


@torch.no_grad()
def reward_model_accuracy(reward_model: RewardModel, pairs, batch_size: int = 64) -> dict:
    """On held-out pairs: accuracy (fraction with r_c > r_r) and margin (mean r_c - r_r)."""
    _check_pairs(pairs)
    reward_model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start:start + batch_size], device=_device(reward_model))
        rewards_chosen, rewards_rejected = reward_model(batch.ids, batch.lengths).chunk(2)
        chosen.append(rewards_chosen)
        rejected.append(rewards_rejected)
    return _pair_metrics(torch.cat(chosen), torch.cat(rejected))


@torch.no_grad()
def dpo_accuracy(policy, reference, pairs, beta: float, batch_size: int = 64) -> dict:
    """On held-out pairs: accuracy and margin of DPO's implicit reward beta * log(pi / pi_ref)."""
    _check_beta(beta)
    _check_pairs(pairs)
    policy.eval()
    reference.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start:start + batch_size], device=_device(policy))
        policy_logps = response_log_probs(policy, batch.ids, batch.response_mask)
        reference_logps = response_log_probs(reference, batch.ids, batch.response_mask)
        _, chosen_rewards, rejected_rewards = dpo_loss(*policy_logps.chunk(2), *reference_logps.chunk(2), beta)
        chosen.append(chosen_rewards)
        rejected.append(rejected_rewards)
    return _pair_metrics(torch.cat(chosen), torch.cat(rejected))
