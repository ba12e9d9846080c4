"""The fastest configuration that fits a memory budget, by the plan and a cost model.

    python -m pipeline.plan --config FILE --fit --world-size N --gpu-memory GIB [--headroom 0.1]
        [--write FILE] [--json] [key.sub=value ...]

The search tries every combination of the settings in `SEARCH` (each entry gives the overrides it tries
for a config: adding a setting is one line there) on top of the config and its command-line overrides.
The config layer validates each combination as it would a run (what it refuses, such as offload at
ZeRO-0, is skipped), pipeline.plan plans it at N ranks, and a combination fits when its planned peak
per rank is at most (1 - headroom) x GIB (the headroom is for what the plan does not hold: a GPU's
caching allocator, CUDA context, fragmentation). Of those that fit, the one the cost model below
finds fastest wins; among equally fast ones, the one that changes the fewest settings, then the one
with the lowest peak.

The cost model is a model, not a measurement: seconds per optimizer step on a nominal 80 GB GPU
(bf16, the constants below), counting only what the searched settings change, per rank:
  compute          6 x parameters x tokens per micro-batch of each trained model (actor, critic),
                   x 4/3 with gradient checkpointing (the forward runs twice), each micro-batch also
                   paying a fixed `MICRO_BATCH_OVERHEAD_TOKENS` worth (kernel launches, ZeRO hooks,
                   Python: smaller micro-batches run less efficiently)
  activation       the checkpointed layer inputs to the host and back, over `HOST_LINK`
  offload
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
import sys
from pathlib import Path
from typing import Optional

import yaml

from .config import load_config, to_dict
from .engine import batch_plan
from .models import count_parameters
from .plan import (GIB, Geometry, build_meta_critic, build_meta_model, config_class, format_table, frozen_numels,
                   model_state_rows, offloaded_activation_bytes, on_gpu, planned_row, state_key, workload_of,
                   _stage_in_file)
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
    per optimizer step."""
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


# Each setting: the overrides it tries, from (config, stage, world size). The logits chunk size, once the
# plan counts it, is one more line: "logits chunk": values("model.logits_chunk", 0, 1024, 4096).
SEARCH = {
    "ZeRO stage": values("engine.zero_stage", 0, 1, 2, 3),
    "optimizer offload": values("engine.offload_optimizer", False, True),
    "micro-batch": micro_batches,
    "gradient checkpointing": values("model.gradient_checkpointing", False, True),
    "activation offload": values("model.offload_activations", False, True),
    "reference": frozen_model("ref", "reference"),
    "reward model": frozen_model("reward", "samples"),
}


# ---- the cost model -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the cost model reads of the models: elements of the actor (and of those trained), of the
    critic, of each frozen model, and the actor's geometry."""
    parameters: int
    trainable: int
    critic: int
    frozen: dict
    geometry: Geometry


def sizes_of(model, critic, numels: dict) -> Sizes:
    total, trainable = count_parameters(model)
    frozen = {name: (size.parameters if size is not None else total) for name, size in numels.items()}
    return Sizes(total, trainable, count_parameters(critic)[0] if critic is not None else 0, frozen,
                 Geometry.of(model.config))


def step_seconds(config, stage: str, world_size: int, sizes: Sizes) -> dict:
    """Seconds per optimizer step on one rank by the cost model (the module's docstring), per component
    and in all (`total`)."""
    spec, engine = STAGES[stage], config.engine
    a = 2 if engine.precision in ("bf16", "fp16") else 4
    plan = batch_plan(config, world_size)
    micro = plan.gradient_accumulation_steps
    workload = workload_of(config, stage)
    tokens = workload.rows * workload.seq_len
    share = (world_size - 1) / world_size
    section = getattr(config, spec.section) if spec.section else None
    rollouts = micro / getattr(section, "updates_per_rollout", 1) if spec.samples else 0
    trained = [(sizes.parameters, sizes.trainable)] + ([(sizes.critic, sizes.critic)] if spec.critic else [])
    cost = dict.fromkeys(("compute", "activation_offload", "zero_traffic", "optimizer_offload", "frozen_models",
                          "generation"), 0.0)
    for parameters, trainable in trained:
        recompute = 4 / 3 if workload.gradient_checkpointing else 1
        cost["compute"] += micro * 6 * parameters * (tokens + MICRO_BATCH_OVERHEAD_TOKENS) * recompute / DEVICE_FLOPS
        if workload.offload_activations:
            moved = offloaded_activation_bytes(sizes.geometry, workload.rows, workload.seq_len, a)
            cost["activation_offload"] += micro * 2 * moved / HOST_LINK_BYTES_PER_S
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


