"""The supervised training loop SFT and reward-model training share.

A stage supplies what differs (how a batch becomes a loss and metrics, how evaluation
sums up); this loop owns what must be identical everywhere: the sampler and data
position, gradient accumulation, logging, evaluation cadence, checkpoints, resume and
the final export.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .checkpoint import export_final, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import DataError
from .engine import BatchPlan, TrainingEngine
from .metrics import MetricsLogger, ThroughputMeter, peak_memory_bytes, progress_bar, synchronize_cuda

logger = logging.getLogger(__name__)

# step_fn(engine, batch) -> (loss, metrics to average, tokens processed)
StepFn = Callable[[object, dict], tuple]
# eval_fn(engine, loader) -> metrics, already reduced over ranks
EvalFn = Callable[[object, DataLoader], dict]


@dataclasses.dataclass
class Position:
    step: int = 0          # optimizer steps taken
    epoch: int = 0
    micro_batch: int = 0   # micro-batches of `epoch` already consumed on each rank


def optimizer_steps_per_epoch(num_rows: int, plan: BatchPlan) -> int:
    return num_rows // (plan.micro_batch_size * plan.world_size) // plan.gradient_accumulation_steps


def total_optimizer_steps(config, num_rows: int, plan: BatchPlan) -> int:
    """Steps the run will take: all epochs, cut at `training.max_steps`.

    Raises:
        DataError: the data is too small for one optimizer step.
    """
    per_epoch = optimizer_steps_per_epoch(num_rows, plan)
    if per_epoch == 0:
        raise DataError(f"`data.path` {config.data.path}: {num_rows} training rows are fewer than one optimizer "
                        f"step needs ({plan.global_batch_size} = micro-batch x accumulation x ranks)")
    total = per_epoch * config.training.epochs
    return min(total, config.training.max_steps) if config.training.max_steps else total


def train_loader(dataset, collate, plan: BatchPlan, seed: int, position: Position) -> DataLoader:
    """This rank's micro-batches for `position.epoch`, from `position.micro_batch` on.

    Order depends only on (seed, epoch), so a resumed run sees exactly the batches the
    uninterrupted one would have. Loaders get their own generator: otherwise each one draws a
    seed from torch's global RNG when it starts, at another point of the stream after a resume.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = DistributedSampler(dataset, num_replicas=plan.world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(position.epoch)
    indices = list(sampler)[position.micro_batch * plan.micro_batch_size:]
    return DataLoader(Subset(dataset, indices), batch_size=plan.micro_batch_size, collate_fn=collate,
                      drop_last=True, generator=torch.Generator())


def micro_batches(dataset, collate, plan: BatchPlan, seed: int, position: Position):
    """This rank's micro-batches from `position` on, epoch after epoch; the caller stops.

    Advances `position` to the next epoch when one is used up (the caller counts micro-batches).
    """
    while True:
        yield from train_loader(dataset, collate, plan, seed, position)
        position.epoch, position.micro_batch = position.epoch + 1, 0


def eval_loader(dataset, collate, plan: BatchPlan) -> DataLoader:
    """This rank's share of the eval set (every row once over all ranks, padded to equal counts)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = DistributedSampler(dataset, num_replicas=plan.world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=plan.micro_batch_size, sampler=sampler, collate_fn=collate,
                      generator=torch.Generator())


def to_device(batch: dict, device) -> dict:
    return {name: value.to(device) if torch.is_tensor(value) else value for name, value in batch.items()}


class NonFiniteStepsError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients: the run is diverging."""


@dataclasses.dataclass
class StepOutcome:
    grad_norm: float   # global norm before clipping (nan off the accumulation boundary, inf when skipped)
    skipped: bool      # the update was withheld: non-finite loss or gradients on some rank
    seconds: float = math.nan  # wall time of `engine.step()`: the optimizer's share of the step


