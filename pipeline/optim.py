"""The optimizers a run can name in `optim.name`: one table that config validation, the engine
factory, the memory plan and `--dry-run` all read. Adding an optimizer is one entry here.

Each entry knows how to build itself for a model, what it holds per rank under ZeRO (planned
from the same arithmetic DeepSpeed uses, on a meta-device model), and which hyperparameters it
would refuse, so bad values are reported with the rest of the config instead of inside the ranks.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from optimizers import Adam_mini, applies_weight_decay, geometry_from_model, shard_bounds


def zero_slice_numel(numels: list, world_size: int, rank: int, zero_stage: int) -> int:
    """Elements of trainable parameters `rank` keeps optimizer state for.

    ZeRO-1/2 flatten a param group, pad it to a multiple of 2 x world size and split it evenly;
    ZeRO-3 splits each parameter on its own; stage 0 keeps everything on every rank.
    """
    if zero_stage in (1, 2) and world_size > 1:
        start, end = shard_bounds(sum(numels), world_size, rank, zero_stage)
        return end - start
    return sum(end - start for start, end in (shard_bounds(n, world_size, rank, zero_stage) for n in numels))


def _trainable(model) -> list:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def _hyperparameter_problems(optim) -> list:
    """What torch.optim / Adam-mini would refuse (or silently turn into NaN weights)."""
    problems = []
    if not math.isfinite(optim.lr) or optim.lr <= 0:
        problems.append(f"`optim.lr` is {optim.lr}; it must be positive (e.g. 1e-5)")
    betas = optim.betas
    if (len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
            or not all(0 <= b < 1 for b in betas)):
        problems.append(f"`optim.betas` is {betas}; give two numbers in [0, 1), e.g. [0.9, 0.95]")
    for field, value in (("optim.eps", optim.eps), ("optim.weight_decay", optim.weight_decay),
                         ("optim.gradient_clipping", optim.gradient_clipping)):
        if not math.isfinite(value) or value < 0:
            problems.append(f"`{field}` is {value}; it must not be negative")
    if optim.eps == 0:
        problems.append("`optim.eps` is 0; a block whose gradients are all zero would divide by zero: use e.g. 1e-8")
    if not math.isfinite(optim.min_lr_ratio) or not 0 <= optim.min_lr_ratio <= 1:
        problems.append(f"`optim.min_lr_ratio` is {optim.min_lr_ratio}; use a value in [0, 1]")
    return problems


# ---- Adam-mini ----------------------------------------------------------------------------------

def _build_adam_mini(optim, model) -> torch.optim.Optimizer:
    return Adam_mini(model.named_parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                     weight_decay=optim.weight_decay, shared_groups=optim.shared_groups, **geometry_from_model(model))


def _adam_mini_state_planner(model) -> Callable:
    # Only the partition arithmetic runs: nothing is allocated, so a meta-device model is enough.
    optimizer = Adam_mini(_trainable(model), **geometry_from_model(model))
    return optimizer.planned_state_bytes


# ---- AdamW --------------------------------------------------------------------------------------

def _build_adamw(optim, model) -> torch.optim.Optimizer:
    """Norms and biases never decay. Fused: one kernel per group and no temporary the size of a
    param group (the foreach path allocates one in `_foreach_sqrt`; under ZeRO-1/2 a group is
    nearly the whole model)."""
    decay, no_decay = [], []
    for name, param in _trainable(model):
        (decay if applies_weight_decay(name) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=optim.lr,
                             betas=tuple(optim.betas), eps=optim.eps, fused=True)


def _adamw_state_planner(model) -> Callable:
    """exp_avg and exp_avg_sq in fp32 for every element of this rank's slice."""
    numels = [param.numel() for _, param in _trainable(model)]
    return lambda world_size, rank, zero_stage: 2 * 4 * zero_slice_numel(numels, world_size, rank, zero_stage)


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
    build: Callable            # (OptimConfig, model) -> torch.optim.Optimizer
    # (model) -> (world_size, rank, zero_stage) -> bytes of fp32 state on `rank`; works on meta models
    state_planner: Callable
    problems: Callable = _hyperparameter_problems  # (OptimConfig) -> list of messages


OPTIMIZERS = {
    "adam_mini": OptimizerEntry(_build_adam_mini, _adam_mini_state_planner),
    "adamw": OptimizerEntry(_build_adamw, _adamw_state_planner),
}


def build_optimizer(optim, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer `optim.name` names, for `model`'s trainable parameters."""
    return OPTIMIZERS[optim.name].build(optim, model)


def planned_state_bytes(model, world_sizes, zero_stages=(0, 1, 2, 3)) -> dict:
    """{(optimizer name, world size, zero stage): fp32 state bytes on the most loaded rank}."""
    planned = {}
    for name, entry in OPTIMIZERS.items():
        state_bytes = entry.state_planner(model)
        for world_size in world_sizes:
            for stage in zero_stages:
                planned[name, world_size, stage] = max(state_bytes(world_size, rank, stage)
                                                       for rank in range(world_size))
    return planned


def held_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this rank holds now (Adam-mini counts its own; others: every state tensor)."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))


__all__ = ["OPTIMIZERS", "OptimizerEntry", "build_optimizer", "planned_state_bytes", "held_state_bytes",
           "zero_slice_numel"]
