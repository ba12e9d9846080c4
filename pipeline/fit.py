"""What `python -m pipeline.plan --fit` searches and how it ranks: the settings that move memory and a
cost model of step time.

    python -m pipeline.plan --config FILE --fit --world-size N --gpu-memory GIB [--headroom 0.1]
        [--write FILE] [--json] [key.sub=value ...]

The search (`pipeline.plan.search`) tries every combination of the settings in `SEARCH` (each entry
gives the overrides it tries for a config: adding a setting is one line there) on top of the config and
its command-line overrides. The config layer validates each combination as it would a run (what it
refuses, such as offload at ZeRO-0, is skipped; `combinations`), the plan plans it at N ranks, and a
combination fits when its planned peak per rank is at most (1 - headroom) x GIB (the headroom is for
what the plan does not hold: a GPU's caching allocator, CUDA context, fragmentation). Of those that
fit, the one the cost model below finds fastest wins (`Fit.chosen`); among equally fast ones, the one
that changes the fewest settings, then the one with the lowest peak. Nothing here imports the plan.

The cost model is a model, not a measurement: seconds per optimizer step on a nominal 80 GB GPU
(bf16, the constants below), counting only what the searched settings change, per rank:
  compute          6 x parameters x tokens per micro-batch of each trained model (actor, critic),
                   x 4/3 with gradient checkpointing (the forward runs twice), each micro-batch also
                   paying a fixed `MICRO_BATCH_OVERHEAD_TOKENS` worth (kernel launches, ZeRO hooks,
                   Python: smaller micro-batches run less efficiently)
  activation       the checkpointed layer inputs to the host and back, over `HOST_LINK`
  offload
  chunked logits   with `model.logits_chunk`, the LM head run again for each chunk in the backward
                   (2 x its parameters x scored tokens)
  ZeRO traffic     over `INTERCONNECT`, (N - 1) / N of each collective: ZeRO-0 all-reduces the gradients
                   once a step (twice their bytes), ZeRO-1 reduces them and all-gathers the updated
                   weights once a step, ZeRO-2 reduces per micro-batch, ZeRO-3 all-gathers the weights
                   in every micro-batch's forward and backward and reduces the gradients
  optimizer        the fp32 gradient partition to the host per micro-batch and the updated 16-bit one
  offload          back, over `HOST_LINK`, and the step on the host at `HOST_STEP_ELEMENTS_PER_S`
                   (on the device the step is memory-bound and short)
  frozen models    their forward (2 x parameters x tokens), per rollout (sampling stages) or per
                   micro-batch (DPO), plus at ZeRO-3 its all-gather and, offloaded, the weights over
                   `HOST_LINK`
  generation       sampling stages: a decode step per new token, each reading the actor's weights
                   (memory-bound), per rollout; at ZeRO-3 the actor gathered for it
  rollouts         a rollout per micro-batch, shared by `updates_per_rollout` optimizer steps
Compute overlapping communication, the attention's share, kernels' speed at each shape and the data
loader are left out. The absolute seconds mean little; the ranking is what the search uses.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Optional

from .engine import batch_plan
from .models import count_parameters
from .stages import STAGES

# The nominal GPU and node of the cost model (an H100-class 80 GB card in a node with NVLink).
DEVICE_FLOPS = 400e12                 # bf16 FLOP/s a training step sustains (~40% of the peak)
DEVICE_MEMORY_BYTES_PER_S = 2.0e12    # HBM read rate a decode step sustains
HOST_LINK_BYTES_PER_S = 25e9          # host <-> device copies per GPU (PCIe x16, as shared in practice)
INTERCONNECT_BYTES_PER_S = 150e9      # all-gather / reduce-scatter bus bandwidth per GPU (NVLink)
HOST_STEP_ELEMENTS_PER_S = 5e8        # a PyTorch optimizer stepping fp32 tensors in host memory, per rank
MICRO_BATCH_OVERHEAD_TOKENS = 512     # fixed cost of a micro-batch, in tokens of compute


# ---- the settings searched ------------------------------------------------------------------------

def values(key: str, *choices):
    """A setting that takes each of `choices`, whatever the config."""
    return lambda config, stage, world_size: [{key: choice} for choice in choices]


def micro_batches(config, stage: str, world_size: int) -> list:
    """Micro-batch and accumulation at the config's global batch: every divisor of a rank's samples
    per optimizer step.

    Raises:
        EngineConfigError: `engine.global_batch_size` does not divide over `world_size` ranks.
    """
    if config.engine.global_batch_size is not None:  # a rank's share of it, whatever the config's micro-batch
        config = with_setting(with_setting(config, "engine.micro_batch_size", 1), "engine.gradient_accumulation_steps", 1)
    per_rank = batch_plan(config, world_size)
    samples = per_rank.micro_batch_size * per_rank.gradient_accumulation_steps
    return [{"engine.micro_batch_size": size, "engine.gradient_accumulation_steps": samples // size}
            for size in range(1, samples + 1) if samples % size == 0]


def frozen_model(prefix: str, needs: str):
    """A frozen model's placement, where the stage has it (`needs`: a StageSpec flag): whole on each rank,
    sharded by ZeRO-3, or sharded with its shards in host memory."""
    def choices(config, stage: str, world_size: int) -> list:
        spec = STAGES[stage]
        if not getattr(spec, needs):
            return [{}]
        key = f"{spec.section}.{prefix}"
        return [{f"{key}_zero_stage": 0, f"{key}_offload": False}, {f"{key}_zero_stage": 3, f"{key}_offload": False},
                {f"{key}_zero_stage": 3, f"{key}_offload": True}]
    return choices


# Each setting: the overrides it tries, from (config, stage, world size); a new one is one more line.
SEARCH = {
    "ZeRO stage": values("engine.zero_stage", 0, 1, 2, 3),
    "optimizer offload": values("engine.offload_optimizer", False, True),
    "micro-batch": micro_batches,
    "gradient checkpointing": values("model.gradient_checkpointing", False, True),
    "activation offload": values("model.offload_activations", False, True),
    "logits chunk": values("model.logits_chunk", 0, 1024, 4096),
    "reference": frozen_model("ref", "reference"),
    "reward model": frozen_model("reward", "samples"),
}


# ---- the cost model -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the cost model reads of the models: elements of the actor (and of those trained), of the
    critic, of each frozen model by name, the bytes per token of every layer's input (what activation
    offload copies: pipeline.plan.offloaded_activation_bytes) and the LM head's elements."""
    parameters: int
    trainable: int
    critic: int
    frozen: dict
    layer_inputs_per_token: int
    head: int


