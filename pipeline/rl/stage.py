"""What the policy stages share around their step: prompt data, the step's common sums and metrics,
held-out evaluation, the best checkpoint, and the whole run of a group stage (RLOO, GRPO).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import torch
import torch.distributed as dist

from pipeline.data import prepare_dataset
from pipeline.engine import batch_plan, init_distributed
from pipeline.generation import Responses, collate_with_prompts, load_gold_reward
from pipeline.loop import Stage, add_sums, sum_over_ranks, to_device, total_optimizer_steps, train
from pipeline.models import load_tokenizer
from pipeline.rl.algos import (clipped_surrogate_loss, k3_kl, kl_penalized_sequence_reward, sequence_log_ratio,
                               truncated_importance_weights)
from pipeline.rl.models import Models, build_models
from pipeline.rl.rollout import RolloutBuffer, Sampling, group_rollout, policy_logprobs, rollout, rollout_engine
from pipeline.rl.sections import GroupSection, SamplingSection, require_vllm
from pipeline.rundir import RunDirectory

logger = logging.getLogger(__name__)

BEST_DIR = "best"  # the actor at its best held-out greedy reward, with best.json ({best_step, best_eval_reward})


def prompt_data(config, section: SamplingSection) -> tuple:
    """(tokenizer, training prompts, held-out prompts, batch plan) of a sampling stage whose section
    may name its held-out prompts (`eval_prompts_path`); the data report is logged on rank 0.

    Raises:
        ConfigError: `rollout.engine` is vllm and vLLM is not installed (before anything loads).
    """
    require_vllm(config)
    tokenizer = load_tokenizer(config.model)
    data = dataclasses.replace(config.data, eval_path=section.eval_prompts_path or config.data.eval_path)
    train_set, eval_set, report = prepare_dataset(data, tokenizer, config.seed)
    # Each prompt's row in its set travels with it: the vLLM engine seeds its samples from it, so they do
    # not depend on which rank and micro-batch the prompt falls in.
    train_set, eval_set = (rows.add_column("row_id", list(range(len(rows)))) for rows in (train_set, eval_set))
    plan = batch_plan(config, init_distributed())
    if dist.get_rank() == 0:
        logger.info(report.summary())
    return tokenizer, train_set, eval_set, plan


def build_sampling_models(config, section: SamplingSection, name: str, tokenizer, total_steps: int) -> tuple:
    """(Models, the actor's TrainingEngine) of the sampling stage whose section is `name`."""
    return build_models(config, tokenizer, total_steps, section.reference_model(name), section.reward_model(name),
                        gold_reward=load_gold_reward(section.gold_reward, f"{name}.gold_reward"),
                        missing_eos_penalty=section.missing_eos_penalty, reward_functions=config.reward.build())


def sampling_of(section: SamplingSection) -> Sampling:
    return Sampling(section.max_new_tokens, section.temperature, section.top_p)


# ---- a step's bookkeeping -----------------------------------------------------------------------

def response_sums(models: Models, prompts: list, responses: Responses, kl: torch.Tensor,
                  entropy: torch.Tensor) -> dict:
    """Sums over a micro-batch's sampled responses that every sampling stage logs: reward, KL (`kl`:
    (N,) per response), length, token entropy (`entropy`: (N, T)), token counts, the gold reward and
    each reward function's values."""
    mask = responses.mask.float()
    sums = {"sequences": len(responses.reward), "reward": responses.reward.sum(), "kl": kl.sum(),
            "response_length": responses.lengths.sum(), "entropy": (entropy * mask).sum(),
            "response_tokens": mask.sum(), "tokens": responses.attention_mask.sum()}
    if models.gold_reward is not None:
        sums["gold_reward"] = sum(models.gold_reward(prompts, responses.texts(models.tokenizer)))
    return {**sums, **function_sums(responses)}


def function_sums(responses: Responses, prefix: str = "") -> dict:
    """Per reward function, the sum of its values and the count of responses it scored (every rank logs
    every function, so the sums add over ranks key for key)."""
    sums = {}
    for name, values in responses.function_rewards.items():
        scored = ~torch.isnan(values)
        sums[f"{prefix}function_sum/{name}"] = values[scored].sum()
        sums[f"{prefix}function_count/{name}"] = scored.sum()
    return sums


def function_means(total: dict, prefix: str = "") -> dict:
    """`{prefix}reward/<name>`: each function's mean over the responses it scored (on every rank), from
    `function_sums` added over micro-batches and ranks (popped from `total`); absent where it scored none."""
    means = {}
    counted = f"{prefix}function_count/"
    for key in [key for key in total if key.startswith(counted)]:
        name = key[len(counted):]
        count, value = total.pop(key), total.pop(f"{prefix}function_sum/{name}")
        if count:
            means[f"{prefix}reward/{name}"] = value / count
    return means


def advantage_sums(advantage: torch.Tensor) -> dict:
    return {"advantage": advantage.sum(), "advantage_squared": advantage.square().sum()}


def step_metrics(total: dict) -> dict:
    """Per-step metrics from sums added over micro-batches and ranks (the loop adds "loss" and
    "micro_batches"): per response, per response token, the advantage's mean and std (as trained
    on) where the stage has one, and `reward/<name>`, each reward function's mean."""
    n, tokens = total["sequences"], max(total["response_tokens"], 1.0)
    metrics = {**function_means(dict(total)), "reward": total["reward"] / n, "kl": total["kl"] / n, "response_length": total["response_length"] / n,
               "entropy": total["entropy"] / tokens, "loss": total["loss"] / total["micro_batches"]}
    if "advantage" in total:
        mean = total["advantage"] / n
        metrics.update(advantage_mean=mean,
                       advantage_std=math.sqrt(max(total["advantage_squared"] / n - mean ** 2, 0.0)))
    if "k3_kl" in total:
        metrics["k3_kl"] = total["k3_kl"] / tokens
    if "clipped_tokens" in total:
        metrics["clip_fraction"] = total["clipped_tokens"] / tokens
    if "sampler_logprob_gap" in total:
        metrics["sampler_logprob_gap"] = total["sampler_logprob_gap"] / tokens
    if "gold_reward" in total:
        metrics["gold_reward"] = total["gold_reward"] / n
    return metrics


def sampler_correction(trainer_logprobs: torch.Tensor, responses: Responses, cap) -> tuple:
    """For responses from an engine that reports its own log-probs (vLLM): (per-token truncated
    importance weights min(pi_trainer / pi_sampler, cap), or None without a cap; sums of the per-token
    gap |log pi_trainer - log pi_sampler|). ((None, {}) for Hugging Face `generate`: the trainer's own.)
    trainer_logprobs: (N, T) the trainer's at sampling time."""
    sampler = responses.sampler_logprobs
    if sampler is None:
        return None, {}
    mask = responses.mask.float()
    gap = ((trainer_logprobs.detach() - sampler).abs() * mask).sum()
    weights = None if cap is None else truncated_importance_weights(trainer_logprobs, sampler, cap) * mask
    return weights, {"sampler_logprob_gap": gap}


def surrogate_sums(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                   clipped: torch.Tensor) -> dict:
    """The clipped-surrogate stages' extra sums: the k3 KL estimate per token and the clipped tokens."""
    fmask = mask.to(logprobs.dtype)
    return {"k3_kl": (k3_kl(logprobs.detach(), ref_logprobs) * fmask).sum(), "clipped_tokens": clipped.sum()}


# ---- evaluation and the best checkpoint ---------------------------------------------------------

@torch.no_grad()
def evaluate(models: Models, engine, loader, sampling: Sampling, device) -> dict:
    """Held-out prompts: greedy reward (`eval/reward`, the number the best checkpoint follows), sampled
    reward, KL of the samples, greedy response length and each reward function's greedy mean
    (`eval/reward/<name>`), averaged over every rank's prompts."""
    total, step = {}, models.actor.global_steps
    for batch in loader:
        experience = rollout(models, engine, to_device(batch, device), sampling, key=("eval", step))
        sampled, greedy = experience.sampled, experience.greedy
        kl = sequence_log_ratio(experience.actor_logprobs, experience.ref_logprobs, sampled.mask)
        sums = {"sequences": len(greedy.reward), "eval/reward": greedy.reward.sum(),
                "eval/sampled_reward": sampled.reward.sum(), "eval/kl": kl.sum(),
                "eval/response_length": greedy.lengths.sum()}
        if models.gold_reward is not None:
            sums["eval/gold_reward"] = sum(models.gold_reward(batch["prompt"], greedy.texts(models.tokenizer)))
        total = add_sums(total, {**sums, **function_sums(greedy, "eval/")})
    total = sum_over_ranks(total, device)
    count = total.pop("sequences")
    functions = function_means(total, "eval/")
    return {**functions, **{name: value / count for name, value in total.items()}}


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


def sampling_stage(config, section: SamplingSection, models: Models, engine, built, tokenizer, train_set, eval_set,
                   step: Callable, metrics: Callable, buffer=None, **fields) -> tuple:
    """(Stage, run directory) of a sampling stage: prompt batches, `step(batch)`, held-out evaluation
    through the rollout `engine`, and `best/` kept at the best held-out greedy reward."""
    run_dir = RunDirectory(config)
    best = BestCheckpoint(run_dir, built.engine, tokenizer, buffer)
    device, sampling = built.engine.device, sampling_of(section)
    stage = Stage(train_set, eval_set, collate=lambda rows: collate_with_prompts(rows, tokenizer.pad_token_id),
                  step=step, evaluate=lambda loader: evaluate(models, engine, loader, sampling, device),
                  tokenizer=tokenizer, metrics=metrics,
                  eval_every_steps=section.eval_every_steps or config.training.eval_every_steps,
                  **{"progress": ("reward", "kl"), **fields}, **best.stage_hooks())
    return stage, run_dir


# ---- RLOO and GRPO ------------------------------------------------------------------------------

def group_step(models: Models, engine, batch: dict, section: GroupSection, estimator: Callable,
               buffer: RolloutBuffer, correction=None) -> tuple:
    """Rollout (or the kept one), advantages by `estimator` ((N,) rewards -> (N,) advantages) and the
    clipped surrogate loss with grad for one micro-batch (`correction`: the cap of the sampler's
    importance weights, or None).

    Returns (loss, sums over this micro-batch's sequences for `step_metrics`).
    """
    multi = section.updates_per_rollout > 1
    experience = buffer.get(lambda key: group_rollout(models, engine, batch, section.num_samples,
                                                      sampling_of(section), multi, key))
    sampled, mask = experience.sampled, experience.sampled.mask
    models.actor.train()
    logprobs, entropy = policy_logprobs(models.actor, sampled, models.logits_chunk)
    old = experience.old_logprobs if multi else logprobs.detach()
    reward = sampled.reward
    if section.kl_penalty == "reward":
        reward = kl_penalized_sequence_reward(reward, old, experience.ref_logprobs, mask, section.kl_coef)
    advantage = estimator(reward)
    in_loss = section.kl_penalty == "loss"
    weights, sampler_sums = sampler_correction(old, sampled, correction)
    loss, clipped = clipped_surrogate_loss(logprobs, old, advantage, mask, section.clip_range,
                                           experience.ref_logprobs if in_loss else None, section.kl_coef, weights)
    kl = sequence_log_ratio(old, experience.ref_logprobs, mask)
    sums = {**response_sums(models, experience.prompts, sampled, kl, entropy), **advantage_sums(advantage),
            **surrogate_sums(logprobs, experience.ref_logprobs, mask, clipped), **sampler_sums}
    return loss, sums


def run_group_stage(config, section: GroupSection, name: str, estimator: Callable) -> dict:
    """Trains the actor of RLOO / GRPO (`estimator`: (N,) rewards -> (N,) advantages) for the planned
    steps, keeping `best/` at the best held-out greedy reward; returns the last evaluation's metrics."""
    tokenizer, train_set, eval_set, plan = prompt_data(config, section)
    models, built = build_sampling_models(config, section, name, tokenizer,
                                          total_optimizer_steps(config, len(train_set), plan))
    engine = rollout_engine(config, built, tokenizer)
    buffer = RolloutBuffer(section.updates_per_rollout, plan.gradient_accumulation_steps)
    correction = config.rollout.importance_correction
    stage, run_dir = sampling_stage(
        config, section, models, engine, built, tokenizer, train_set, eval_set, buffer=buffer, metrics=step_metrics,
        step=lambda batch: group_step(models, engine, batch, section, estimator, buffer, correction))
    return train(config, built, run_dir, stage)
