"""Pairwise reward-model training: backbone + scalar head, loss -logsigmoid(r_chosen - r_rejected).

    python -m stages.reward --config configs/tiny/reward.yaml [key.sub=value ...]
"""
import dataclasses
import logging
import sys

import torch
import torch.nn.functional as F

from pipeline.config import RunConfig
from pipeline.data import prepare_dataset
from pipeline.engine import batch_plan, create_engine, init_distributed, sharded_creation, training_ds_config
from pipeline.loop import Stage, sum_over_ranks, to_device, total_optimizer_steps, train
from pipeline.models import RewardModel, apply_lora, load_tokenizer, model_dtype
from pipeline.packing import batch_layout, model_inputs, token_count
from pipeline.rundir import RunDirectory
from pipeline.run import main

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RewardConfig(RunConfig):
    def problems(self) -> list:
        problems = super().problems()
        if self.data.format != "pairwise":
            problems.append(f"`data.format` is {self.data.format!r}; reward training needs pairwise data")
        return problems


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss: mean of -log sigmoid(r_chosen - r_rejected); both (B,)."""
    return -F.logsigmoid(chosen - rejected).mean()


def split_scores(engine, batch: dict) -> tuple:
    """The collator stacks (or packs) B chosen rows then B rejected rows: one forward scores both."""
    scores = engine(**model_inputs(batch))  # (2B,)
    return scores.float().chunk(2)


def reward_step(engine, batch: dict) -> tuple:
    chosen, rejected = split_scores(engine, batch)
    sums = {"accuracy": (chosen > rejected).float().mean(), "chosen_score": chosen.detach().mean(),
            "rejected_score": rejected.detach().mean(), "tokens": token_count(batch)}
    return pairwise_loss(chosen, rejected), sums


@torch.no_grad()
def evaluate(engine, loader) -> dict:
    """Held-out pairwise accuracy, loss and mean scores, averaged over every rank's pairs."""
    engine.eval()
    sums = {"accuracy": 0.0, "loss": 0.0, "chosen_score": 0.0, "rejected_score": 0.0, "pairs": 0}
    for batch in loader:
        chosen, rejected = split_scores(engine, to_device(batch, engine.device))
        sums["accuracy"] += (chosen > rejected).float().sum()
        sums["loss"] += pairwise_loss(chosen, rejected) * len(chosen)
        sums["chosen_score"] += chosen.sum()
        sums["rejected_score"] += rejected.sum()
        sums["pairs"] += len(chosen)
    totals = sum_over_ranks(sums, engine.device)
    return {f"eval/{name}": value / totals["pairs"] for name, value in totals.items() if name != "pairs"}


def run(config: RewardConfig) -> dict:
    tokenizer = load_tokenizer(config.model)
    train_set, eval_set, report = prepare_dataset(config.data, tokenizer, config.seed)
    logger.info(report.summary())
    train_set, eval_set, collate = batch_layout(config.data, train_set, eval_set, tokenizer.pad_token_id)
    with sharded_creation(training_ds_config(config)):  # ZeRO-3: partitioned as it loads
        model = RewardModel.from_causal_lm(config.model, dtype=model_dtype(config.model, config.engine.precision))
    if config.model.lora.enabled:
        model = apply_lora(model, config.model.lora)
    plan = batch_plan(config, init_distributed())
    built = create_engine(config, model, total_optimizer_steps(config, len(train_set), plan))
    engine = built.engine
    stage = Stage(train_set, eval_set, collate=collate, step=lambda batch: reward_step(engine, batch),
                  evaluate=lambda loader: evaluate(engine, loader), tokenizer=tokenizer, progress=("loss", "accuracy"))
    return train(config, built, RunDirectory(config), stage)


if __name__ == "__main__":
    sys.exit(main(run, RewardConfig, description=__doc__.splitlines()[0]))