def sizes_of(model, critic, numels: dict, layer_inputs_per_token: int, head: int) -> Sizes:
    """`numels`: the frozen models' `ModelSize`s by name (None: the trained model's)."""
    total, trainable = count_parameters(model)
    frozen = {name: (size.parameters if size is not None else total) for name, size in numels.items()}
    return Sizes(total, trainable, count_parameters(critic)[0] if critic is not None else 0, frozen,
                 layer_inputs_per_token, head)


def step_seconds(config, stage: str, world_size: int, sizes: Sizes, workload) -> dict:
    """Seconds per optimizer step on one rank by the cost model (the module's docstring), per component
    and in all (`total`); `workload` is the plan's (pipeline.plan.workload_of) for `config`."""
    spec, engine = STAGES[stage], config.engine
    a = 2 if engine.precision in ("bf16", "fp16") else 4
    plan = batch_plan(config, world_size)
    micro = plan.gradient_accumulation_steps
    tokens = workload.rows * workload.seq_len
    share = (world_size - 1) / world_size
    section = getattr(config, spec.section) if spec.section else None
    rollouts = micro / getattr(section, "updates_per_rollout", 1) if spec.samples else 0
    trained = [(sizes.parameters, sizes.trainable)] + ([(sizes.critic, sizes.critic)] if spec.critic else [])
    cost = dict.fromkeys(("compute", "activation_offload", "logits_recompute", "zero_traffic", "optimizer_offload",
                          "frozen_models", "generation"), 0.0)
    if workload.logits_chunk:
        scored = workload.rows * workload.logit_positions
        cost["logits_recompute"] = micro * 2 * sizes.head * scored / DEVICE_FLOPS
    for parameters, trainable in trained:
        recompute = 4 / 3 if workload.gradient_checkpointing else 1
        cost["compute"] += micro * 6 * parameters * (tokens + MICRO_BATCH_OVERHEAD_TOKENS) * recompute / DEVICE_FLOPS
        if workload.offload_activations:
            cost["activation_offload"] += micro * 2 * sizes.layer_inputs_per_token * tokens / HOST_LINK_BYTES_PER_S
        gradients, weights = a * trainable, a * parameters
        traffic = {0: 2 * gradients, 1: 2 * gradients, 2: (micro + 1) * gradients,
                   3: micro * (2 * weights + gradients)}[engine.zero_stage]
        cost["zero_traffic"] += share * traffic / INTERCONNECT_BYTES_PER_S
        partition = trainable / world_size
        if engine.offload_optimizer:
            cost["optimizer_offload"] += ((micro * 4 + a) * partition / HOST_LINK_BYTES_PER_S
                                          + partition / HOST_STEP_ELEMENTS_PER_S)
    forwards = rollouts if spec.samples else (micro if spec.reference else 0)
    for name, _, zero3, offload in workload.frozen:
        parameters = sizes.frozen[name]
        fetch = (share * a * parameters / INTERCONNECT_BYTES_PER_S if zero3 else 0) + \
            (a * parameters / world_size / HOST_LINK_BYTES_PER_S if offload else 0)
        cost["frozen_models"] += forwards * (2 * parameters * (tokens + MICRO_BATCH_OVERHEAD_TOKENS) / DEVICE_FLOPS
                                             + fetch)
    if spec.samples:
        decode = workload.new_tokens * a * sizes.parameters / DEVICE_MEMORY_BYTES_PER_S
        gather = share * a * sizes.parameters / INTERCONNECT_BYTES_PER_S if engine.zero_stage == 3 else 0
        cost["generation"] = rollouts * (decode + gather)
    cost["total"] = sum(cost.values())
    return cost