def optimizer_step(engine) -> StepOutcome:
    """`engine.step()`, withholding the update when any rank's gradients are not finite.

    DeepSpeed's wrappers (ZeRO 1-3, bf16, fp16) check the global gradient norm, skip the update and
    leave the schedule where it was. At fp32 ZeRO-0 the client optimizer runs bare: there the norm is
    taken here, from gradients the engine's backward has already averaged over the ranks, and the
    same protocol is followed. Either way `engine.skipped_steps` counts the skip.
    """
    own_norm = None  # DeepSpeed records the norm except for a bare optimizer
    if (engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0
            and not (engine.bfloat16_enabled() or engine.fp16_enabled())):
        grads = [param.grad for param in engine.module.parameters() if param.grad is not None]
        own_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    skipped_before = engine.skipped_steps
    synchronize_cuda()
    started = time.perf_counter()
    with _update_withheld(engine.optimizer, own_norm is not None and not math.isfinite(own_norm)):
        engine.step()
    synchronize_cuda()
    seconds = time.perf_counter() - started
    if engine.skipped_steps > skipped_before:
        return StepOutcome(math.inf, skipped=True, seconds=seconds)
    recorded = engine.get_global_grad_norm()
    grad_norm = recorded if recorded is not None else own_norm
    return StepOutcome(math.nan if grad_norm is None else float(grad_norm), skipped=False, seconds=seconds)


@contextlib.contextmanager
def _update_withheld(optimizer, withheld: bool):
    """While active (if `withheld`), `optimizer.step()` does nothing and `optimizer.overflow` is set:
    the attribute DeepSpeed's engine reads to count a skipped step and hold the LR schedule."""
    if not withheld:
        yield
        return
    optimizer.step = lambda closure=None: None
    optimizer.overflow = True
    try:
        yield
    finally:
        del optimizer.step, optimizer.overflow


