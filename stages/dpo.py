"""DPO: direct preference optimisation on pairs, against a frozen reference policy (Rafailov et al. 2023).

    python -m stages.dpo --config configs/tiny/dpo.yaml [key.sub=value ...]
    deepspeed --num_gpus 2 --module stages.dpo --config configs/llama2-7b/dpo.yaml

Per pair (x, y_w, y_l) the implicit reward of an answer is beta * (log pi(y|x) - log pi_ref(y|x)),
log-probabilities summed over the answer's tokens. The sigmoid loss is -log sigmoid(r_w - r_l);
IPO (Azar et al. 2023, `dpo.loss_type: ipo`) regresses the log-ratio margin onto 1 / (2 beta)
instead. One forward pass scores the chosen and the rejected answers together (stacked by collate_pairwise,
or packed into one sequence with `data.packing`: pipeline.packing).
The reference is `dpo.ref_model_path` or the actor's starting weights, frozen; with LoRA it is the
actor itself with its adapters disabled, so no second copy of the model is held.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from trl.trainer.utils import selective_log_softmax

from pipeline.config import RunConfig
from pipeline.data import IGNORE_INDEX, prepare_dataset
from pipeline.engine import batch_plan, init_distributed
from pipeline.loop import Stage, add_sums, sum_over_ranks, to_device, total_optimizer_steps, train
from pipeline.models import load_tokenizer
from pipeline.packing import batch_layout, model_inputs, sequence_sums, token_count
from pipeline.rl.models import Models, build_models, reference_policy
from pipeline.rl.sections import ReferenceFields
from pipeline.rundir import RunDirectory
from pipeline.run import main

logger = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo")


# ---- config -------------------------------------------------------------------------------------

@dataclasses.dataclass
class DpoSection(ReferenceFields):
    beta: float = 0.1                         # strength of the pull towards the reference
    loss_type: str = "sigmoid"                # sigmoid | ipo


@dataclasses.dataclass
class DpoConfig(RunConfig):
    dpo: DpoSection = dataclasses.field(default_factory=DpoSection)

    def problems(self) -> list:
        problems = super().problems()
        dpo = self.dpo
        if self.data.format != "pairwise":
            problems.append(f"`data.format` is {self.data.format!r}; DPO trains on pairwise data (prompt, chosen, "
                            "rejected)")
        if not dpo.beta > 0:
            problems.append(f"`dpo.beta` is {dpo.beta}; it must be positive")
        if dpo.loss_type not in LOSS_TYPES:
            problems.append(f"`dpo.loss_type` is {dpo.loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
        problems += dpo.reference_model("dpo").problems("dpo.ref")
        if self.model.lora.enabled and dpo.ref_model_path is not None:
            problems.append("`dpo.ref_model_path` is set with `model.lora.enabled`; with LoRA the reference is the "
                            "actor with its adapters disabled: unset one of them")
        return problems


# ---- the loss, as pure functions ----------------------------------------------------------------

def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                      position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each sequence's summed log-probability of its labelled tokens.

    logits: (N, T, V), position t predicting token t + 1; labels: (N, T), IGNORE_INDEX on the prompt
    and the padding. Returns (N,) in fp32; for a packed batch (N = 1, `position_ids` (1, T) restarting
    at each sequence, labels IGNORE_INDEX at each start) (S,), one per sequence.
    """
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logprobs = selective_log_softmax(logits[:, :-1].float(), labels.masked_fill(~mask, 0)) * mask  # (N, T - 1)
    if position_ids is None:
        return logprobs.sum(-1)
    return sequence_sums(F.pad(logprobs, (1, 0)), position_ids)  # token t's log-prob to token t's sequence


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> tuple:
    """Per-pair DPO (or IPO) losses and the implicit rewards.

    All inputs (B,): summed answer log-probs under the policy (with grad) and the reference.
    sigmoid: -log sigmoid(beta * h); ipo: (h - 1 / (2 beta))^2, with h the log-ratio margin
    (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)).
    Returns (losses (B,), chosen rewards (B,), rejected rewards (B,)); rewards are
    beta * (log pi - log pi_ref), detached.
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)).square()
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def reward_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Sums over the pairs of the logged reward statistics; chosen, rejected: (B,) implicit rewards."""
    return {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
            "rewards/margins": (chosen - rejected).sum(), "rewards/accuracy": (chosen > rejected).float().sum()}


