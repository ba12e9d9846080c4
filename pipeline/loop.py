"""The one training loop every stage runs on.

A stage supplies what differs (`Stage`: a micro-batch's loss and the sums its metrics are made
of, an evaluation, what follows an evaluation, extra state to checkpoint); the loop owns what must
be identical everywhere: the sampler and data position, gradient accumulation in step with
DeepSpeed, the skip guard for non-finite steps, metrics and progress, the evaluation cadence,
checkpoints, resume and the final export.

An epoch holds whole accumulation windows (as torchtune does): the micro-batches that would
not fill a last window are left out, so every optimizer step of the loop is one of DeepSpeed's,
whatever the epoch length, and the schedule's step count is DeepSpeed's `global_steps`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .data import DataError
from .engine import BatchPlan, TrainingEngine
from .metrics import ThroughputMeter, peak_memory_bytes, progress_bar, synchronize_cuda
from .optim import held_state_bytes
from .rundir import RunDirectory

logger = logging.getLogger(__name__)


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
        items = "packs (`data.packing`)" if config.data.packing else "rows"
        raise DataError(f"`data.path` {config.data.path}: {num_rows} training {items} are fewer than one optimizer "
                        f"step needs ({plan.global_batch_size} = micro-batch x accumulation x ranks)")
    total = per_epoch * config.training.epochs
    return min(total, config.training.max_steps) if config.training.max_steps else total


def position_on_other_ranks(position: Position, saved: dict, plan: BatchPlan) -> Position:
    """The data position of a checkpoint written by `saved["world_size"]` ranks, on `plan`'s.

    The sampler's order over all ranks depends only on (seed, epoch), and each optimizer step
    takes the next global-batch rows of it, however they are split among ranks. A checkpoint
    continues on another rank count only with the same global batch (`checkpoint._check_rank_count`),
    so the steps taken in the epoch carry over and only the per-rank micro-batch count changes.

    Raises:
        ValueError: the saved position is not at the end of an accumulation window.
    """
    saved_accumulation = saved["gradient_accumulation_steps"]
    if position.micro_batch % saved_accumulation:
        raise ValueError(f"the checkpoint's data position (micro-batch {position.micro_batch} of epoch "
                         f"{position.epoch}) is not at the end of an accumulation window of {saved_accumulation}")
    steps_in_epoch = position.micro_batch // saved_accumulation
    moved = Position(position.step, position.epoch, steps_in_epoch * plan.gradient_accumulation_steps)
    logger.info("data position re-derived for %d rank(s): the checkpoint was written by %d (micro-batch %d x "
                "accumulation %d); epoch %d continues after its first %d steps (%d rows of the same order), from "
                "micro-batch %d of each rank (was %d), %d rows per step as before", plan.world_size,
                saved["world_size"], saved["micro_batch_size"], saved_accumulation, moved.epoch, steps_in_epoch,
                steps_in_epoch * plan.global_batch_size, moved.micro_batch, position.micro_batch,
                plan.global_batch_size)
    return moved


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

    Each epoch yields whole accumulation windows only (`optimizer_steps_per_epoch` of them), so
    the loop's windows and DeepSpeed's never drift apart across epochs. Advances `position` to the
    next epoch when one is used up (the caller counts micro-batches).
    """
    per_epoch = optimizer_steps_per_epoch(len(dataset), plan) * plan.gradient_accumulation_steps
    while True:
        remaining = max(0, per_epoch - position.micro_batch)
        yield from itertools.islice(train_loader(dataset, collate, plan, seed, position), remaining)
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
    boundary: bool = True      # DeepSpeed took (or withheld) an optimizer step here


def optimizer_step(engine) -> StepOutcome:
    """`engine.step()`, withholding the update when any rank's gradients are not finite.

    DeepSpeed's wrappers (ZeRO 1-3, bf16, fp16) check the global gradient norm, skip the update and
    leave the schedule where it was. At fp32 ZeRO-0 the client optimizer runs bare: there the norm is
    taken here, from gradients the engine's backward has already averaged over the ranks, the same
    protocol is followed, and the clipping reuses that norm instead of DeepSpeed taking it a second
    time. Either way `engine.skipped_steps` counts the skip.
    """
    if not engine.is_gradient_accumulation_boundary():  # DeepSpeed only counts the micro-step
        engine.step()
        return StepOutcome(math.nan, skipped=False, seconds=0.0, boundary=False)
    own_norm = None  # DeepSpeed records the norm except for a bare optimizer
    bare = engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
    skipped_before = engine.skipped_steps
    synchronize_cuda()
    started = time.perf_counter()
    if bare:
        grads = [param.grad for param in engine.module.parameters() if param.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        own_norm = float(norm)
    with _update_withheld(engine.optimizer, own_norm is not None and not math.isfinite(own_norm)), \
            _clipped_with(engine, grads if bare else None, norm if bare else None):
        engine.step()
    synchronize_cuda()
    seconds = time.perf_counter() - started
    if engine.skipped_steps > skipped_before:
        return StepOutcome(math.inf, skipped=True, seconds=seconds)
    recorded = engine.get_global_grad_norm()
    grad_norm = recorded if recorded is not None else own_norm
    return StepOutcome(math.nan if grad_norm is None else float(grad_norm), skipped=False, seconds=seconds)


@contextlib.contextmanager
def _clipped_with(engine, grads, total_norm):
    """While active (if `grads` is given), the engine's fp32 clipping scales `grads` by the norm already
    taken rather than computing it again."""
    if grads is None:
        yield
        return
    max_norm = engine.gradient_clipping()
    engine.clip_fp32_gradients = lambda: torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total_norm)
    try:
        yield
    finally:
        del engine.clip_fp32_gradients


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


