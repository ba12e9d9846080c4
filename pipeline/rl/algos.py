"""The arithmetic of policy optimisation, torch only (importable without DeepSpeed, TRL or
transformers): advantage estimators, KL terms, returns, GAE, whitening and the policy and value losses
that ReMax, RLOO, GRPO and PPO are made of.

- The reward: the reward model's score plus the reward functions' weighted values.
- Advantage estimators, per sequence: ReMax r(sample) - r(greedy); RLOO r_i minus the mean reward of
  the other k - 1 samples of its prompt; GRPO (r_i - group mean) / group std.
- KL to the reference goes either into the reward (the log-ratio summed over a response, or per token
  for ReMax and PPO) or into the loss (k3 per token), as configured.
- Losses: REINFORCE over per-token returns (ReMax); PPO's clipped surrogate (RLOO, GRPO, PPO) with an
  optional k3 KL term; PPO's clipped value loss with GAE targets.

Shapes: N sequences (B prompts x k samples, each prompt's samples adjacent), T response tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

KL_PENALTIES = ("reward", "loss")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 of each row of a 0/1 mask (B, T), for right or left padding; (B,) long, 0 for
    an empty row."""
    positions = torch.arange(mask.shape[-1], device=mask.device)  # (T,)
    return (mask.long() * positions).max(dim=-1).values


# ---- advantage estimators -----------------------------------------------------------------------

def remax_advantage(sample_reward: torch.Tensor, greedy_reward: torch.Tensor,
                    clip: Optional[float]) -> torch.Tensor:
    """r(x, y) - r(x, y_hat), clipped to [-clip, clip] (no clipping when clip is None).

    sample_reward, greedy_reward: (B,). Returns (B,).
    """
    advantage = sample_reward - greedy_reward
    return advantage if clip is None else advantage.clamp(-clip, clip)


def grouped(reward: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) rewards of N / k prompts with k adjacent samples each, as (N / k, k).

    Raises:
        ValueError: N is not a multiple of k.
    """
    if reward.dim() != 1 or reward.shape[0] % k:
        raise ValueError(f"{tuple(reward.shape)} rewards do not make groups of {k} samples")
    return reward.view(-1, k)


def rloo_advantage(reward: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out: r_i minus the mean reward of the other k - 1 samples of the same prompt.

    reward: (N,), each prompt's k samples adjacent; k >= 2. Returns (N,).
    """
    groups = grouped(reward, k)  # (N / k, k)
    others = (groups.sum(-1, keepdim=True) - groups) / (k - 1)
    return (groups - others).reshape(-1)


def grpo_advantage(reward: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative: (r_i - group mean) / (group std + eps) (unbiased std), or r_i - group mean
    without `scale`. A group whose rewards are all equal carries no signal and gets exactly zero
    (never NaN, nor rounding noise divided by eps).

    reward: (N,), each prompt's k samples adjacent; k >= 2. Returns (N,).
    """
    groups = grouped(reward, k)  # (N / k, k)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    flat = (groups == groups[:, :1]).all(-1, keepdim=True)  # (N / k, 1)
    return torch.where(flat, torch.zeros_like(centred), centred).reshape(-1)


def combined_reward(model_reward: torch.Tensor, function_values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reward trained on: the reward model's score plus the weighted values of the reward functions,
    a function's NaN (it left that response unscored) adding nothing.

    model_reward: (N,) (zeros without a reward model); function_values: (F, N), NaN where unscored;
    weights: (F,). Returns (N,).
    """
    weighted = weights.to(function_values.dtype).unsqueeze(-1) * function_values  # (F, N)
    return model_reward + torch.where(torch.isnan(function_values), 0.0, weighted).sum(0).to(model_reward.dtype)


# ---- KL to the reference ------------------------------------------------------------------------

def sequence_log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) log pi - log pi_ref summed over each response: the sample estimate of KL(pi || pi_ref)."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


