"""Non-finite steps under real DeepSpeed ranks: the shared training loop withholds the update.

Launched by test_loop.py as `deepspeed --num_gpus 2 tests/pipeline/nonfinite_worker.py --out F`.
For each case, the shared loop (`pipeline.loop.train`) trains a tiny Llama for 6 steps while rank 1 alone returns a
non-finite loss at step 3. The full fp32 parameters and this rank's optimizer state are taken
before step 3 and before step 4: the skipped step must leave both exactly as they were. Then a
run whose loss is non-finite from step 3 on must stop after `training.max_consecutive_skips`.
Rank 0 writes the figures to --out.
"""
import json
import math
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import (CheckpointConfig, DataConfig, EngineConfig, LoggingConfig, ModelConfig, OptimConfig,
                             RunConfig, TrainingConfig)
from pipeline.engine import create_engine, init_distributed
from pipeline.loop import NonFiniteStepsError, Stage, train
from pipeline.rundir import RunDirectory
from tests.rank_tools import full_fp32_params, max_delta, worker_parser, write_results
from tests.tiny_models import tiny_llama, tiny_tokenizer

STEPS, MICRO, ROWS, POISONED_STEP = 6, 2, 48, 3
CASES = [  # (name, zero stage, precision, optimizer, accumulation, poison)
    ("zero0-adam_mini", 0, "fp32", "adam_mini", 1, math.nan),
    ("zero0-adamw", 0, "fp32", "adamw", 1, math.inf),
    ("zero2-adam_mini-accumulation", 2, "fp32", "adam_mini", 2, math.nan),
    ("zero3-adam_mini", 3, "fp32", "adam_mini", 1, math.nan),
    ("zero2-adam_mini-bf16", 2, "bf16", "adam_mini", 1, math.nan),
]


def run_config(output_dir, stage, precision, optimizer, accumulation, max_skips=3) -> RunConfig:
    return RunConfig(output_dir=output_dir, model=ModelConfig(config={"model_type": "llama"}),
                     data=DataConfig(path="unused"),
                     optim=OptimConfig(name=optimizer, lr=1e-3, warmup_steps=2, scheduler="cosine"),
                     engine=EngineConfig(zero_stage=stage, precision=precision, micro_batch_size=MICRO,
                                         gradient_accumulation_steps=accumulation),
                     training=TrainingConfig(max_steps=STEPS, max_consecutive_skips=max_skips),
                     logging=LoggingConfig(tensorboard=False, progress_bar=False),
                     checkpoint=CheckpointConfig(every_steps=2))


def dataset():
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 203, (10,), generator=generator)} for _ in range(ROWS)]


def collate(rows):
    return {"input_ids": torch.stack([row["input_ids"] for row in rows])}


def evaluate(engine, loader):
    losses = [engine(input_ids=b["input_ids"], labels=b["input_ids"]).loss.item() for b in loader]
    return {"eval/loss": sum(losses) / len(losses)}


def optimizer_state(engine) -> dict:
    """This rank's optimizer state tensors, cloned (the inner optimizer DeepSpeed drives)."""
    return {(index, key): value.detach().clone()
            for index, state in enumerate(engine.basic_optimizer.state.values())
            for key, value in state.items() if torch.is_tensor(value)}


def state_delta(before: dict, after: dict) -> float:
    if before.keys() != after.keys():
        return math.inf
    return max((before[key].float() - after[key].float()).abs().max().item() for key in before)


class PoisonedStep:
    """A step_fn whose loss is multiplied by `poison` on rank 1 during the chosen optimizer steps;
    it records parameters and optimizer state at the start of chosen steps."""

    def __init__(self, accumulation, poisoned_steps, snapshot_steps=()):
        self.accumulation, self.poisoned_steps, self.snapshot_steps = accumulation, poisoned_steps, snapshot_steps
        self.micro_batches, self.snapshots = 0, {}
        self.poison = math.nan

    def __call__(self, engine, batch):
        step = self.micro_batches // self.accumulation + 1  # the optimizer step this micro-batch feeds
        if self.micro_batches % self.accumulation == 0 and step in self.snapshot_steps:
            self.snapshots[step] = (full_fp32_params(engine), optimizer_state(engine))
        self.micro_batches += 1
        loss = engine(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        if step in self.poisoned_steps and dist.get_rank() == 1:
            loss = loss * self.poison
        return loss, {"tokens": batch["input_ids"].numel()}


def run_stage(config, built, data, step_fn) -> None:
    engine = built.engine
    stage = Stage(data[:40], data[40:], collate, step=lambda batch: step_fn(engine, batch),
                  evaluate=lambda loader: evaluate(engine, loader), tokenizer=tiny_tokenizer())
    train(config, built, RunDirectory(config), stage)


def shared_temp_dir() -> str:
    shared = [tempfile.mkdtemp()]
    dist.broadcast_object_list(shared)
    return shared[0]


def read_metrics(output_dir) -> list:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def skip_case(stage, precision, optimizer, accumulation, poison) -> dict:
    output_dir = shared_temp_dir()
    config = run_config(output_dir, stage, precision, optimizer, accumulation)
    built = create_engine(config, tiny_llama(), total_steps=STEPS)
    step_fn = PoisonedStep(accumulation, {POISONED_STEP}, {POISONED_STEP, POISONED_STEP + 1, POISONED_STEP + 2})
    step_fn.poison = poison
    data = dataset()
    run_stage(config, built, data, step_fn)
    (params_before, state_before), (params_after, state_after), (params_next, _) = (
        step_fn.snapshots[s] for s in (POISONED_STEP, POISONED_STEP + 1, POISONED_STEP + 2))
    state_deltas = torch.tensor([state_delta(state_before, state_after)])
    dist.all_reduce(state_deltas, op=dist.ReduceOp.MAX)
    rows = {row["step"]: row for row in read_metrics(output_dir) if "loss" in row}
    return {"param_delta_over_skip": max_delta(params_before, params_after),
            "state_delta_over_skip": state_deltas.item(),
            "param_delta_next_step": max_delta(params_after, params_next),
            "skipped_steps": [rows[s]["skipped_steps"] for s in sorted(rows)],
            "lr": [rows[s]["lr"] for s in sorted(rows)],
            "grad_norm": [rows[s]["grad_norm"] for s in sorted(rows)],
            "loss": [rows[s]["loss"] for s in sorted(rows)]}


def diverging_case() -> dict:
    output_dir = shared_temp_dir()
    config = run_config(output_dir, 2, "fp32", "adam_mini", 1, max_skips=2)
    built = create_engine(config, tiny_llama(), total_steps=STEPS)
    data = dataset()
    message = None
    try:
        run_stage(config, built, data, PoisonedStep(1, set(range(3, STEPS + 1))))
    except NonFiniteStepsError as error:
        message = str(error)
    checkpoints = sorted(path.name for path in (Path(output_dir) / "checkpoints").iterdir()
                         if (path / "COMPLETE").is_file())
    return {"message": message, "logged_steps": [row["step"] for row in read_metrics(output_dir) if "loss" in row],
            "complete_checkpoints": checkpoints, "final_written": (Path(output_dir) / "final").exists()}


def main():
    args = worker_parser().parse_args()
    init_distributed()
    results = {name: skip_case(*settings) for name, *settings in CASES}
    results["diverging"] = diverging_case()
    write_results(args.out, results)


if __name__ == "__main__":
    main()