def sum_over_ranks(sums: dict, device=None) -> dict:
    """Adds each value over the data-parallel ranks (same keys on every rank) in one collective.

    Values may be numbers or 0-dim tensors: they are stacked on `device` (where the backend can
    reduce: NCCL takes no CPU tensors) and read back once, one host sync for the whole dict.
    """
    if not sums:
        return {}
    names = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[name], dtype=torch.float64, device=device).detach().reshape(())
                          for name in names])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return dict(zip(names, values.tolist()))


def per_micro_batch_means(total: dict) -> dict:
    """The default step metrics: every sum divided by the micro-batches it was summed over (all ranks)."""
    count = total["micro_batches"]
    return {name: value / count for name, value in total.items() if name not in ("micro_batches", "tokens")}


@dataclasses.dataclass
class Stage:
    """What a stage supplies to `train`.

    `step(batch)` runs one micro-batch (already on the device) forward and returns (loss with grad,
    sums): numbers or 0-dim tensors added over the window's micro-batches and over the ranks, from
    which `metrics` makes the logged values; "tokens" (tokens processed) feeds tokens/s. The loop
    adds "loss" and "micro_batches" itself. A stage that trains further engines (`engines`, e.g.
    PPO's critic) returns (loss, sums, {name: that engine's loss}): the loop steps each before the
    actor, in the same accumulation window, and logs `<name>_grad_norm` and `<name>_skipped_steps`.
    """
    train_set: Sequence
    eval_set: Sequence
    collate: Callable
    step: Callable[[dict], tuple]
    evaluate: Callable[[DataLoader], dict]          # -> metrics over every rank's rows, named "eval/..."
    tokenizer: object = None                        # exported with the model
    metrics: Callable[[dict], dict] = per_micro_batch_means
    after_evaluation: Optional[Callable[[dict, int], None]] = None  # (eval metrics, step), e.g. keep the best
    state: Callable[[], dict] = dict                # extra trainer state to checkpoint (JSON)
    load_state: Callable[[dict], None] = lambda state: None
    progress: tuple = ("loss",)                     # metrics on the progress line
    eval_every_steps: Optional[int] = None          # None: `training.eval_every_steps`
    # Further training engines (PPO's critic), {name: engine}: stepped by the loop on the losses `step`
    # returns for them, checkpointed into the actor's checkpoint directory and resumed with it.
    engines: dict = dataclasses.field(default_factory=dict)