def kl_penalized_sequence_reward(reward: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                        mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """KL in the reward: r - kl_coef * sum_t (log pi(y_t) - log pi_ref(y_t)) over each response (RLOO's
    sequence-level penalty). reward: (N,); logprobs, ref_logprobs, mask: (N, T). Returns (N,), no grad."""
    return reward - kl_coef * sequence_log_ratio(logprobs.detach(), ref_logprobs, mask.to(logprobs.dtype))


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = log pi_ref - log pi; never
    negative, unbiased under samples of pi, with grad through `logprobs`. (N, T) -> (N, T)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def kl_penalized_token_rewards(actor_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                               advantage: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """ReMax's per-token rewards: -kl_coef * (log pi(y_t) - log pi_ref(y_t)) on every response token,
    plus the advantage on each row's last response token.

    actor_logprobs, ref_logprobs, mask: (B, T), mask 1 on a prefix of each row; advantage: (B,).
    Returns (B, T), zero outside the mask (a row without response tokens gets nothing).
    """
    mask = mask.to(actor_logprobs.dtype)
    rewards = -kl_coef * (actor_logprobs - ref_logprobs) * mask  # (B, T)
    rows = torch.arange(mask.shape[0], device=mask.device)
    last = last_token_index(mask)  # (B,)
    return rewards.index_put((rows, last), advantage.to(rewards.dtype) * mask[rows, last], accumulate=True)


# ---- policy losses ------------------------------------------------------------------------------

def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over each row's response tokens.

    rewards, mask: (B, T). Returns (B, T), zero outside the mask.
    """
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def reinforce_loss(logprobs: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token mean of -G_t * log pi(y_t) over the response tokens; the returns are constants.

    logprobs, returns, mask: (B, T); weights: (B, T) per-token importance weights (constants) or None.
    Returns a scalar (0 when the mask is empty).
    """
    mask = mask.to(logprobs.dtype)
    per_token = returns.detach() * logprobs * mask
    if weights is not None:
        per_token = per_token * weights.detach()
    return -per_token.sum() / mask.sum().clamp(min=1)


def truncated_importance_weights(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """Per-token min(pi_trainer(y_t) / pi_sampler(y_t), cap): corrects the loss for tokens drawn by a
    rollout engine whose probabilities differ from the trainer's (other kernels, precision), truncated
    so a token the sampler under-rated cannot dominate (Yao et al. 2025, TRL's and verl's TIS).
    (N, T) each, no grad. Returns (N, T)."""
    return torch.exp(trainer_logprobs.detach() - sampler_logprobs).clamp(max=cap)


def clipped_surrogate_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantage: torch.Tensor,
                           mask: torch.Tensor, clip_range: float, ref_logprobs: Optional[torch.Tensor] = None,
                           kl_coef: float = 0.0, weights: Optional[torch.Tensor] = None) -> tuple:
    """PPO's clipped surrogate, token mean over the response tokens, with k3 KL as a loss term.

    Per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) with rho = pi / pi_old, plus
    kl_coef * k3(pi, pi_ref) when `ref_logprobs` is given. logprobs (with grad), old_logprobs,
    ref_logprobs, mask: (N, T); advantage: (N,), credited to every token of its response, or (N, T)
    per token (PPO's GAE); weights: (N, T) per-token importance weights of the policy term, or None.
    Returns (loss, (N, T) bool: tokens whose ratio the clip held back).
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    advantage = advantage.detach().to(logprobs.dtype)
    if advantage.dim() == 1:
        advantage = advantage.unsqueeze(-1)  # (N, 1)
    unclipped, clipped = ratio * advantage, ratio.clamp(1 - clip_range, 1 + clip_range) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    if weights is not None:  # the sampler correction weighs the policy term, not the KL (as TRL)
        per_token = per_token * weights.detach()
    if ref_logprobs is not None and kl_coef:
        per_token = per_token + kl_coef * k3_kl(logprobs, ref_logprobs)
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    return loss, (clipped < unclipped) & mask.bool()


# ---- critic parts (PPO) -------------------------------------------------------------------------

def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple:
    """Generalised advantage estimation over each row's response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t (V past the response is 0), A_t = delta_t + gamma * lam * A_{t+1}.
    rewards, values, mask: (B, T), mask 1 on a prefix of each row. Returns ((B, T) advantages,
    (B, T) returns A + V), zero outside the mask, no grad.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards.detach() * mask, values.detach() * mask
    advantages = torch.zeros_like(values)
    running, next_value = torch.zeros_like(values[:, 0]), torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_range: float) -> torch.Tensor:
    """PPO's value loss: 0.5 * token mean of max((V - R)^2, (V_clipped - R)^2), where V_clipped stays
    within clip_range of the rollout's values. values (with grad), old_values, returns, mask: (B, T)."""
    mask = mask.to(values.dtype)
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    per_token = torch.maximum((values - returns).square(), (clipped - returns).square())
    return 0.5 * (per_token * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the tokens in `mask` (the micro-batch's response tokens), zero outside
    it: PPO's advantage normalisation. values, mask: (B, T). Fewer than two tokens: centred only."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean = (values * mask).sum() / count.clamp(min=1)
    centred = (values - mean) * mask
    if count < 2:
        return centred
    variance = centred.square().sum() / (count - 1)
    return centred * torch.rsqrt(variance + eps)
