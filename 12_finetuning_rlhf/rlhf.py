"""RLHF with a group-relative policy gradient (GRPO-style) and a KL penalty to the frozen reference model.

For each prompt x the policy samples a group of G responses y_1..y_G and a reward function scores them. The
group is its own baseline: each response's advantage is its reward standardised within the group,

    A_i = (r_i - mean(r)) / (std(r) + eps)

so no value network is needed (Shao et al., 2024, DeepSeekMath). The loss per response averages over its
tokens, then over the responses (one update per sampled batch, on-policy):

    L = mean_i 1/|y_i| sum_t [ -A_i * log pi(y_i,t | x, y_i,<t) + kl_coef * k3_t ]

GRPO and PPO write the first term with the ratio pi / pi_old and clip it; with one update per batch pi_old is
pi, the ratio is 1, its gradient is the gradient of log pi, and clipping never acts, so this code leaves it out.

The KL to the reference, KL(pi || pi_ref) = E_{y ~ pi}[log pi(y) - log pi_ref(y)], is estimated per sampled
token from log r = log pi_ref(y_t) - log pi(y_t) (Schulman, "Approximating KL divergence", 2020):

    k1 = -log r                 unbiased, high variance, negative on some samples
    k2 = (log r)^2 / 2          biased, low variance, >= 0
    k3 = (r - 1) - log r        unbiased, low variance, >= 0 (since log r <= r - 1): GRPO's penalty

With a character vocabulary the exact KL over the full next-token distributions is cheap, so it is reported too.
kl_coef = 0 turns the penalty off: the policy then drifts wherever the reward pays (reward hacking).

Contents: exact_kl, kl_estimators, sample_group, group_advantages, policy_loss, rl_step, train_rl.
"""

import math

import torch
import torch.nn.functional as F

from preference import token_log_probs

ADVANTAGE_EPS = 1e-4  # keeps a group whose rewards are all equal at advantage 0 instead of 0/0 (trl's GRPO value)


def exact_kl(policy_logits, reference_logits):
    """KL(pi || pi_ref) = sum_v pi(v) (log pi(v) - log pi_ref(v)) per position: (..., V) -> (...)."""
    if policy_logits.shape != reference_logits.shape:
        raise ValueError(f"policy_logits and reference_logits must have the same shape, got "
                         f"{tuple(policy_logits.shape)} and {tuple(reference_logits.shape)}")
    policy_log_probs = F.log_softmax(policy_logits.float(), dim=-1)
    reference_log_probs = F.log_softmax(reference_logits.float(), dim=-1)
    return (policy_log_probs.exp() * (policy_log_probs - reference_log_probs)).sum(dim=-1)


def kl_estimators(policy_logp, reference_logp) -> dict:
    """Per sampled token (y ~ pi): k1, k2, k3 of the docstring from log pi(y) and log pi_ref(y), same shapes."""
    log_ratio = reference_logp - policy_logp  # log r, r = pi_ref(y) / pi(y)
    return {"k1": -log_ratio, "k2": log_ratio ** 2 / 2, "k3": torch.expm1(log_ratio) - log_ratio}


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value, allowed: str, in_range) -> None:
    is_number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not is_number or not math.isfinite(value) or not in_range(value):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")


def _check_prompt(prompt, max_new_tokens: int, context_length: int) -> None:
    if len(prompt) == 0:
        raise ValueError("a prompt must hold at least 1 token, got 0")
    if len(prompt) + max_new_tokens > context_length:
        raise ValueError(f"prompt length + max_new_tokens must be <= context_length ({context_length}) so every "
                         f"token can be scored, got {len(prompt)} + {max_new_tokens}")


@torch.no_grad()
def sample_group(policy, prompt, group_size: int, max_new_tokens: int, end_id: int, temperature: float,
                 generator: torch.Generator | None = None):
    """G samples of one prompt as one batch (all rows share the prompt, so none needs padding).

    -> ids (G, P + N), response_mask (G, P + N): True on the response up to and including its first END;
    the tokens sampled after it are not part of the response."""
    _check_int("group_size", group_size, 2)
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_number("temperature", temperature, "> 0 (a group of greedy samples would be identical)",
                  lambda t: t > 0)
    _check_prompt(prompt, max_new_tokens, policy.config.context_length)
    device = next(policy.parameters()).device
    prompt_ids = torch.tensor([list(prompt)], device=device).repeat(group_size, 1)  # (G, P)
    ids = policy.generate(prompt_ids, max_new_tokens, temperature=temperature, generator=generator)  # (G, P + N)
    is_end = ids[:, len(prompt):] == end_id  # (G, N)
    end_seen_before = (is_end.cumsum(dim=1) - is_end.long()) > 0  # an END strictly earlier in the response
    response_mask = torch.cat([torch.zeros_like(prompt_ids, dtype=torch.bool), ~end_seen_before], dim=1)
    return ids, response_mask


