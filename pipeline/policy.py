"""Policy optimisation from parts: rollouts, advantage estimators and policy losses that ReMax,
RLOO and GRPO (stages/remax.py, stages/rloo.py, stages/grpo.py) are made of.

- Models and rollouts: the actor (a training engine), the frozen reference (or the LoRA actor with
  its adapters disabled) and the frozen reward model; `rollout` samples and greedily decodes one
  response per prompt (ReMax's training step and every stage's evaluation), `group_rollout` samples
  k responses per prompt (RLOO, GRPO).
- Advantage estimators, per sequence: ReMax r(sample) - r(greedy); RLOO r_i minus the mean reward
  of the other k - 1 samples of its prompt; GRPO (r_i - group mean) / group std.
- Losses: ReMax's REINFORCE over KL-penalised per-token returns; the clipped surrogate of PPO / GRPO
  with an optional k3 KL term. KL to the reference goes either into the sequence reward (log-ratio
  summed over the response) or into the loss (k3 per token), as configured.
- `RolloutBuffer` trains on each rollout for `updates_per_rollout` optimizer steps. With one update
  (the default) the old log-probabilities are the current ones detached: no second actor forward.

Shapes: N sequences (B prompts x k samples, each prompt's samples adjacent), T response tokens.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from trl.models.utils import add_hooks, remove_hooks
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from pipeline.data import prepare_dataset
from pipeline.engine import (batch_plan, create_engine, create_frozen_engine, frozen_ds_config, init_distributed,
                             sharded_creation, training_ds_config)
from pipeline.generation import (GOLD_REWARDS, Responses, collate_with_prompts, generate_responses,
                                 generation_configs, load_gold_reward, response_logprobs, scored, with_positions)
from pipeline.loop import Stage, add_sums, sum_over_ranks, to_device, total_optimizer_steps, train
from pipeline.models import (RewardModel, adapters_disabled, apply_lora, last_token_index, load_causal_lm,
                             load_reference, load_tokenizer, model_dtype)
from pipeline.rundir import RunDirectory

logger = logging.getLogger(__name__)

KL_PENALTIES = ("reward", "loss")


# ---- config shared by the sampling stages -------------------------------------------------------

@dataclasses.dataclass
class PolicySection:
    """The settings of RLOO and GRPO (each stage's section is this, with its own defaults)."""
    reward_model_path: Optional[str] = None   # a RewardModel directory (stages.reward's export)
    ref_model_path: Optional[str] = None      # frozen reference policy; defaults to the actor's starting weights
    eval_prompts_path: Optional[str] = None   # held-out prompts; else `data.eval_path` or a split of `data.path`
    num_samples: int = 4                      # k responses per prompt
    kl_coef: float = 0.05
    kl_penalty: str = "reward"                # reward: -kl_coef * log-ratio summed into the reward; loss: k3 term
    updates_per_rollout: int = 1              # optimizer steps on each rollout (1: old log-probs = current, detached)
    clip_range: float = 0.2                   # the surrogate's ratio clip, 1 +- clip_range
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    eval_every_steps: Optional[int] = None    # also evaluated at step 0 and at the end
    # Frozen models have no optimizer state or gradients: only ZeRO-3 (weight sharding) saves memory.
    ref_zero_stage: int = 0
    ref_offload: bool = False
    reward_zero_stage: int = 0
    reward_offload: bool = False
    gold_reward: Optional[str] = None         # a programmatic true reward to log next to the model's: "demo"
    missing_eos_penalty: Optional[float] = None  # subtracted from responses cut by max_new_tokens (as ReMax)


def section_problems(config, section: PolicySection, name: str, min_samples: int = 2) -> list:
    """Every problem of a `PolicySection` named `name` within `config`, each naming its field
    (`min_samples`: 2 where the baseline comes from the other samples of a prompt, 1 with a critic)."""
    problems = sampling_problems(config, section, name)
    if section.num_samples < min_samples:
        why = "the baseline comes from the other samples of the same prompt: " if min_samples > 1 else ""
        problems.append(f"`{name}.num_samples` is {section.num_samples}; {why}use {min_samples} or more")
    if section.kl_coef < 0:
        problems.append(f"`{name}.kl_coef` is {section.kl_coef}; it must not be negative (0 turns the KL off)")
    if section.kl_penalty not in KL_PENALTIES:
        problems.append(f"`{name}.kl_penalty` is {section.kl_penalty!r}; use one of {', '.join(KL_PENALTIES)}")
    if section.updates_per_rollout < 1:
        problems.append(f"`{name}.updates_per_rollout` is {section.updates_per_rollout}; use 1 or more")
    elif config.checkpoint.every_steps and config.checkpoint.every_steps % section.updates_per_rollout:
        problems.append(f"`checkpoint.every_steps` {config.checkpoint.every_steps} is not a multiple of "
                        f"`{name}.updates_per_rollout` {section.updates_per_rollout}; a checkpoint must fall "
                        "between rollouts so that a resumed run samples where the uninterrupted one does")
    if not section.clip_range > 0:
        problems.append(f"`{name}.clip_range` is {section.clip_range}; it must be positive")
    return problems


def sampling_problems(config, section, name: str) -> list:
    """The problems of the settings every sampling stage's section has (ReMax's and `PolicySection`):
    data format, models, decoding, evaluation and the frozen models' ZeRO stages."""
    problems = []
    if config.data.format != "prompt":
        problems.append(f"`data.format` is {config.data.format!r}; {name} generates from prompts: use prompt")
    if section.reward_model_path is None:
        problems.append(f"`{name}.reward_model_path` is not set; give the directory of a trained reward model "
                        "(the export of stages.reward)")
    if section.missing_eos_penalty is not None and section.missing_eos_penalty < 0:
        problems.append(f"`{name}.missing_eos_penalty` is {section.missing_eos_penalty}; it must not be negative")
    if section.temperature <= 0:
        problems.append(f"`{name}.temperature` is {section.temperature}; it must be positive")
    if not 0 < section.top_p <= 1:
        problems.append(f"`{name}.top_p` is {section.top_p}; use a value in (0, 1]")
    if section.max_new_tokens <= 0:
        problems.append(f"`{name}.max_new_tokens` is {section.max_new_tokens}; it must be a positive integer")
    elif config.data.max_prompt_length + section.max_new_tokens > config.data.max_length:
        problems.append(f"`data.max_prompt_length` {config.data.max_prompt_length} + `{name}.max_new_tokens` "
                        f"{section.max_new_tokens} exceeds `data.max_length` {config.data.max_length}; raise "
                        "`data.max_length` or shorten one of them")
    if section.eval_every_steps is not None and section.eval_every_steps <= 0:
        problems.append(f"`{name}.eval_every_steps` is {section.eval_every_steps}; it must be a positive integer")
    if (section.eval_every_steps and config.training.eval_every_steps
            and section.eval_every_steps != config.training.eval_every_steps):
        problems.append(f"`{name}.eval_every_steps` {section.eval_every_steps} and `training.eval_every_steps` "
                        f"{config.training.eval_every_steps} disagree; set only one")
    if section.eval_prompts_path and config.data.eval_path and section.eval_prompts_path != config.data.eval_path:
        problems.append(f"`{name}.eval_prompts_path` {section.eval_prompts_path} and `data.eval_path` "
                        f"{config.data.eval_path} disagree; set only one")
    for model in ("ref", "reward"):
        stage, offload = getattr(section, f"{model}_zero_stage"), getattr(section, f"{model}_offload")
        if stage not in (0, 3):
            problems.append(f"`{name}.{model}_zero_stage` is {stage}; use 0 (a full copy per rank) or 3 (sharded): "
                            "a frozen model has no optimizer state or gradients for ZeRO 1 or 2 to shard")
        if offload and stage != 3:
            problems.append(f"`{name}.{model}_offload` is true with `{name}.{model}_zero_stage` {stage}; "
                            "offloading needs ZeRO-3")
    if section.gold_reward is not None and section.gold_reward not in GOLD_REWARDS:
        problems.append(f"`{name}.gold_reward` is {section.gold_reward!r}; use one of {', '.join(GOLD_REWARDS)} "
                        "or leave it unset")
    return problems


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


# ---- KL to the reference ------------------------------------------------------------------------

def sequence_log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) log pi - log pi_ref summed over each response: the sample estimate of KL(pi || pi_ref)."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


