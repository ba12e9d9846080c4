"""Supervised fine-tuning, full-parameter or LoRA (`model.lora.enabled`), loss on response tokens only.

    python -m stages.sft --config configs/tiny/sft_full.yaml [key.sub=value ...]
    deepspeed --num_gpus 2 --module stages.sft --config configs/llama2-7b/sft_full.yaml
"""
import dataclasses
import logging
import math
import sys

import torch

from pipeline.config import RunConfig
from pipeline.data import prepare_dataset
from pipeline.engine import batch_plan, create_engine, init_distributed, sharded_creation, training_ds_config
from pipeline.loop import Stage, sum_over_ranks, to_device, total_optimizer_steps, train
from pipeline.models import apply_lora, load_causal_lm, load_tokenizer, model_dtype
from pipeline.packing import batch_layout, model_inputs, token_count
from pipeline.rundir import RunDirectory
from pipeline.run import main

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SFTConfig(RunConfig):
    def problems(self) -> list:
        problems = super().problems()
        if self.data.format not in ("sft", "chat"):
            problems.append(f"`data.format` is {self.data.format!r}; SFT trains on sft or chat data")
        return problems


def sft_step(engine, batch: dict) -> tuple:
    """Mean cross-entropy over the response tokens of one micro-batch (padded or packed)."""
    output = engine(**model_inputs(batch), labels=batch["labels"], use_cache=False)
    return output.loss, {"tokens": token_count(batch)}


@torch.no_grad()
def evaluate(engine, loader) -> dict:
    """Token-weighted eval loss and perplexity over the held-out rows of every rank."""
    engine.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = to_device(batch, engine.device)
        loss = engine(**model_inputs(batch), labels=batch["labels"], use_cache=False).loss
        # HF shifts labels by one: the first label never counts.
        tokens = (batch["labels"][:, 1:] != -100).sum()
        total, count = total + loss * tokens, count + tokens
    sums = sum_over_ranks({"loss": total, "tokens": count}, engine.device)
    loss = sums["loss"] / sums["tokens"] if sums["tokens"] else math.nan
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def run(config: SFTConfig) -> dict:
    tokenizer = load_tokenizer(config.model)
    train_set, eval_set, report = prepare_dataset(config.data, tokenizer, config.seed)
    logger.info(report.summary())
    train_set, eval_set, collate = batch_layout(config.data, train_set, eval_set, tokenizer.pad_token_id)
    if config.model.config is not None:  # a fresh model: its vocabulary is the tokenizer's
        for key, value in (("vocab_size", len(tokenizer)), ("pad_token_id", tokenizer.pad_token_id),
                           ("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id)):
            config.model.config.setdefault(key, value)
    with sharded_creation(training_ds_config(config)):  # ZeRO-3: partitioned as it loads
        model = load_causal_lm(config.model, dtype=model_dtype(config.model, config.engine.precision))
    if config.model.lora.enabled:
        model = apply_lora(model, config.model.lora)
    plan = batch_plan(config, init_distributed())
    built = create_engine(config, model, total_optimizer_steps(config, len(train_set), plan))
    engine = built.engine
    stage = Stage(train_set, eval_set, collate=collate, step=lambda batch: sft_step(engine, batch),
                  evaluate=lambda loader: evaluate(engine, loader), tokenizer=tokenizer)
    return train(config, built, RunDirectory(config), stage)


if __name__ == "__main__":
    sys.exit(main(run, SFTConfig, description=__doc__.splitlines()[0]))
