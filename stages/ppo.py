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
import sys
from typing import ClassVar, Optional

import torch

from pipeline.loop import total_optimizer_steps, train
from pipeline.rl.algos import (clipped_surrogate_loss, clipped_value_loss, gae_advantages, kl_penalized_token_rewards,
                               masked_whiten, sequence_log_ratio)
from pipeline.rl.models import Models, build_critic
from pipeline.rl.rollout import RolloutBuffer, critic_values, group_rollout, policy_logprobs, rollout_engine
from pipeline.rl.sections import GroupSection, SamplingRunConfig
from pipeline.rl.stage import (build_sampling_models, prompt_data, response_sums, sampler_correction, sampling_of,
                               sampling_stage, step_metrics, surrogate_sums)
from pipeline.run import main

logger = logging.getLogger(__name__)

CRITIC_INITS = ("reward", "policy")
CRITIC_DIR = "critic"  # the critic's engine inside each checkpoint, and its export


@dataclasses.dataclass
class PpoSection(GroupSection):
    MIN_SAMPLES: ClassVar[int] = 1    # the critic is the baseline
    num_samples: int = 1              # responses per prompt
    kl_penalty: str = "reward"        # per-token -kl_coef * log-ratio in the reward (InstructGPT); loss: k3 term
    updates_per_rollout: int = 2
    critic_init: str = "reward"       # the critic's weights: the reward model's, or the SFT policy's + a new v_head
    critic_lr: Optional[float] = None  # null: `optim.lr`
    gamma: float = 1.0
    lam: float = 0.95
    value_clip_range: float = 0.2     # new values stay within this of the rollout's in the clipped value loss
    whiten_advantages: bool = True


@dataclasses.dataclass
class PpoConfig(SamplingRunConfig):
    ppo: PpoSection = dataclasses.field(default_factory=PpoSection)

    def problems(self) -> list:
        ppo = self.ppo
        problems = super().problems() + ppo.problems(self, "ppo")
        if ppo.critic_init not in CRITIC_INITS:
            problems.append(f"`ppo.critic_init` is {ppo.critic_init!r}; use one of {', '.join(CRITIC_INITS)}")
        elif ppo.critic_init == "reward" and ppo.reward_model_path is None and self.reward.functions:
            problems.append("`ppo.critic_init` is reward but `ppo.reward_model_path` is not set (reward functions "
                            "alone); start the critic from the policy: ppo.critic_init=policy")
        if ppo.critic_lr is not None and not ppo.critic_lr > 0:
            problems.append(f"`ppo.critic_lr` is {ppo.critic_lr}; it must be positive (null: `optim.lr`)")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(ppo, name) <= 1:
                problems.append(f"`ppo.{name}` is {getattr(ppo, name)}; use a value in [0, 1]")
        if not ppo.value_clip_range > 0:
            problems.append(f"`ppo.value_clip_range` is {ppo.value_clip_range}; it must be positive")
        return problems


def ppo_targets(rewards: torch.Tensor, old_values: torch.Tensor, mask: torch.Tensor, section: PpoSection) -> tuple:
    """((N, T) advantages for the policy loss, whitened if configured; (N, T) returns for the value loss)."""
    advantages, returns = gae_advantages(rewards, old_values, mask, section.gamma, section.lam)
    if section.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def ppo_step(models: Models, engine, batch: dict, section: PpoSection, buffer: RolloutBuffer,
             correction=None) -> tuple:
    """Rollout (or the kept one); returns (the actor's clipped surrogate loss with grad, sums for
    `ppo_metrics`, {"critic": the critic's clipped value loss with grad}): the loop steps both engines."""
    multi = section.updates_per_rollout > 1
    experience = buffer.get(lambda key: group_rollout(models, engine, batch, section.num_samples,
                                                      sampling_of(section), multi, key))
    sampled, mask, ref = experience.sampled, experience.sampled.mask, experience.ref_logprobs
    models.actor.train()
    logprobs, entropy = policy_logprobs(models.actor, sampled, models.logits_chunk)
    models.critic.train()
    values = critic_values(models.critic, sampled)
    old = experience.old_logprobs if multi else logprobs.detach()
    old_values = experience.old_values if multi else values.detach()
    in_reward = section.kl_penalty == "reward"
    rewards = kl_penalized_token_rewards(old, ref, mask, sampled.reward, section.kl_coef if in_reward else 0.0)
    advantages, returns = ppo_targets(rewards, old_values, mask, section)
    weights, sampler_sums = sampler_correction(old, sampled, correction)
    loss, clipped = clipped_surrogate_loss(logprobs, old, advantages, mask, section.clip_range,
                                           None if in_reward else ref, section.kl_coef, weights)
    value_loss = clipped_value_loss(values, old_values, returns, mask, section.value_clip_range)
    fmask = mask.to(values.dtype)
    sums = {**response_sums(models, experience.prompts, sampled, sequence_log_ratio(old, ref, mask), entropy),
            **surrogate_sums(logprobs, ref, mask, clipped), "value_loss": value_loss.detach(),
            "value": (old_values * fmask).sum(), "return": (returns * fmask).sum(), **sampler_sums}
    return loss, sums, {CRITIC_DIR: value_loss}


def ppo_metrics(total: dict) -> dict:
    """The sampling stages' step metrics, and the critic's loss, values and returns."""
    tokens = max(total["response_tokens"], 1.0)
    return {**step_metrics(total), "value_loss": total["value_loss"] / total["micro_batches"],
            "value_mean": total["value"] / tokens, "return_mean": total["return"] / tokens}


def run(config: PpoConfig) -> dict:
    """Trains actor and critic for the planned steps, keeping `best/` at the best held-out greedy reward;
    returns the last evaluation's metrics."""
    ppo = config.ppo
    tokenizer, train_set, eval_set, plan = prompt_data(config, ppo)
    total_steps = total_optimizer_steps(config, len(train_set), plan)
    models, built = build_sampling_models(config, ppo, "ppo", tokenizer, total_steps)
    models.critic = build_critic(config, ppo.critic_init, ppo.reward_model_path, ppo.critic_lr, total_steps).engine
    engine = rollout_engine(config, built, tokenizer)
    buffer = RolloutBuffer(ppo.updates_per_rollout, plan.gradient_accumulation_steps)
    stage, run_dir = sampling_stage(config, ppo, models, engine, built, tokenizer, train_set, eval_set, buffer=buffer,
                                    step=lambda batch: ppo_step(models, engine, batch, ppo, buffer,
                                                                config.rollout.importance_correction),
                                    metrics=ppo_metrics, progress=("reward", "kl", "value_loss"),
                                    engines={CRITIC_DIR: models.critic})
    result = train(config, built, run_dir, stage)
    run_dir.export(models.critic, None, CRITIC_DIR)
    return result


if __name__ == "__main__":
    sys.exit(main(run, PpoConfig, description=__doc__.splitlines()[0]))
