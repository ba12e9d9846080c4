"""The DeepSpeed engine factory every stage uses.

`create_engine` turns a run config and a model into a training engine with the optimizer
`optim.name` names (pipeline.optim) injected, its LR schedule and an explicit DeepSpeed config;
`create_frozen_engine` wraps a model that only runs forward (reference policy, reward model).
Batch arithmetic lives in `batch_plan` and nowhere else. Nothing here writes files: the run
directory belongs to `pipeline.rundir`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from .config import RunConfig  # noqa: E402
from .optim import build_optimizer  # noqa: E402
from .ports import free_port, shared_memory_names  # noqa: E402

logger = logging.getLogger(__name__)


# DeepSpeed's buffer sizes (elements), stated explicitly so the memory plan reads the numbers the engine uses.
REDUCE_BUCKET_ELEMENTS = 500_000_000        # gradients reduced per bucket (ZeRO 1-3)
ALLGATHER_BUCKET_ELEMENTS = 500_000_000     # ZeRO-1/2: updated weights gathered per bucket
PREFETCH_BUCKET_ELEMENTS = 50_000_000       # ZeRO-3: weights fetched ahead of the layer that needs them
MAX_LIVE_PARAMETERS = 1_000_000_000         # ZeRO-3: a cap on gathered weights that only limits prefetching
MAX_REUSE_DISTANCE = 1_000_000_000          # ZeRO-3: a gathered weight used again within this many elements
                                            # of other modules' weights stays gathered until then
PARAM_PERSISTENCE_THRESHOLD = 100_000       # ZeRO-3: parameters this small stay whole on every rank
SUB_GROUP_ELEMENTS = 1_000_000_000          # ZeRO-3: optimizer step granularity


def zero3_settings() -> dict:
    """The ZeRO-3 settings that move memory (DeepSpeed 0.19's defaults, stated so the plan reads them)."""
    return dict(stage3_prefetch_bucket_size=PREFETCH_BUCKET_ELEMENTS, stage3_max_live_parameters=MAX_LIVE_PARAMETERS,
                stage3_max_reuse_distance=MAX_REUSE_DISTANCE,
                stage3_param_persistence_threshold=PARAM_PERSISTENCE_THRESHOLD)


def reduce_bucket_elements(trainable_numel: int) -> int:
    """A gradient bucket no larger than the gradients it collects: DeepSpeed allocates the whole bucket
    up front, so a 5e8-element bucket for a LoRA run would be ~1 GB of nothing."""
    return max(1, min(REDUCE_BUCKET_ELEMENTS, trainable_numel))


class EngineConfigError(ValueError):
    """A combination the engine cannot run here, named with its fields."""


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int            # samples per rank per forward pass
    gradient_accumulation_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all ranks."""
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def batch_plan(config: RunConfig, world_size: int) -> BatchPlan:
    """The one place batch sizes are combined.

    Raises:
        EngineConfigError: `engine.global_batch_size` is not a multiple of micro-batch x world size,
            or disagrees with an explicitly set `engine.gradient_accumulation_steps`.
    """
    engine = config.engine
    accumulation = engine.gradient_accumulation_steps
    if engine.global_batch_size is not None:
        per_step = engine.micro_batch_size * world_size
        if engine.global_batch_size % per_step:
            raise EngineConfigError(
                f"`engine.global_batch_size` {engine.global_batch_size} is not a multiple of "
                f"`engine.micro_batch_size` {engine.micro_batch_size} x {world_size} rank(s) = {per_step}")
        derived = engine.global_batch_size // per_step
        if accumulation not in (1, derived):
            raise EngineConfigError(
                f"`engine.gradient_accumulation_steps` {accumulation} disagrees with `engine.global_batch_size` "
                f"{engine.global_batch_size} (which needs {derived} on {world_size} rank(s)); set only one")
        accumulation = derived
    return BatchPlan(engine.micro_batch_size, accumulation, world_size)


def init_distributed() -> int:
    """Joins the launcher's process group (or makes a one-rank one); returns the world size."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m stages.x`: a world of one
            port = free_port()
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        # DeepSpeed prints "... shm_comm_op built successfully" from every rank: kept for --debug only.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        for line in printed.getvalue().splitlines():
            logger.debug(line)
        release_shared_memory_names()
    return dist.get_world_size()


def release_shared_memory_names() -> None:
    """Unlinks this rank's DeepSpeed CPU all-reduce buffer (66 MiB in /dev/shm, that is RAM).

    DeepSpeed never unlinks it, so every CPU run used to leave one per rank behind until the machine
    ran out of memory. Once `init_distributed` returns, each rank has mapped every peer's buffer; after
    a barrier the names can go, and the memory is freed when the last rank exits, even on SIGKILL.
    """
    if torch.cuda.is_available() or "MASTER_PORT" not in os.environ:
        return
    dist.barrier()
    for name in shared_memory_names(os.environ["MASTER_PORT"], dist.get_rank()):
        os.unlink(name)
    dist.barrier()  # every rank's name is gone once init returns


def _precision_section(precision: str) -> dict:
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}
    return {}