def group_advantages(rewards):
    """(G,) rewards of one prompt's group -> (G,) advantages (r - mean) / (std + eps) (std with Bessel's
    correction, as trl's GRPO)."""
    return (rewards - rewards.mean()) / (rewards.std() + ADVANTAGE_EPS)


def policy_loss(policy, reference, ids, response_mask, advantages, kl_coef: float):
    """The loss of the docstring for one group -> (loss, exact KL per sequence (G,), k3 sum per sequence (G,)).

    ids (G, T) with response_mask (G, T) as sample_group returns them, advantages (G,)."""
    logits = policy(ids)  # (G, T, V)
    with torch.no_grad():
        reference_logits = reference(ids)  # (G, T, V)
    mask = response_mask[:, 1:].float()  # (G, T-1): position t-1 predicts token t
    logp = token_log_probs(logits, ids)  # (G, T-1)
    reference_logp = token_log_probs(reference_logits, ids)  # (G, T-1)
    k3 = kl_estimators(logp, reference_logp)["k3"]  # (G, T-1), gradient through logp
    per_token = -advantages.unsqueeze(1) * logp + kl_coef * k3  # (G, T-1)
    loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
    with torch.no_grad():
        kl_exact = (exact_kl(logits[:, :-1], reference_logits[:, :-1]) * mask).sum(dim=1)  # (G,)
    return loss, kl_exact, (k3.detach() * mask).sum(dim=1)


def rl_step(policy, reference, optimizer, prompts, reward_fn, group_size: int, kl_coef: float,
            max_new_tokens: int, end_id: int, temperature: float, generator: torch.Generator | None = None) -> dict:
    """One update: sample a group per prompt, score with reward_fn(prompt_ids, response_ids) -> float (the
    response up to and including its first END), standardise within each group, one optimizer step.

    -> dict(reward_mean, reward_std (within groups, averaged), kl (exact KL per sequence, summed over its
    response tokens, averaged), kl_k3 (the same with the k3 estimate), loss, response_length)."""
    _check_number("kl_coef", kl_coef, ">= 0", lambda c: c >= 0)
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least 1 prompt, got 0")
    rewards_all, stds, kls, k3s, losses, lengths = [], [], [], [], [], []
    optimizer.zero_grad(set_to_none=True)
    for prompt in prompts:
        ids, response_mask = sample_group(policy, prompt, group_size, max_new_tokens, end_id, temperature, generator)
        responses = [row[mask].tolist() for row, mask in zip(ids, response_mask)]
        rewards = torch.tensor([float(reward_fn(list(prompt), response)) for response in responses])
        if not torch.isfinite(rewards).all():
            raise ValueError(f"reward_fn must return finite numbers, got {rewards.tolist()}")
        advantages = group_advantages(rewards).to(ids.device)
        loss, kl_exact, kl_k3 = policy_loss(policy, reference, ids, response_mask, advantages, kl_coef)
        (loss / len(prompts)).backward()  # accumulate: the step's loss is the mean over its groups
        rewards_all.append(rewards)
        stds.append(rewards.std().item())
        kls.append(kl_exact)
        k3s.append(kl_k3)
        losses.append(loss.item())
        lengths.append(response_mask.sum(dim=1).float())
    optimizer.step()
    return {"reward_mean": torch.cat(rewards_all).mean().item(), "reward_std": sum(stds) / len(stds),
            "kl": torch.cat(kls).mean().item(), "kl_k3": torch.cat(k3s).mean().item(),
            "loss": sum(losses) / len(losses), "response_length": torch.cat(lengths).mean().item()}


def train_rl(policy, reference, prompts, reward_fn, steps: int, prompts_per_step: int, group_size: int,
             kl_coef: float, learning_rate: float, max_new_tokens: int, end_id: int, temperature: float,
             generator: torch.Generator | None = None, on_step=None) -> list:
    """steps calls of rl_step with AdamW, each on prompts_per_step prompts drawn without replacement;
    the reference stays frozen. -> one dict per step (rl_step's, plus step, plus what on_step(step, policy)
    returns when given: a demo measures there what the reward does not show, e.g. the true accuracy)."""
    _check_int("steps", steps, 1)
    _check_int("prompts_per_step", prompts_per_step, 1)
    _check_number("learning_rate", learning_rate, "> 0", lambda lr: lr > 0)
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least 1 prompt, got 0")
    # weight_decay 0: decay would pull the weights toward zero, not toward the reference
    optimizer = torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=0.0)
    reference.eval()
    history = []
    for step in range(steps):
        order = torch.randperm(len(prompts), generator=generator, device=generator.device if generator else "cpu")
        chosen = [prompts[i] for i in order[:prompts_per_step].tolist()]
        record = rl_step(policy, reference, optimizer, chosen, reward_fn, group_size, kl_coef, max_new_tokens,
                         end_id, temperature, generator)
        history.append({"step": step, **record, **((on_step(step, policy) or {}) if on_step else {})})
    return history