def search(path: str, world_size: int, gpu_memory_gib: float, headroom: float, overrides=()) -> Fit:
    """Every combination of the settings in `SEARCH` on the config at `path` (with `overrides`), planned at
    `world_size` ranks. The models are built once: no searched setting changes them.

    Raises:
        ConfigError, ModelLoadError: the config (with `overrides`) does not load.
        EngineConfigError: its global batch does not divide over `world_size` ranks.
    """
    stage = _stage_in_file(path)
    config = load_config(config_class(stage), path, list(overrides))
    model, critic = build_meta_model(config, stage), build_meta_critic(config) if STAGES[stage].critic else None
    numels = frozen_numels(config, stage)
    sizes = sizes_of(model, critic, numels)
    precision = config.engine.precision
    states = {state_key(row): row for row in model_state_rows(model, [world_size], precision)}
    critic_states = {} if critic is None else {state_key(row): row
                                               for row in model_state_rows(critic, [world_size], precision)}
    usable = (1 - headroom) * gpu_memory_gib * GIB
    choices = [setting(config, stage, world_size) for setting in SEARCH.values()]
    tried, refused = [], 0
    for combination in itertools.product(*choices):
        settings = {key: value for choice in combination for key, value in choice.items()}
        candidate = config
        for key, value in settings.items():
            candidate = with_setting(candidate, key, value)
        if candidate.problems():  # the config layer's own checks, as `load_config` runs them
            refused += 1
            continue
        key = (candidate.optim.name, candidate.engine.zero_stage, world_size)
        row = on_gpu(planned_row(states[key], model, workload_of(candidate, stage, numels), precision, critic,
                                 critic_states.get(key)), gpu_memory_gib)
        changes = {key: value for key, value in settings.items() if setting_value(config, key) != value}
        tried.append(Tried(settings, changes, row, step_seconds(candidate, stage, world_size, sizes),
                           row["total_bytes"] <= usable))
    return Fit(path, stage, config, world_size, gpu_memory_gib, headroom, tried, refused)


def override_text(values: dict) -> str:
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def fit_main(args) -> int:
    """`plan --fit`: prints the fastest fitting combination, its overrides and plan (with --json, the
    search as JSON), writes it as a config file with --write; 1 when nothing fits.

    Raises:
        ConfigError, ModelLoadError, EngineConfigError: as `search`.
    """
    fit = search(args.config, args.world_size, args.gpu_memory, args.headroom, args.overrides)
    chosen = fit.chosen
    if args.json:
        print(json.dumps(fit.as_json(), indent=1))
    if chosen is None:
        smallest = fit.smallest
        print(f"error: {args.config}: no combination of the searched settings fits {fit.budget}; the smallest peak "
              f"found is {smallest.row['total_bytes'] / GIB:.1f} GiB ({override_text(smallest.changes)})",
              file=sys.stderr)
        return 1
    if args.write:
        write_config(fit, args.overrides, args.write)
    if not args.json:
        print(fit_report(fit))
    return 0


def fit_report(fit: Fit) -> str:
    chosen, given = fit.chosen, fit.given
    as_given = ("the config as given is not among them" if given is None else
                f"the config as given: {given.cost['total']:.2f} s, peak {given.row['total_bytes'] / GIB:.1f} GiB"
                f"{'' if given.fits else ', does not fit'}")
    parts = ", ".join(f"{name.replace('_', ' ')} {seconds:.2f}" for name, seconds in chosen.cost.items()
                      if name != "total" and seconds)
    return "\n".join([
        f"{fit.path}: {len(fit.tried)} combinations planned ({fit.refused} more refused by the config's checks), "
        f"{sum(c.fits for c in fit.tried)} fit {fit.budget}",
        f"fastest that fits: {chosen.cost['total']:.2f} s per optimizer step by the cost model ({parts}; "
        f"a model, not a measurement), peak {chosen.row['total_bytes'] / GIB:.1f} GiB; {as_given}",
        f"overrides: {override_text(chosen.changes) or '(none: the config as given)'}",
        format_table([chosen.row])])


def write_config(fit: Fit, overrides, path: str) -> None:
    """The chosen configuration, resolved, as a config file a run reads."""
    chosen = fit.chosen
    fitted = load_config(type(fit.config), fit.path, [*overrides, *override_text(chosen.settings).split()])
    header = (f"# {fit.path} fitted to {fit.budget} by `python -m pipeline.plan --fit`: peak "
              f"{chosen.row['total_bytes'] / GIB:.1f} GiB, {chosen.cost['total']:.2f} s per step by its cost model\n")
    Path(path).write_text(header + yaml.safe_dump(to_dict(fitted), sort_keys=False), encoding="utf-8")


def fit_markdown(fits: list) -> str:
    """A markdown table of searches (`Fit`s), one row each (docs/memory_fit.md)."""
    lines = ["| config | ranks | as given: peak GiB, s per step | chosen: changes | peak GiB | s per step |",
             "|---|---|---|---|---|---|"]
    for fit in fits:
        given, chosen = fit.given, fit.chosen
        cells = [Path(fit.path).stem, str(fit.world_size),
                 f"{given.row['total_bytes'] / GIB:.1f}{'' if given.fits else ' (no)'}, {given.cost['total']:.1f}"]
        if chosen is None:
            cells += [f"nothing fits; smallest {fit.smallest.row['total_bytes'] / GIB:.1f} GiB", "-", "-"]
        else:
            cells += [" ".join(f"`{part}`" for part in override_text(chosen.changes).split()) or "none",
                      f"{chosen.row['total_bytes'] / GIB:.1f}", f"{chosen.cost['total']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