def train(config, built: TrainingEngine, run: RunDirectory, stage: Stage) -> dict:
    """Trains to the planned step count and exports `final/`; returns the last evaluation's metrics."""
    engine, plan, device = built.engine, built.plan, built.engine.device
    total_steps = total_optimizer_steps(config, len(stage.train_set), plan)
    run.claim(built.ds_config)
    position, state = Position(), run.resume(engine, stage.engines)
    if state is not None:
        position = Position(state["step"], state["epoch"], state["micro_batch"])
        if "resharded_from" in state:
            position = position_on_other_ranks(position, state["resharded_from"], plan)
        stage.load_state(state)
    rank = dist.get_rank() if dist.is_initialized() else 0
    eval_every = stage.eval_every_steps or config.training.eval_every_steps
    if position.step < total_steps:
        logger.info("training %d optimizer steps from step %d: %d epoch(s) of %d, %d rows per step (micro-batch %d x "
                    "accumulation %d x %d rank(s)), %s, ZeRO-%d, %s", total_steps, position.step,
                    config.training.epochs, optimizer_steps_per_epoch(len(stage.train_set), plan),
                    plan.global_batch_size, plan.micro_batch_size, plan.gradient_accumulation_steps, plan.world_size,
                    config.optim.name, config.engine.zero_stage, config.engine.precision)
    evaluation = eval_loader(stage.eval_set, stage.collate, plan)
    metrics_logger = run.metrics_logger(position.step if state is not None else None)
    last_eval = {}

    def evaluate() -> dict:
        result = stage.evaluate(evaluation)
        metrics_logger.log(result, step=position.step)
        logger.info("eval at step %d: %s", position.step,
                    " ".join(f"{name.removeprefix('eval/')} {value:.4g}" for name, value in sorted(result.items())))
        if stage.after_evaluation is not None:
            stage.after_evaluation(result, position.step)
        return result

    with metrics_logger:
        if position.step == 0 and config.training.eval_at_start:
            last_eval = evaluate()
        bar = progress_bar(total_steps, rank, config.logging.progress_bar, initial=position.step)
        meter, window, guard = ThroughputMeter(), {}, SkipGuard(config.training.max_consecutive_skips)
        meter.start()
        for batch in micro_batches(stage.train_set, stage.collate, plan, config.seed, position):
            if position.step >= total_steps:  # also true on entry when a resumed run is already done
                break
            engine.train()
            if not window:
                lr = built.scheduler.get_last_lr()[0]  # the rate this optimizer step uses
            loss, sums, *more = stage.step(to_device(batch, device))
            # Further engines step first, while the actor's graph waits (the memory plan's order).
            outcomes = {}
            for name, other_loss in (more[0] if more else {}).items():
                stage.engines[name].backward(other_loss)
                outcomes[name] = optimizer_step(stage.engines[name])
            engine.backward(loss)
            outcome = optimizer_step(engine)
            position.micro_batch += 1
            window = add_sums(window, {**sums, "loss": loss.detach(), "micro_batches": 1})
            window_full = position.micro_batch % plan.gradient_accumulation_steps == 0
            if any(other.boundary != window_full for other in (outcome, *outcomes.values())):
                raise RuntimeError(f"micro-batch {position.micro_batch} of epoch {position.epoch}: the loop's "
                                   "accumulation window and DeepSpeed's disagree")
            if not window_full:
                continue
            position.step += 1
            total = sum_over_ranks(window, device)
            timing = meter.stop(int(total.get("tokens", 0)))
            logged = {**stage.metrics(total), "lr": lr, "grad_norm": outcome.grad_norm,
                      "skipped_steps": engine.skipped_steps, **timing, "optimizer_step_time": outcome.seconds,
                      "peak_memory_bytes": peak_memory_bytes()}
            for name, other in outcomes.items():
                logged.update({f"{name}_grad_norm": other.grad_norm,
                               f"{name}_skipped_steps": stage.engines[name].skipped_steps})
            if position.step == 1:  # optimizer state exists from the first step on
                logged["optimizer_state_bytes"] = held_state_bytes(built.optimizer)
            if is_due(position.step, config.logging.every_steps, total_steps):
                metrics_logger.log(logged, step=position.step)
                if not config.logging.progress_bar:
                    log_progress(position.step, total_steps, logged, stage.progress)
            guard.update(outcome, position.step, engine.skipped_steps)
            bar.update(1)
            bar.set_postfix(**{name: f"{logged[name]:.3f}" for name in stage.progress if name in logged})
            window = {}
            if is_due(position.step, eval_every, total_steps):
                last_eval = evaluate()
            every = config.checkpoint.every_steps
            if every and position.step % every == 0 and position.step < total_steps:  # the export covers the last
                run.save_checkpoint(engine, position.step, {**dataclasses.asdict(position), **stage.state()},
                                    stage.engines)
            meter.start()
        bar.close()
    final = run.export(engine, stage.tokenizer, "final")
    logger.info("wrote %s (metrics: %s)", final, run.path / "metrics.jsonl")
    return last_eval


def add_sums(total: dict, sums: dict) -> dict:
    """`total` + `sums`, key by key (tensors stay on their device: no host sync per micro-batch)."""
    return {name: total[name] + value if name in total else value for name, value in sums.items()}


def log_progress(step: int, total_steps: int, logged: dict, names: tuple) -> None:
    shown = " ".join(f"{name} {logged[name]:.4g}" for name in (*names, "lr", "grad_norm") if name in logged)
    logger.info("step %d/%d %s %.0f tok/s", step, total_steps, shown, logged.get("tokens_per_s", 0.0))


def is_due(step: int, every: Optional[int], total_steps: int) -> bool:
    """Every `every` steps and always after the last one (logging, evaluation)."""
    return bool(every and step % every == 0) or step == total_steps


__all__ = ["Position", "position_on_other_ranks", "Stage", "StepOutcome", "SkipGuard", "NonFiniteStepsError", "train",
           "total_optimizer_steps", "train_loader", "eval_loader", "sum_over_ranks", "add_sums",
           "per_micro_batch_means", "optimizer_steps_per_epoch", "optimizer_step", "to_device", "is_due",
           "micro_batches"]