# ---- the search -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Tried:
    settings: dict           # the searched settings' values
    changes: dict            # those that differ from the config's own
    row: dict                # the plan's row (on the GPU: a vLLM engine's share of it counted)
    cost: dict               # step_seconds
    fits: bool

    def summary(self) -> dict:
        return {"settings": self.settings, "changes": self.changes, "peak_bytes": self.row["total_bytes"],
                "step_seconds": self.cost["total"], "fits": self.fits}


@dataclasses.dataclass
class Fit:
    """A search's outcome: every combination planned, how many the config layer refused, the budget."""
    path: str
    stage: str
    config: object           # the config as given (with the command line's overrides)
    world_size: int
    gpu_memory_gib: float
    headroom: float
    tried: list
    refused: int

    @property
    def chosen(self) -> Optional[Tried]:
        """The cheapest by the cost model of those that fit; ties: fewest changes, then the lowest peak."""
        fitting = [candidate for candidate in self.tried if candidate.fits]
        return min(fitting, key=lambda c: (round(c.cost["total"], 9), len(c.changes), c.row["total_bytes"]),
                   default=None)

    @property
    def given(self) -> Optional[Tried]:
        return next((candidate for candidate in self.tried if not candidate.changes), None)

    @property
    def smallest(self) -> Tried:
        return min(self.tried, key=lambda candidate: candidate.row["total_bytes"])

    @property
    def budget(self) -> str:
        usable = (1 - self.headroom) * self.gpu_memory_gib
        return (f"{self.gpu_memory_gib:g} GiB per rank less {self.headroom:.0%} headroom ({usable:.1f} GiB) on "
                f"{self.world_size} rank(s)")

    def as_json(self) -> dict:
        chosen = self.chosen
        return {"config": self.path, "stage": self.stage, "world_size": self.world_size,
                "gpu_memory_gib": self.gpu_memory_gib, "headroom": self.headroom, "refused": self.refused,
                "chosen": None if chosen is None else {**chosen.summary(), "cost": chosen.cost, "row": chosen.row},
                "tried": [candidate.summary() for candidate in self.tried]}


def setting_value(config, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def with_setting(config, key: str, value):
    """`config` with the dotted `key` set to `value` (typed as the field is: the search's values are)."""
    head, _, rest = key.partition(".")
    return dataclasses.replace(config, **{head: with_setting(getattr(config, head), rest, value) if rest else value})


def combinations(config, stage: str, world_size: int) -> tuple:
    """([(the searched settings' values, `config` with them)] for every combination the config layer
    accepts, how many it refused): each checked by the config's own `problems()`, as `load_config` checks
    a run's."""
    accepted, refused = [], 0
    for choices in itertools.product(*(setting(config, stage, world_size) for setting in SEARCH.values())):
        settings = {key: value for choice in choices for key, value in choice.items()}
        candidate = config
        for key, value in settings.items():
            candidate = with_setting(candidate, key, value)
        if candidate.problems():
            refused += 1
        else:
            accepted.append((settings, candidate))
    return accepted, refused


def override_text(values: dict) -> str:
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())