class SkipGuard:
    """Counts withheld updates; stops the run after `limit` in a row (a diverging run only burns time)."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def update(self, outcome: StepOutcome, step: int, total_skipped: int) -> None:
        """Raises NonFiniteStepsError after `limit` consecutive skips; warns on each one."""
        if not outcome.skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        logger.warning("step %d: non-finite loss or gradients on some rank; update skipped, parameters and "
                       "optimizer state unchanged (%d in a row, %d in this run)", step, self.in_a_row, total_skipped)
        if self.in_a_row >= self.limit:
            raise NonFiniteStepsError(
                f"steps {step - self.in_a_row + 1}-{step}: {self.in_a_row} optimizer steps in a row had non-finite "
                f"loss or gradients (`training.max_consecutive_skips` is {self.limit}); the run is diverging. "
                "Lower `optim.lr`, check the data rows of these steps, or use fp32 / bf16 instead of fp16. "
                "Checkpoints written so far are intact; resume with checkpoint.resume=true.")


def mean_over_ranks(values: dict, device=None) -> dict:
    """Averages each metric over the data-parallel ranks (same keys on every rank).

    `device` is where the backend can reduce (the engine's device: NCCL takes no CPU tensors).
    """
    if not values or not dist.is_initialized():
        return values
    names = sorted(values)
    tensor = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {name: value / dist.get_world_size() for name, value in zip(names, tensor.tolist())}


def run_supervised(config, built: TrainingEngine, train_set, eval_set, collate, step_fn: StepFn,
                   eval_fn: EvalFn, tokenizer) -> dict:
    """Trains to the planned step count; returns the last evaluation's metrics."""
    engine, plan = built.engine, built.plan
    rank = dist.get_rank() if dist.is_initialized() else 0
    total_steps = total_optimizer_steps(config, len(train_set), plan)
    position = Position()
    checkpoint = latest_checkpoint(config.output_dir) if config.checkpoint.resume else None
    if checkpoint is not None:
        state = load_checkpoint(engine, checkpoint)
        position = Position(state["step"], state["epoch"], state["micro_batch"])
        logger.info("resumed from %s (step %d)", checkpoint, position.step)
    metrics_logger = MetricsLogger(config.output_dir, rank=rank, tensorboard=config.logging.tensorboard,
                                   resume_step=position.step if checkpoint is not None else None)
    evaluation = eval_loader(eval_set, collate, plan)
    if position.step == 0:
        metrics_logger.log(eval_fn(engine, evaluation), step=0)
    bar = progress_bar(total_steps, rank, config.logging.progress_bar, initial=position.step)
    meter, window, tokens = ThroughputMeter(), [], 0
    last_eval, guard = {}, SkipGuard(config.training.max_consecutive_skips)
    meter.start()
    for batch in micro_batches(train_set, collate, plan, config.seed, position):
        if position.step >= total_steps:  # also true on entry when a resumed run is already done
            break
        engine.train()
        if not window:
            lr = built.scheduler.get_last_lr()[0]  # the rate this optimizer step uses
        loss, metrics, batch_tokens = step_fn(engine, to_device(batch, engine.device))
        engine.backward(loss)
        outcome = optimizer_step(engine)
        position.micro_batch += 1
        window.append({"loss": loss.item(), **metrics})
        tokens += batch_tokens
        if position.micro_batch % plan.gradient_accumulation_steps:
            continue
        position.step += 1
        logged = mean_over_ranks({name: sum(m[name] for m in window) / len(window) for name in window[0]},
                                 engine.device)
        timing = meter.stop(tokens * plan.world_size)
        logged.update(lr=lr, grad_norm=outcome.grad_norm, skipped_steps=engine.skipped_steps,
                      tokens_per_s=timing["tokens_per_s"], step_time=timing["step_time"],
                      optimizer_step_time=outcome.seconds,
                      peak_memory_bytes=peak_memory_bytes())
        if position.step == 1:  # optimizer state exists from the first step on
            logged["optimizer_state_bytes"] = held_state_bytes(built.optimizer)
        if is_due(position.step, config.logging.every_steps, total_steps):
            metrics_logger.log(logged, step=position.step)
        guard.update(outcome, position.step, engine.skipped_steps)
        bar.update(1)
        bar.set_postfix(loss=f"{logged['loss']:.3f}", tok_s=f"{timing['tokens_per_s']:.0f}")
        window, tokens = [], 0
        if is_due(position.step, config.training.eval_every_steps, total_steps):
            last_eval = eval_fn(engine, evaluation)
            metrics_logger.log(last_eval, step=position.step)
        checkpoint_if_due(engine, config, position, total_steps)
        meter.start()
    bar.close()
    metrics_logger.close()
    export_final(engine, tokenizer, config.output_dir)
    return last_eval


def is_due(step: int, every: Optional[int], total_steps: int) -> bool:
    """Every `every` steps and always after the last one (logging, evaluation)."""
    return bool(every and step % every == 0) or step == total_steps


def checkpoint_if_due(engine, config, position: Position, total_steps: int, extra: Optional[dict] = None) -> None:
    """Saves every `checkpoint.every_steps` (not after the last step: the final export covers it).

    `extra` joins the data position in the trainer state (e.g. ReMax's best eval reward).
    """
    every = config.checkpoint.every_steps
    if every and position.step % every == 0 and position.step < total_steps:
        save_checkpoint(engine, config.output_dir, position.step, {**dataclasses.asdict(position), **(extra or {})},
                        config.checkpoint.keep_last)


def held_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this rank holds (Adam-mini counts its own; others: every state tensor)."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))


def token_weighted_mean(total: float, count: float, device=None) -> float:
    """Sums (over ranks) of a token-weighted total and its count, as a mean."""
    values = torch.tensor([total, count], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(values)
    return (values[0] / values[1]).item() if values[1] > 0 else math.nan


__all__ = ["Position", "StepOutcome", "SkipGuard", "NonFiniteStepsError", "run_supervised", "total_optimizer_steps",
           "train_loader", "eval_loader", "mean_over_ranks", "token_weighted_mean", "optimizer_steps_per_epoch",
           "optimizer_step", "to_device", "held_state_bytes", "is_due", "checkpoint_if_due", "micro_batches"]
