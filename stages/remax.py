"""ReMax: REINFORCE with the greedy response's reward as the baseline (Li et al. 2023), no critic.

    python -m stages.remax --config configs/tiny/remax.yaml [key.sub=value ...]
    deepspeed --num_gpus 2 --module stages.remax --config configs/llama2-7b/remax.yaml

Per prompt x the actor samples a response y and decodes a greedy one y_hat; the frozen reward
model scores both. The advantage r(x, y) - r(x, y_hat) (clipped) is credited at y's last token,
every token of y pays kl_ctl * (log pi(y_t) - log pi_ref(y_t)) against the frozen reference
policy, and the loss is the token mean of -return_t * log pi(y_t). One optimizer step per batch.

A response runs up to and including its first eos (an immediate eos is a one-token response)
or to `remax.max_new_tokens`; tokens generated after the eos are padding everywhere.
Log-probabilities are the model's own (temperature 1), as in the ReMax reference code, so the
KL is against the policy itself rather than its tempered sampling distribution.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
from typing import Optional

from pipeline.config import RunConfig
from pipeline.generation import collate_with_prompts, generation_configs, response_logprobs
from pipeline.loop import Stage, total_optimizer_steps, train
# The parts ReMax is made of, shared with RLOO and GRPO (and importable from here as before).
from pipeline.policy import (BEST_DIR, BestCheckpoint, Models, Rollout, discounted_returns, evaluate,  # noqa: F401
                             kl_penalized_rewards, prompt_data, reference_policy, reinforce_loss, remax_advantage,
                             rollout, sampling_problems, sequence_kl, weights_for_generation)
from pipeline.policy import build_models as build_policy_models
from pipeline.rundir import RunDirectory
from pipeline.run import main

logger = logging.getLogger(__name__)


# ---- config -------------------------------------------------------------------------------------

@dataclasses.dataclass
class RemaxSection:
    reward_model_path: Optional[str] = None   # a RewardModel directory (stages.reward's export)
    ref_model_path: Optional[str] = None      # frozen reference policy; defaults to the actor's starting weights
    eval_prompts_path: Optional[str] = None   # held-out prompts; else `data.eval_path` or a split of `data.path`
    kl_ctl: float = 0.1
    gamma: float = 1.0
    clip_advantage: Optional[float] = 5.0     # the reference code clips the advantage to +-5; null: no clipping
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
    # Subtracted from the reward of responses cut by max_new_tokens before their eos: a reward
    # model never saw such text and tends to over-score it, which a policy learns to exploit.
    missing_eos_penalty: Optional[float] = None


@dataclasses.dataclass
class RemaxConfig(RunConfig):
    remax: RemaxSection = dataclasses.field(default_factory=RemaxSection)

    def problems(self) -> list:
        remax = self.remax
        problems = super().problems() + sampling_problems(self, remax, "remax")
        if remax.kl_ctl < 0:
            problems.append(f"`remax.kl_ctl` is {remax.kl_ctl}; it must not be negative (0 turns the KL penalty off)")
        if not 0 <= remax.gamma <= 1:
            problems.append(f"`remax.gamma` is {remax.gamma}; use a value in [0, 1]")
        if remax.clip_advantage is not None and remax.clip_advantage <= 0:
            problems.append(f"`remax.clip_advantage` is {remax.clip_advantage}; use a positive bound or null")
        return problems

    @property
    def eval_every_steps(self) -> Optional[int]:
        return self.remax.eval_every_steps or self.training.eval_every_steps


def build_models(config: RemaxConfig, tokenizer, total_steps: int):
    """(Models, the actor's TrainingEngine): actor from `model`, reference and reward model frozen.

    Raises:
        ModelLoadError: naming `model.path`, `remax.ref_model_path` or `remax.reward_model_path`.
        EngineConfigError: as create_engine / create_frozen_engine.
    """
    return build_policy_models(config, config.remax, "remax", tokenizer, total_steps)


# ---- one step, evaluation, the best checkpoint --------------------------------------------------

def remax_step(models: Models, batch: dict, remax: RemaxSection, generation: tuple) -> tuple:
    """Rollout, then the REINFORCE loss with grad for one micro-batch.

    Returns (loss, sums over this micro-batch's sequences for the step's metrics, see `step_metrics`).
    """
    experience = rollout(models, batch, *generation)
    sampled, greedy = experience.sampled, experience.greedy
    advantage = remax_advantage(sampled.reward, greedy.reward, remax.clip_advantage)  # (B,)
    rewards = kl_penalized_rewards(experience.actor_logprobs, experience.ref_logprobs, sampled.mask, advantage,
                                   remax.kl_ctl)  # (B, T)
    returns = discounted_returns(rewards, sampled.mask, remax.gamma)
    models.actor.train()
    logprobs, _ = response_logprobs(models.actor, sampled.sequences, sampled.attention_mask, sampled.mask.shape[1])
    loss = reinforce_loss(logprobs, returns, sampled.mask)
    mask = sampled.mask.float()
    # advantage_mean and advantage_std describe the advantage as trained on: after clipping.
    sums = {"sequences": len(advantage), "reward": sampled.reward.sum(), "baseline_reward": greedy.reward.sum(),
            "advantage": advantage.sum(), "advantage_squared": advantage.square().sum(),
            "wins": (sampled.reward > greedy.reward).sum(), "kl": sequence_kl(experience).sum(),
            "response_length": sampled.lengths.sum(), "entropy": (experience.entropy * mask).sum(),
            "response_tokens": mask.sum(), "tokens": sampled.attention_mask.sum()}
    if models.gold_reward is not None:
        sums["gold_reward"] = sum(models.gold_reward(batch["prompt"], sampled.texts(models.tokenizer)))
    return loss, sums


def step_metrics(total: dict) -> dict:
    """Per-step metrics from `remax_step` sums added over micro-batches and ranks (the loop adds
    "loss" and "micro_batches")."""
    n = total["sequences"]
    advantage_mean = total["advantage"] / n
    metrics = {"reward": total["reward"] / n, "baseline_reward": total["baseline_reward"] / n,
               "advantage_mean": advantage_mean,
               "advantage_std": math.sqrt(max(total["advantage_squared"] / n - advantage_mean ** 2, 0.0)),
               "win_rate_vs_greedy": total["wins"] / n, "kl": total["kl"] / n,
               "response_length": total["response_length"] / n,
               "entropy": total["entropy"] / max(total["response_tokens"], 1.0),
               "loss": total["loss"] / total["micro_batches"]}
    if "gold_reward" in total:
        metrics["gold_reward"] = total["gold_reward"] / n
    return metrics


# ---- the run ------------------------------------------------------------------------------------

def run(config: RemaxConfig) -> dict:
    """Trains the actor for the planned steps; returns the last evaluation's metrics."""
    remax = config.remax
    tokenizer, train_set, eval_set, plan = prompt_data(config, remax)
    models, built = build_models(config, tokenizer, total_optimizer_steps(config, len(train_set), plan))
    device, run_dir = built.engine.device, RunDirectory(config)
    generation = generation_configs(tokenizer, remax.max_new_tokens, remax.temperature, remax.top_p)
    best = BestCheckpoint(run_dir, built.engine, tokenizer)
    stage = Stage(train_set, eval_set, collate=lambda rows: collate_with_prompts(rows, tokenizer.pad_token_id),
                  step=lambda batch: remax_step(models, batch, remax, generation),
                  evaluate=lambda loader: evaluate(models, loader, generation, device),
                  tokenizer=tokenizer, metrics=step_metrics, progress=("reward", "kl"),
                  eval_every_steps=config.eval_every_steps, **best.stage_hooks())
    return train(config, built, run_dir, stage)


if __name__ == "__main__":
    sys.exit(main(run, RemaxConfig, description=__doc__.splitlines()[0]))