def check_device(config: RunConfig) -> None:
    """Refuses what this machine cannot run, before any model is built.

    Raises:
        EngineConfigError: fp16 without CUDA.
    """
    if config.engine.precision == "fp16" and not torch.cuda.is_available():
        raise EngineConfigError("`engine.precision` is fp16, which DeepSpeed does not support on CPU; use fp32 or bf16")


def build_ds_config(config: RunConfig, plan: BatchPlan) -> dict:
    """The DeepSpeed config for a training engine; every setting that matters is explicit."""
    engine, optim = config.engine, config.optim
    zero = {"stage": engine.zero_stage}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if engine.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    zero.update(reduce_bucket_size=REDUCE_BUCKET_ELEMENTS, allgather_bucket_size=ALLGATHER_BUCKET_ELEMENTS)
    if engine.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, sub_group_size=SUB_GROUP_ELEMENTS,
                    **zero3_settings())
    ds_config = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": optim.gradient_clipping,  # DeepSpeed 0.19 would otherwise clip at 1.0
        "zero_optimization": zero,
        # Our optimizers are client optimizers: ZeRO must be told to accept them, and with
        # offload must not swap in its own CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    ds_config.update(_precision_section(engine.precision))
    return ds_config


def lr_multiplier(step: int, config: RunConfig, total_steps: int) -> float:
    """Learning-rate factor after `step` optimizer steps: linear warm-up, then the decay."""
    optim = config.optim
    if step < optim.warmup_steps:
        return (step + 1) / (optim.warmup_steps + 1)
    if optim.scheduler == "constant":
        return 1.0
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.scheduler == "cosine" else 1 - progress
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape


def build_scheduler(optimizer, config: RunConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config, total_steps))


@dataclasses.dataclass
class TrainingEngine:
    engine: object                  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer  # ours, as built (DeepSpeed may wrap it)
    scheduler: object
    plan: BatchPlan
    ds_config: dict


def create_engine(config: RunConfig, model: torch.nn.Module, total_steps: int) -> TrainingEngine:
    """Builds optimizer, schedule and DeepSpeed config and calls `deepspeed.initialize`.

    Raises:
        EngineConfigError: a batch or device combination that cannot run (see batch_plan, check_device).
    """
    check_device(config)
    world_size = init_distributed()
    plan = batch_plan(config, world_size)
    ds_config = build_ds_config(config, plan)
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if p.requires_grad)
    ds_config["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_elements(trainable)
    optimizer = build_optimizer(config.optim, model)
    scheduler = build_scheduler(optimizer, config, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    if world_size == 1 and config.engine.zero_stage == 0:
        # A world of one has nothing to average, yet DeepSpeed would flatten every gradient into one
        # buffer, "all-reduce" it and copy it back after each backward: ~10% of a small model's step.
        engine.enable_backward_allreduce = False
    return TrainingEngine(engine, optimizer, scheduler, plan, ds_config)


def frozen_ds_config(config: RunConfig, zero_stage: Optional[int] = None, offload: bool = False) -> dict:
    """The DeepSpeed config of a forward-only engine; `zero_stage` defaults to `engine.zero_stage`.

    Raises:
        EngineConfigError: offload without ZeRO-3.
    """
    stage = config.engine.zero_stage if zero_stage is None else zero_stage
    if offload and stage != 3:
        raise EngineConfigError(f"offloading a frozen model needs ZeRO-3, got zero stage {stage}")
    world_size = init_distributed()
    zero = {"stage": stage if stage == 3 else 0}  # without an optimizer only ZeRO-3 shards anything
    if stage == 3:
        zero.update(zero3_settings())
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds_config = {"train_micro_batch_size_per_gpu": config.engine.micro_batch_size,
                 "train_batch_size": config.engine.micro_batch_size * world_size,
                 "gradient_accumulation_steps": 1,
                 "gradient_clipping": 0.0, "zero_optimization": zero, "steps_per_print": 10**9}
    ds_config.update(_precision_section(config.engine.precision))
    return ds_config


def training_ds_config(config: RunConfig) -> dict:
    """The DeepSpeed config `create_engine` will use, for creating the model sharded beforehand."""
    return build_ds_config(config, batch_plan(config, init_distributed()))


@contextlib.contextmanager
def sharded_creation(ds_config: dict):
    """Models built inside (transformers' from_pretrained / from_config) are partitioned as they are
    created when `ds_config` is ZeRO-3: each parameter is split over the ranks the moment its layer
    exists, and only rank 0 reads the checkpoint (memory-mapped) one layer at a time. No rank ever
    holds the whole model. Outside ZeRO-3 this does nothing.

    transformers finds the config through a weak reference, so the object is kept alive here for
    the duration and unregistered afterwards (later loads, e.g. a ZeRO-0 frozen model, stay whole).
    """
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def create_frozen_engine(config: RunConfig, model: torch.nn.Module, *, zero_stage: Optional[int] = None,
                         offload: bool = False):
    """A forward-only engine (reference policy, reward model): no optimizer, no gradients.

    `zero_stage=3` shards the weights over the ranks (build the model inside
    `sharded_creation(frozen_ds_config(...))` so it is never whole); `offload` keeps them in CPU memory.

    Raises:
        EngineConfigError: offload without ZeRO-3.
    """
    ds_config = frozen_ds_config(config, zero_stage, offload)
    check_device(config)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine
