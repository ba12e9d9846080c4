"""ReMax: REINFORCE with the greedy response's reward as the baseline (Li et al. 2023), no critic.

    python -m stages.remax --config configs/tiny/remax.yaml [key.sub=value ...]
    deepspeed --num_gpus 2 --module stages.remax --config configs/llama2-7b/remax.yaml

Per prompt x the actor samples a response y and decodes a greedy one y_hat; the frozen reward
model scores both. The advantage r(x, y) - r(x, y_hat) (clipped) is credited at y's last token,
every token of y pays kl_coef * (log pi(y_t) - log pi_ref(y_t)) against the frozen reference
policy, and the loss is the token mean of -return_t * log pi(y_t). One optimizer step per batch.

A response runs up to and including its first eos (an immediate eos is a one-token response)
or to `remax.max_new_tokens`; tokens generated after the eos are padding everywhere.
Log-probabilities are the model's own (temperature 1), as in the ReMax reference code, so the
KL is against the policy itself rather than its tempered sampling distribution.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Optional

from pipeline.generation import response_logprobs
from pipeline.loop import total_optimizer_steps, train
from pipeline.rl.algos import (discounted_returns, kl_penalized_token_rewards, reinforce_loss, remax_advantage,
                               sequence_log_ratio)
from pipeline.rl.models import Models
from pipeline.rl.rollout import RolloutBuffer, rollout, rollout_engine
from pipeline.rl.sections import SamplingRunConfig, SamplingSection
from pipeline.rl.stage import (advantage_sums, build_sampling_models, prompt_data, response_sums, sampler_correction,
                               sampling_of, sampling_stage, step_metrics)
from pipeline.run import main

logger = logging.getLogger(__name__)


# ---- config -------------------------------------------------------------------------------------

@dataclasses.dataclass
class RemaxSection(SamplingSection):
    kl_coef: float = 0.1                      # per-token KL penalty (`kl_ctl` before: still read)
    gamma: float = 1.0
    clip_advantage: Optional[float] = 5.0     # the reference code clips the advantage to +-5; null: no clipping


@dataclasses.dataclass
class RemaxConfig(SamplingRunConfig):
    remax: RemaxSection = dataclasses.field(default_factory=RemaxSection)

    def problems(self) -> list:
        remax = self.remax
        problems = super().problems() + remax.problems(self, "remax")
        if not 0 <= remax.gamma <= 1:
            problems.append(f"`remax.gamma` is {remax.gamma}; use a value in [0, 1]")
        if remax.clip_advantage is not None and remax.clip_advantage <= 0:
            problems.append(f"`remax.clip_advantage` is {remax.clip_advantage}; use a positive bound or null")
        return problems

    @property
    def eval_every_steps(self) -> Optional[int]:
        return self.remax.eval_every_steps or self.training.eval_every_steps


# ---- one step -----------------------------------------------------------------------------------

def remax_step(models: Models, engine, batch: dict, remax: RemaxSection, buffer: RolloutBuffer,
               correction=None) -> tuple:
    """Rollout, then the REINFORCE loss with grad for one micro-batch (`correction`: the cap of the
    sampler's importance weights, or None).

    Returns (loss, sums over this micro-batch's sequences for the step's metrics, see `remax_metrics`).
    """
    experience = buffer.get(lambda key: rollout(models, engine, batch, sampling_of(remax), key))
    sampled, greedy = experience.sampled, experience.greedy
    advantage = remax_advantage(sampled.reward, greedy.reward, remax.clip_advantage)  # (B,)
    rewards = kl_penalized_token_rewards(experience.actor_logprobs, experience.ref_logprobs, sampled.mask, advantage,
                                         remax.kl_coef)  # (B, T)
    returns = discounted_returns(rewards, sampled.mask, remax.gamma)
    models.actor.train()
    logprobs, _ = response_logprobs(models.actor, sampled.sequences, sampled.attention_mask, sampled.mask.shape[1],
                                    chunk=models.logits_chunk)
    weights, sampler_sums = sampler_correction(experience.actor_logprobs, sampled, correction)
    loss = reinforce_loss(logprobs, returns, sampled.mask, weights)
    kl = sequence_log_ratio(experience.actor_logprobs, experience.ref_logprobs, sampled.mask)
    # advantage_mean and advantage_std describe the advantage as trained on: after clipping.
    sums = {**response_sums(models, batch["prompt"], sampled, kl, experience.entropy), **advantage_sums(advantage),
            "baseline_reward": greedy.reward.sum(), "wins": (sampled.reward > greedy.reward).sum(), **sampler_sums}
    return loss, sums


def remax_metrics(total: dict) -> dict:
    """The sampling stages' step metrics, and the greedy baseline's reward and the samples' win rate."""
    n = total["sequences"]
    return {**step_metrics(total), "baseline_reward": total["baseline_reward"] / n,
            "win_rate_vs_greedy": total["wins"] / n}


# ---- the run ------------------------------------------------------------------------------------

def run(config: RemaxConfig) -> dict:
    """Trains the actor for the planned steps, keeping `best/` at the best held-out greedy reward;
    returns the last evaluation's metrics."""
    remax = config.remax
    tokenizer, train_set, eval_set, plan = prompt_data(config, remax)
    models, built = build_sampling_models(config, remax, "remax", tokenizer,
                                          total_optimizer_steps(config, len(train_set), plan))
    engine = rollout_engine(config, built, tokenizer)
    buffer = RolloutBuffer(1, plan.gradient_accumulation_steps)  # a fresh rollout every micro-batch
    correction = config.rollout.importance_correction
    stage, run_dir = sampling_stage(config, remax, models, engine, built, tokenizer, train_set, eval_set,
                                    buffer=buffer, metrics=remax_metrics,
                                    step=lambda batch: remax_step(models, engine, batch, remax, buffer, correction))
    return train(config, built, run_dir, stage)


if __name__ == "__main__":
    sys.exit(main(run, RemaxConfig, description=__doc__.splitlines()[0]))
