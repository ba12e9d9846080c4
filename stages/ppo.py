"""PPO: the clipped surrogate with a learned critic and GAE (Schulman et al. 2017; Ouyang et al. 2022).

    python -m stages.ppo --config configs/tiny/ppo.yaml [key.sub=value ...]
    deepspeed --num_gpus 2 --module stages.ppo --config configs/llama2-7b/ppo.yaml

Per prompt the actor samples `ppo.num_samples` responses (1 by default); the frozen reward model scores
each. Every response token earns -kl_coef * (log pi_old(y_t) - log pi_ref(y_t)) and the last one also the
score. The critic, a RewardModel (backbone + v_head) read per token and started from the reward model
(`ppo.critic_init: reward`) or from the SFT policy with a new v_head (`policy`), gives V(s_t) for each
response token, from which GAE (gamma, lam) makes per-token advantages (whitened over the micro-batch)
and returns. The actor is trained on PPO's clipped surrogate, the critic on the clipped value loss, each
with its own DeepSpeed engine and optimizer (`optim`, the critic at `ppo.critic_lr`), for
`ppo.updates_per_rollout` optimizer steps on each rollout. With one update the old log-probabilities and
values are the current ones detached (no second forward). The critic's engine state is checkpointed
with the actor's (`checkpoints/step_N/critic/`) and exported to `critic/` at the end.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
from typing import Optional

import torch

from pipeline.config import RunConfig
from pipeline.engine import create_engine, sharded_creation, training_ds_config
from pipeline.generation import collate_with_prompts, generation_configs
from pipeline.loop import Stage, optimizer_step, total_optimizer_steps, train
from pipeline.models import RewardModel, enable_gradient_checkpointing, model_dtype
from pipeline.policy import (BestCheckpoint, build_models, clipped_surrogate_loss, clipped_value_loss, evaluate,
                             gae_advantages, group_rollout, GroupRollout, k3_kl, kl_penalized_rewards,
                             load_reward_model, masked_whiten, Models, policy_logprobs, PolicySection, prompt_data,
                             RolloutBuffer, section_problems, sequence_log_ratio)
from pipeline.rundir import RunDirectory
from pipeline.run import main

logger = logging.getLogger(__name__)

CRITIC_INITS = ("reward", "policy")
CRITIC_DIR = "critic"  # the critic's engine inside each checkpoint, and its export


@dataclasses.dataclass
class PpoSection(PolicySection):
    num_samples: int = 1              # responses per prompt; the critic is the baseline
    kl_penalty: str = "reward"        # per-token -kl_coef * log-ratio in the reward (InstructGPT); loss: k3 term
    updates_per_rollout: int = 2
    critic_init: str = "reward"       # the critic's weights: the reward model's, or the SFT policy's + a new v_head
    critic_lr: Optional[float] = None  # null: `optim.lr`
    gamma: float = 1.0
    lam: float = 0.95
    value_clip_range: float = 0.2     # new values stay within this of the rollout's in the clipped value loss
    whiten_advantages: bool = True


@dataclasses.dataclass
class PpoConfig(RunConfig):
    ppo: PpoSection = dataclasses.field(default_factory=PpoSection)

    def problems(self) -> list:
        ppo = self.ppo
        problems = super().problems() + section_problems(self, ppo, "ppo", min_samples=1)
        if ppo.critic_init not in CRITIC_INITS:
            problems.append(f"`ppo.critic_init` is {ppo.critic_init!r}; use one of {', '.join(CRITIC_INITS)}")
        if ppo.critic_lr is not None and not ppo.critic_lr > 0:
            problems.append(f"`ppo.critic_lr` is {ppo.critic_lr}; it must be positive (null: `optim.lr`)")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(ppo, name) <= 1:
                problems.append(f"`ppo.{name}` is {getattr(ppo, name)}; use a value in [0, 1]")
        if not ppo.value_clip_range > 0:
            problems.append(f"`ppo.value_clip_range` is {ppo.value_clip_range}; it must be positive")
        return problems


def build_critic(config: PpoConfig, total_steps: int):
    """The critic's TrainingEngine: a RewardModel from `ppo.reward_model_path` or from `model` with a new
    v_head, trained by the configured optimizer at `ppo.critic_lr` under the actor's ZeRO settings.

    Raises:
        ModelLoadError: naming `ppo.reward_model_path` or `model.path`.
    """
    ppo, model_config = config.ppo, config.model
    dtype = model_dtype(model_config, config.engine.precision)
    critic_optim = dataclasses.replace(config.optim, lr=ppo.critic_lr or config.optim.lr)
    critic_config = dataclasses.replace(config, optim=critic_optim)
    # At ZeRO-3 each parameter is split over the ranks as it is created, as the actor's are.
    with sharded_creation(training_ds_config(critic_config)):
        if ppo.critic_init == "reward":
            critic = load_reward_model(config, ppo.reward_model_path, "ppo.reward_model_path", dtype)
        else:
            critic = RewardModel.from_causal_lm(model_config, dtype=dtype)  # LoRA is the actor's only
    if ppo.critic_init == "reward" and model_config.gradient_checkpointing:
        enable_gradient_checkpointing(critic.backbone)
    return create_engine(critic_config, critic, total_steps)


def critic_values(critic, sampled) -> torch.Tensor:
    """(N, T) V(s_t) for each response token: the critic at the position before the token (the state
    it is chosen in), as the log-probs are read."""
    length = sampled.mask.shape[1]
    values = critic(sampled.sequences, sampled.attention_mask, per_token=True)  # (N, P + T)
    return values[:, -length - 1:-1].float()


@dataclasses.dataclass
class PpoRollout(GroupRollout):
    old_values: Optional[torch.Tensor] = None  # (N, T) the critic's at sampling; None: the update's own, detached


@torch.no_grad()
def ppo_rollout(models: Models, critic, batch: dict, section: PpoSection, sample_config) -> PpoRollout:
    multi = section.updates_per_rollout > 1
    experience = group_rollout(models, batch, section.num_samples, sample_config, multi)
    old_values = None
    if multi:
        critic.eval()
        old_values = critic_values(critic, experience.sampled)
    return PpoRollout(**vars(experience), old_values=old_values)


def ppo_targets(rewards: torch.Tensor, old_values: torch.Tensor, mask: torch.Tensor, section: PpoSection) -> tuple:
    """((N, T) advantages for the policy loss, whitened if configured; (N, T) returns for the value loss)."""
    advantages, returns = gae_advantages(rewards, old_values, mask, section.gamma, section.lam)
    if section.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def ppo_step(models: Models, critic, batch: dict, section: PpoSection, sample_config, buffer: RolloutBuffer,
             critic_log: dict) -> tuple:
    """Rollout (or the kept one); the critic's clipped value loss, its backward and step here; returns
    (the actor's clipped surrogate loss with grad, sums for `ppo_metrics`)."""
    multi = section.updates_per_rollout > 1
    experience = buffer.get(lambda: ppo_rollout(models, critic, batch, section, sample_config))
    sampled, mask, ref = experience.sampled, experience.sampled.mask, experience.ref_logprobs
    models.actor.train()
    logprobs, entropy = policy_logprobs(models.actor, sampled)
    critic.train()
    values = critic_values(critic, sampled)
    old = experience.old_logprobs if multi else logprobs.detach()
    old_values = experience.old_values if multi else values.detach()
    in_reward = section.kl_penalty == "reward"
    rewards = kl_penalized_rewards(old, ref, mask, sampled.reward, section.kl_coef if in_reward else 0.0)
    advantages, returns = ppo_targets(rewards, old_values, mask, section)
    loss, clipped = clipped_surrogate_loss(logprobs, old, advantages, mask, section.clip_range,
                                           None if in_reward else ref, section.kl_coef)
    value_loss = clipped_value_loss(values, old_values, returns, mask, section.value_clip_range)
    critic.backward(value_loss)
    outcome = optimizer_step(critic)  # the critic's window ends with the actor's: same batch plan
    if outcome.boundary:
        critic_log.update(grad_norm=outcome.grad_norm, skipped_steps=critic.skipped_steps)
    fmask = mask.to(values.dtype)
    sums = {"sequences": len(sampled.reward), "reward": sampled.reward.sum(), "value_loss": value_loss.detach(),
            "value": (old_values * fmask).sum(), "return": (returns * fmask).sum(),
            "kl": sequence_log_ratio(old, ref, fmask).sum(), "k3_kl": (k3_kl(logprobs.detach(), ref) * fmask).sum(),
            "clipped_tokens": clipped.sum(), "response_length": sampled.lengths.sum(),
            "entropy": (entropy * fmask).sum(), "response_tokens": fmask.sum(), "tokens": sampled.attention_mask.sum()}
    if models.gold_reward is not None:
        sums["gold_reward"] = sum(models.gold_reward(experience.prompts, sampled.texts(models.tokenizer)))
    return loss, sums


def ppo_metrics(total: dict, critic_log: dict) -> dict:
    """Per-step metrics from `ppo_step` sums added over micro-batches and ranks, and the critic's step."""
    n, tokens, micro_batches = total["sequences"], max(total["response_tokens"], 1.0), total["micro_batches"]
    metrics = {"reward": total["reward"] / n, "kl": total["kl"] / n, "k3_kl": total["k3_kl"] / tokens,
               "value_loss": total["value_loss"] / micro_batches, "value_mean": total["value"] / tokens,
               "return_mean": total["return"] / tokens, "clip_fraction": total["clipped_tokens"] / tokens,
               "response_length": total["response_length"] / n, "entropy": total["entropy"] / tokens,
               "loss": total["loss"] / micro_batches, "critic_grad_norm": critic_log.get("grad_norm", math.nan),
               "critic_skipped_steps": critic_log.get("skipped_steps", 0)}
    if "gold_reward" in total:
        metrics["gold_reward"] = total["gold_reward"] / n
    return metrics


def run(config: PpoConfig) -> dict:
    """Trains actor and critic for the planned steps, keeping `best/` at the best held-out greedy reward;
    returns the last evaluation's metrics."""
    ppo = config.ppo
    tokenizer, train_set, eval_set, plan = prompt_data(config, ppo)
    total_steps = total_optimizer_steps(config, len(train_set), plan)
    models, built = build_models(config, ppo, "ppo", tokenizer, total_steps)
    critic = build_critic(config, total_steps).engine
    device, run_dir = built.engine.device, RunDirectory(config)
    generation = generation_configs(tokenizer, ppo.max_new_tokens, ppo.temperature, ppo.top_p)
    buffer = RolloutBuffer(ppo.updates_per_rollout, plan.gradient_accumulation_steps)
    best, critic_log = BestCheckpoint(run_dir, built.engine, tokenizer, buffer), {}
    stage = Stage(train_set, eval_set, collate=lambda rows: collate_with_prompts(rows, tokenizer.pad_token_id),
                  step=lambda batch: ppo_step(models, critic, batch, ppo, generation[0], buffer, critic_log),
                  evaluate=lambda loader: evaluate(models, loader, generation, device),
                  tokenizer=tokenizer, metrics=lambda total: ppo_metrics(total, critic_log),
                  progress=("reward", "kl", "value_loss"), eval_every_steps=ppo.eval_every_steps,
                  engines={CRITIC_DIR: critic}, **best.stage_hooks())
    result = train(config, built, run_dir, stage)
    run_dir.export(critic, None, CRITIC_DIR)
    return result


if __name__ == "__main__":
    sys.exit(main(run, PpoConfig, description=__doc__.splitlines()[0]))