def pair_means(total: dict) -> dict:
    """Step metrics from sums added over micro-batches and ranks: reward statistics per pair, the loss
    per micro-batch (the loop adds "loss" and "micro_batches")."""
    pairs = total["pairs"]
    metrics = {name: value / pairs for name, value in total.items() if name.startswith(("rewards/", "logps/"))}
    return {**metrics, "loss": total["loss"] / total["micro_batches"]}


# ---- models and their passes --------------------------------------------------------------------

def answer_logprobs(model, batch: dict) -> tuple:
    """(chosen (B,), rejected (B,)) summed answer log-probs from one forward over the stacked batch."""
    logits = model(**model_inputs(batch), use_cache=False).logits
    return sequence_logprobs(logits, batch["labels"], batch.get("position_ids")).chunk(2)


@torch.no_grad()
def reference_logprobs(models: Models, batch: dict) -> tuple:
    """The reference's (chosen (B,), rejected (B,)); with LoRA, the policy's base weights alone."""
    with reference_policy(models) as reference:
        return answer_logprobs(reference, batch)


def pair_losses(models: Models, batch: dict, dpo: DpoSection) -> tuple:
    """(losses (B,) with grad when enabled, chosen rewards (B,), rejected rewards (B,), policy log-probs)."""
    ref_chosen, ref_rejected = reference_logprobs(models, batch)
    chosen, rejected = answer_logprobs(models.actor, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, dpo.beta,
                                                        dpo.loss_type)
    return losses, chosen_rewards, rejected_rewards, (chosen.detach(), rejected.detach())


def dpo_step(models: Models, batch: dict, dpo: DpoSection) -> tuple:
    """The mean loss of one micro-batch of pairs, and the sums `pair_means` turns into metrics."""
    losses, chosen_rewards, rejected_rewards, (chosen, rejected) = pair_losses(models, batch, dpo)
    sums = {**reward_sums(chosen_rewards, rejected_rewards), "logps/chosen": chosen.sum(),
            "logps/rejected": rejected.sum(), "pairs": len(losses), "tokens": token_count(batch)}
    return losses.mean(), sums


@torch.no_grad()
def evaluate(models: Models, loader, dpo: DpoSection, device) -> dict:
    """Held-out pairs: the loss and the reward statistics of training, per pair over every rank's pairs,
    and the reference's mean log-probs (constant over a run: the reference never moves)."""
    models.actor.eval()
    total = {}
    for batch in loader:
        batch = to_device(batch, device)
        ref_chosen, ref_rejected = reference_logprobs(models, batch)
        chosen, rejected = answer_logprobs(models.actor, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, dpo.beta,
                                                            dpo.loss_type)
        total = add_sums(total, {**reward_sums(chosen_rewards, rejected_rewards), "loss": losses.sum(),
                                 "logps/chosen": chosen.sum(), "logps/rejected": rejected.sum(),
                                 "ref_logps/chosen": ref_chosen.sum(), "ref_logps/rejected": ref_rejected.sum(),
                                 "pairs": len(losses)})
    total = sum_over_ranks(total, device)
    pairs = total.pop("pairs")
    return {f"eval/{name}": value / pairs for name, value in total.items()}


# ---- the run ------------------------------------------------------------------------------------

def run(config: DpoConfig) -> dict:
    """Trains the policy for the planned steps; returns the last evaluation's metrics."""
    tokenizer = load_tokenizer(config.model)
    train_set, eval_set, report = prepare_dataset(config.data, tokenizer, config.seed)
    plan = batch_plan(config, init_distributed())
    if dist.get_rank() == 0:
        logger.info(report.summary())
    train_set, eval_set, collate = batch_layout(config.data, train_set, eval_set, tokenizer.pad_token_id)
    models, built = build_models(config, tokenizer, total_optimizer_steps(config, len(train_set), plan),
                                 config.dpo.reference_model("dpo"))
    device = built.engine.device
    stage = Stage(train_set, eval_set, collate=collate, step=lambda batch: dpo_step(models, batch, config.dpo),
                  evaluate=lambda loader: evaluate(models, loader, config.dpo, device),
                  tokenizer=tokenizer, metrics=pair_means, progress=("loss", "rewards/accuracy", "rewards/margins"))
    return train(config, built, RunDirectory(config), stage)


if __name__ == "__main__":
    sys.exit(main(run, DpoConfig, description=__doc__.splitlines()[0]))