def kl_penalized_reward(reward: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                        mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """KL in the reward: r - kl_coef * sum_t (log pi(y_t) - log pi_ref(y_t)) over each response (RLOO's
    sequence-level penalty). reward: (N,); logprobs, ref_logprobs, mask: (N, T). Returns (N,), no grad."""
    return reward - kl_coef * sequence_log_ratio(logprobs.detach(), ref_logprobs, mask.to(logprobs.dtype))


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = log pi_ref - log pi; never
    negative, unbiased under samples of pi, with grad through `logprobs`. (N, T) -> (N, T)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def kl_penalized_rewards(actor_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         advantage: torch.Tensor, kl_ctl: float) -> torch.Tensor:
    """ReMax's per-token rewards: -kl_ctl * (log pi(y_t) - log pi_ref(y_t)) on every response token,
    plus the advantage on each row's last response token.

    actor_logprobs, ref_logprobs, mask: (B, T), mask 1 on a prefix of each row; advantage: (B,).
    Returns (B, T), zero outside the mask (a row without response tokens gets nothing).
    """
    mask = mask.to(actor_logprobs.dtype)
    rewards = -kl_ctl * (actor_logprobs - ref_logprobs) * mask  # (B, T)
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


def reinforce_loss(logprobs: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean of -G_t * log pi(y_t) over the response tokens; the returns are constants.

    logprobs, returns, mask: (B, T). Returns a scalar (0 when the mask is empty).
    """
    mask = mask.to(logprobs.dtype)
    return -(returns.detach() * logprobs * mask).sum() / mask.sum().clamp(min=1)


def clipped_surrogate_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantage: torch.Tensor,
                           mask: torch.Tensor, clip_range: float, ref_logprobs: Optional[torch.Tensor] = None,
                           kl_coef: float = 0.0) -> tuple:
    """PPO's clipped surrogate, token mean over the response tokens, with k3 KL as a loss term.

    Per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) with rho = pi / pi_old, plus
    kl_coef * k3(pi, pi_ref) when `ref_logprobs` is given. logprobs (with grad), old_logprobs,
    ref_logprobs, mask: (N, T); advantage: (N,), credited to every token of its response, or (N, T)
    per token (PPO's GAE).
    Returns (loss, (N, T) bool: tokens whose ratio the clip held back).
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    advantage = advantage.detach().to(logprobs.dtype)
    if advantage.dim() == 1:
        advantage = advantage.unsqueeze(-1)  # (N, 1)
    unclipped, clipped = ratio * advantage, ratio.clamp(1 - clip_range, 1 + clip_range) * advantage
    per_token = -torch.minimum(unclipped, clipped)
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


# ---- models and rollouts ------------------------------------------------------------------------

@dataclasses.dataclass
class Models:
    actor: object        # training DeepSpeed engine
    reference: object    # frozen engine: the policy the KL is measured against; None: the LoRA actor without adapters
    reward: object       # frozen engine around a RewardModel
    tokenizer: object
    gold_reward: Optional[Callable]  # (prompts, responses) -> list of floats, or None
    missing_eos_penalty: Optional[float] = None


def load_reward_model(config, path: str, field: str, dtype) -> RewardModel:
    """The reward model at `path` (a frozen scorer, or PPO's critic to train) in `dtype`, with the run's
    attention implementation and remote-code setting; errors name `field`."""
    return RewardModel.from_pretrained(path, dtype=dtype, attn_implementation=config.model.attn_implementation,
                                       trust_remote_code=config.model.trust_remote_code, field=field)


def build_models(config, section, name: str, tokenizer, total_steps: int):
    """(Models, the actor's TrainingEngine): actor from `model`, reference and reward model frozen, as
    `section` (the config section `name`: reward_model_path, ref_model_path, ref_/reward_zero_stage,
    ref_/reward_offload, gold_reward, missing_eos_penalty) sets them.

    Raises:
        ModelLoadError: naming `model.path`, `<name>.ref_model_path` or `<name>.reward_model_path`.
        EngineConfigError: as create_engine / create_frozen_engine.
    """
    # Every model loads in the precision it runs in (bf16 engines: bf16 straight from safetensors).
    dtype = model_dtype(config.model, config.engine.precision)
    # One model at a time: each is created (sharded from the start where its engine is ZeRO-3) and
    # wrapped in its engine before the next loads, so load transients never stack. The frozen models
    # first: a wrong path fails before minutes of loading the actor.
    with sharded_creation(frozen_ds_config(config, section.reward_zero_stage, section.reward_offload)):
        reward = load_reward_model(config, section.reward_model_path, f"{name}.reward_model_path", dtype)
    reward = create_frozen_engine(config, reward, zero_stage=section.reward_zero_stage,
                                  offload=section.reward_offload)
    # From its own files (memory-mapped), never a copy of the actor; None with LoRA: the actor with its
    # adapters disabled is the reference, with no second copy of the weights at all.
    with sharded_creation(frozen_ds_config(config, section.ref_zero_stage, section.ref_offload)):
        reference = load_reference(config.model, section.ref_model_path, dtype=dtype,
                                   field=f"{name}.ref_model_path")
    copy_reference = reference is None and not config.model.lora.enabled
    # A fresh model (`model.config`) has no files: its reference is a copy of its starting weights,
    # so it is built whole (only test and demo models are built from a config).
    with contextlib.nullcontext() if copy_reference else sharded_creation(training_ds_config(config)):
        actor = load_causal_lm(config.model, dtype=dtype)
    if copy_reference:
        # DeepSpeed casts it as it does the actor (parameters only: `.to(bf16)` would also round RoPE's inv_freq).
        reference = copy.deepcopy(actor)
    if reference is not None:
        reference = create_frozen_engine(config, reference, zero_stage=section.ref_zero_stage,
                                         offload=section.ref_offload)
    if config.model.lora.enabled:
        actor = apply_lora(actor, config.model.lora)
    built = create_engine(config, actor, total_steps)
    models = Models(actor=built.engine, reference=reference, reward=reward, tokenizer=tokenizer,
                    gold_reward=load_gold_reward(section.gold_reward, f"{name}.gold_reward"),
                    missing_eos_penalty=section.missing_eos_penalty)
    return models, built


@contextlib.contextmanager
def weights_for_generation(engine):
    """The actor's module, ready for `generate`. Under ZeRO-3 the full weights are gathered once and
    DeepSpeed's hooks removed for the duration (as TRL does): one all-gather instead of one per
    generated token, and ranks whose responses end sooner need not keep stepping with the others.
    Each rank briefly holds the whole actor."""
    if engine.zero_optimization_stage() != 3:
        yield engine.module
        return
    from deepspeed import zero  # imported here, after pipeline.engine has picked the accelerator

    with zero.GatheredParameters(list(engine.module.parameters())):
        remove_hooks(engine)
        try:
            yield engine.module
        finally:
            add_hooks(engine)


@contextlib.contextmanager
def reference_policy(models: Models):
    """The frozen reference, or the LoRA actor with its adapters disabled when there is none."""
    if models.reference is not None:
        yield models.reference
    else:
        with adapters_disabled(models.actor) as reference:
            yield reference


@dataclasses.dataclass
class Rollout:
    sampled: Responses
    greedy: Responses
    actor_logprobs: torch.Tensor  # (B, T) of the sampled response, no grad
    ref_logprobs: torch.Tensor    # (B, T)
    entropy: torch.Tensor         # (B, T) the actor's token entropy along the sampled response


@torch.no_grad()
def rollout(models: Models, batch: dict, sample_config, greedy_config) -> Rollout:
    """Samples and greedily decodes one response per prompt, scores both, and takes the actor's and
    the reference's log-probs of the sampled one. Collective under ZeRO-3: every rank calls it."""
    models.actor.eval()
    with weights_for_generation(models.actor) as actor:
        sampled = generate_responses(actor, batch, sample_config, models.tokenizer)
        greedy = generate_responses(actor, batch, greedy_config, models.tokenizer)
    penalty = (models.tokenizer.eos_token_id, models.missing_eos_penalty)
    sampled, greedy = scored(models.reward, *sampled, *penalty), scored(models.reward, *greedy, *penalty)
    response_length = sampled.mask.shape[1]
    actor_logprobs, entropy = response_logprobs(models.actor, sampled.sequences, sampled.attention_mask,
                                                response_length, with_entropy=True)
    with reference_policy(models) as reference:
        ref_logprobs, _ = response_logprobs(reference, sampled.sequences, sampled.attention_mask, response_length)
    return Rollout(sampled, greedy, actor_logprobs, ref_logprobs, entropy)


def sequence_kl(experience: Rollout) -> torch.Tensor:
    """(B,) summed log pi - log pi_ref over each sampled response: the usual sample estimate of KL(pi || pi_ref)."""
    return ((experience.actor_logprobs - experience.ref_logprobs) * experience.sampled.mask).sum(-1)


def repeat_prompts(batch: dict, k: int) -> dict:
    """The prompt batch with each prompt k times in a row: B prompts -> B * k rows."""
    return {name: value.repeat_interleave(k, dim=0) if torch.is_tensor(value)
            else [item for item in value for _ in range(k)] for name, value in batch.items()}


@dataclasses.dataclass
class GroupRollout:
    """k sampled responses to each of B prompts (N = B * k rows, each prompt's adjacent)."""
    sampled: Responses
    prompts: list                          # (N,) prompt texts, for the gold reward
    ref_logprobs: torch.Tensor             # (N, T)
    old_logprobs: Optional[torch.Tensor]   # (N, T) the sampling policy's; None: take the update's own, detached


@torch.no_grad()
def group_rollout(models: Models, batch: dict, k: int, sample_config, with_old_logprobs: bool) -> GroupRollout:
    """Samples k responses per prompt and scores them; the reference's log-probs, and the actor's when
    the rollout will be trained on more than once. Collective under ZeRO-3: every rank calls it."""
    models.actor.eval()
    repeated = repeat_prompts(batch, k)
    with weights_for_generation(models.actor) as actor:
        sampled = generate_responses(actor, repeated, sample_config, models.tokenizer)
    sampled = scored(models.reward, *sampled, models.tokenizer.eos_token_id, models.missing_eos_penalty)
    response_length = sampled.mask.shape[1]
    old_logprobs = None
    if with_old_logprobs:
        old_logprobs, _ = response_logprobs(models.actor, sampled.sequences, sampled.attention_mask, response_length)
    with reference_policy(models) as reference:
        ref_logprobs, _ = response_logprobs(reference, sampled.sequences, sampled.attention_mask, response_length)
    return GroupRollout(sampled, repeated.get("prompt", []), ref_logprobs, old_logprobs)


def policy_logprobs(model, responses: Responses) -> tuple:
    """The update's forward: ((N, T) log-probs with grad, (N, T) token entropies without)."""
    length = responses.mask.shape[1]
    logits = model(**with_positions(responses.sequences, responses.attention_mask), use_cache=False,
                   logits_to_keep=length + 1).logits[:, :-1].float()  # (N, T, V)
    logprobs = selective_log_softmax(logits, responses.sequences[:, -length:])
    with torch.no_grad():
        entropy = entropy_from_logits(logits.detach())
    return logprobs, entropy


class RolloutBuffer:
    """Trains on each micro-batch's rollout for `updates` optimizer steps: the rollouts of a step's
    accumulation window are made on the first of every `updates` steps and reused on the others (the
    loader's batches of those steps go unused). Checkpoints fall between rollouts (the config checks
    `checkpoint.every_steps`), so a resumed run starts with a fresh rollout as the uninterrupted one does."""

    def __init__(self, updates: int, accumulation: int):
        self.updates, self.accumulation = updates, accumulation
        self.calls, self.kept = 0, {}

    def get(self, make: Callable):
        """This micro-batch's rollout: `make()` on a rollout step, else the one kept from it."""
        step, slot = divmod(self.calls, self.accumulation)
        self.calls += 1
        if step % self.updates == 0:
            self.kept[slot] = make()
        return self.kept[slot]

    def resume_at(self, step: int) -> None:
        self.calls, self.kept = step * self.accumulation, {}


# ---- a step of RLOO / GRPO ----------------------------------------------------------------------

def group_step(models: Models, batch: dict, section: PolicySection, sample_config, estimator: Callable,
               buffer: RolloutBuffer) -> tuple:
    """Rollout (or the kept one), advantages by `estimator` ((N,) rewards -> (N,) advantages) and the
    clipped surrogate loss with grad for one micro-batch.

    Returns (loss, sums over this micro-batch's sequences for `group_step_metrics`).
    """
    multi = section.updates_per_rollout > 1
    experience = buffer.get(lambda: group_rollout(models, batch, section.num_samples, sample_config, multi))
    sampled, mask = experience.sampled, experience.sampled.mask
    models.actor.train()
    logprobs, entropy = policy_logprobs(models.actor, sampled)
    old = experience.old_logprobs if multi else logprobs.detach()
    reward = sampled.reward
    if section.kl_penalty == "reward":
        reward = kl_penalized_reward(reward, old, experience.ref_logprobs, mask, section.kl_coef)
    advantage = estimator(reward)
    in_loss = section.kl_penalty == "loss"
    loss, clipped = clipped_surrogate_loss(logprobs, old, advantage, mask, section.clip_range,
                                           experience.ref_logprobs if in_loss else None, section.kl_coef)
    fmask = mask.to(logprobs.dtype)
    sums = {"sequences": len(advantage), "reward": sampled.reward.sum(), "advantage": advantage.sum(),
            "advantage_squared": advantage.square().sum(),
            "kl": sequence_log_ratio(old, experience.ref_logprobs, fmask).sum(),
            "k3_kl": (k3_kl(logprobs.detach(), experience.ref_logprobs) * fmask).sum(),
            "clipped_tokens": clipped.sum(), "response_length": sampled.lengths.sum(),
            "entropy": (entropy * fmask).sum(), "response_tokens": fmask.sum(), "tokens": sampled.attention_mask.sum()}
    if models.gold_reward is not None:
        sums["gold_reward"] = sum(models.gold_reward(experience.prompts, sampled.texts(models.tokenizer)))
    return loss, sums


def group_step_metrics(total: dict) -> dict:
    """Per-step metrics from `group_step` sums added over micro-batches and ranks."""
    n, tokens = total["sequences"], max(total["response_tokens"], 1.0)
    advantage_mean = total["advantage"] / n
    metrics = {"reward": total["reward"] / n, "advantage_mean": advantage_mean,
               "advantage_std": math.sqrt(max(total["advantage_squared"] / n - advantage_mean ** 2, 0.0)),
               "kl": total["kl"] / n, "k3_kl": total["k3_kl"] / tokens,
               "clip_fraction": total["clipped_tokens"] / tokens, "response_length": total["response_length"] / n,
               "entropy": total["entropy"] / tokens, "loss": total["loss"] / total["micro_batches"]}
    if "gold_reward" in total:
        metrics["gold_reward"] = total["gold_reward"] / n
    return metrics


# ---- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(models: Models, loader, generation: tuple, device) -> dict:
    """Held-out prompts: greedy reward (`eval/reward`, the number the best checkpoint follows), sampled
    reward, KL of the samples and greedy response length, averaged over every rank's prompts."""
    total = {}
    for batch in loader:
        experience = rollout(models, to_device(batch, device), *generation)
        sampled, greedy = experience.sampled, experience.greedy
        sums = {"sequences": len(greedy.reward), "eval/reward": greedy.reward.sum(),
                "eval/sampled_reward": sampled.reward.sum(), "eval/kl": sequence_kl(experience).sum(),
                "eval/response_length": greedy.lengths.sum()}
        if models.gold_reward is not None:
            sums["eval/gold_reward"] = sum(models.gold_reward(batch["prompt"], greedy.texts(models.tokenizer)))
        total = add_sums(total, sums)
    total = sum_over_ranks(total, device)
    count = total.pop("sequences")
    return {name: value / count for name, value in total.items()}


# ---- the run of a sampling stage ----------------------------------------------------------------

BEST_DIR = "best"  # the actor at its best held-out greedy reward, with best.json ({best_step, best_eval_reward})


def prompt_data(config, section) -> tuple:
    """(tokenizer, training prompts, held-out prompts, batch plan) of a sampling stage whose section
    may name its held-out prompts (`eval_prompts_path`); the data report is logged on rank 0."""
    tokenizer = load_tokenizer(config.model)
    data = dataclasses.replace(config.data, eval_path=section.eval_prompts_path or config.data.eval_path)
    train_set, eval_set, report = prepare_dataset(data, tokenizer, config.seed)
    plan = batch_plan(config, init_distributed())
    if dist.get_rank() == 0:
        logger.info(report.summary())
    return tokenizer, train_set, eval_set, plan


class BestCheckpoint:
    """Keeps `best/`: the actor exported whenever its held-out greedy reward (`eval/reward`) beats
    every earlier evaluation's, with best.json. Its record travels in the run's checkpoints, so a
    resumed run compares against the same best; `buffer` (a RolloutBuffer) is re-aligned on resume."""

    def __init__(self, run_dir: RunDirectory, engine, tokenizer, buffer=None):
        self.run_dir, self.engine, self.tokenizer, self.buffer = run_dir, engine, tokenizer, buffer
        self.record = {"best_step": None, "best_eval_reward": None}

    def after_evaluation(self, result: dict, step: int) -> None:
        if self.record["best_eval_reward"] is None or result["eval/reward"] > self.record["best_eval_reward"]:
            self.record.update(best_step=step, best_eval_reward=result["eval/reward"])
            self.run_dir.export(self.engine, self.tokenizer, BEST_DIR, metadata=self.record)

    def state(self) -> dict:
        return dict(self.record)

    def load_state(self, state: dict) -> None:
        self.record.update({key: state.get(key) for key in self.record})
        if self.buffer is not None:
            self.buffer.resume_at(state["step"])

    def stage_hooks(self) -> dict:
        """The `Stage` fields it fills."""
        return dict(after_evaluation=self.after_evaluation, state=self.state, load_state=self.load_state)


def run_group_stage(config, section: PolicySection, name: str, estimator: Callable) -> dict:
    """Trains the actor of RLOO / GRPO (`estimator`: (N,) rewards -> (N,) advantages) for the planned
    steps, keeping `best/` at the best held-out greedy reward; returns the last evaluation's metrics."""
    tokenizer, train_set, eval_set, plan = prompt_data(config, section)
    models, built = build_models(config, section, name, tokenizer, total_optimizer_steps(config, len(train_set), plan))
    device, run_dir = built.engine.device, RunDirectory(config)
    generation = generation_configs(tokenizer, section.max_new_tokens, section.temperature, section.top_p)
    buffer = RolloutBuffer(section.updates_per_rollout, plan.gradient_accumulation_steps)
    best = BestCheckpoint(run_dir, built.engine, tokenizer, buffer)
    stage = Stage(train_set, eval_set, collate=lambda rows: collate_with_prompts(rows, tokenizer.pad_token_id),
                  step=lambda batch: group_step(models, batch, section, generation[0], estimator, buffer),
                  evaluate=lambda loader: evaluate(models, loader, generation, device),
                  tokenizer=tokenizer, metrics=group_step_metrics, progress=("reward", "kl"),
                  eval_every_steps=section.eval_every_steps or config.training.eval_every_steps, **best.stage_hooks())
    return train(config, built, run_dir, stage)


__all__ = ["run_group_stage", "BEST_DIR", "BestCheckpoint", "prompt_data", "PolicySection", "section_problems",
           "sampling_problems", "KL_PENALTIES", "remax_advantage", "rloo_advantage", "grpo_advantage", "grouped",
           "sequence_log_ratio", "kl_penalized_reward", "k3_kl", "kl_penalized_rewards", "discounted_returns",
           "reinforce_loss", "clipped_surrogate_loss", "gae_advantages", "clipped_value_loss", "masked_whiten",
           "Models", "build_models", "load_reward_model", "weights_for_generation", "reference_policy", "Rollout",
           "rollout", "sequence_kl", "repeat_prompts", "GroupRollout", "group_rollout", "policy_logprobs",
           "RolloutBuffer", "group_step", "group_step_metrics", "evaluate"]
