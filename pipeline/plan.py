"""Per-rank memory plans: everything a rank holds at its peak, for ZeRO 0-3, Adam-mini next to AdamW.

    python -m pipeline.plan --config FILE [--world-sizes 1,2,8] [--gpu-memory 80] [--json] [--cpu] [key.sub=value ...]
    python -m pipeline.plan --markdown configs/llama2-7b --world-sizes 2,8 --gpu-memory 80   # the README's table
    python -m pipeline.plan --config FILE --fit --world-size N --gpu-memory GIB   # pipeline.fit: the fastest that fits

The model is built on the meta device from its config.json (no weights are read); the stage (SFT,
reward, DPO, ReMax) is read from the config, and the reward stage is planned as a reward model.

Model states follow DeepSpeed's layout (its `estimate_zero{2,3}_model_states_mem_needs`): with
bf16/fp16, 16-bit weights and gradients plus fp32 gradients and an fp32 master copy; ZeRO-1 shards
the optimizer side, ZeRO-2 the gradients too, ZeRO-3 the weights too. The optimizer's own state
comes from the optimizer's accounting (Adam-mini's `planned_state_bytes`, AdamW's two fp32 values
per element). With a workload, what the engine really holds replaces the estimate where they differ
(ZeRO-2 keeps no gradients between steps; ZeRO-3 keeps a 16-bit gradient partition and no gathered
layer), and on top, per rank:
  activations     what autograd keeps for the backward (Llama-style layer, SDPA: no T x T matrix),
                  every layer, or with gradient checkpointing each layer's input plus one layer rebuilt
  logits          with `model.logits_chunk` (pipeline.chunked_logits) one chunk's logits and their fp32
                  upcast, turned into the gradient in place, and the entropy's fp32 buffer where the
                  stage logs it; with 0 the B x T x vocab logits, their fp32 upcast and log-softmax
  DeepSpeed       the gradient reduce bucket, and its gradients flattened when it is reduced; ZeRO-3
                  (pipeline.engine states the settings): the parameters of at most
                  `stage3_param_persistence_threshold` elements kept whole on every rank, the weights it
                  keeps gathered from a module's forward to its backward (every module used again within
                  `stage3_max_reuse_distance` elements: all of a small model) and a prefetch bucket, its
                  reduce bucket held from the first backward on; on CPU ranks gloo's copy of each
                  all-gather and reduce-scatter (`--cpu`)
  optimizer step  the step's temporaries (ZeRO's flattened gradient partition)
  frozen models   reference policy and reward model weights (where the run has a reward model)
  critic          PPO: a second trained model (weights, gradients, optimizer state); its forward,
                  backward and step run while the actor's activations are alive
  generation      ReMax: KV cache and, at ZeRO-3, the actor gathered whole for `generate`
The peak is what persists between steps (weights, the gradients DeepSpeed keeps, optimizer state,
its buffers, frozen models) plus the largest of the phases (forward/backward, generation, scoring,
gradient reduction, optimizer step); "fits" is decided on it. Held to measured peaks on 2 CPU ranks
by benchmarks/memory_vs_plan.py and, at a smaller size, tests/benchmarks/test_memory_vs_plan.py.
A packed run (`data.packing`) is planned as one sequence of its token budget, micro-batch x
`data.packing_tokens`, whatever rows fill it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
import weakref
from pathlib import Path
from typing import Optional

import torch
import yaml

from .config import ConfigError, RunConfig, load_config, to_dict
from .engine import (MAX_LIVE_PARAMETERS, MAX_REUSE_DISTANCE, PARAM_PERSISTENCE_THRESHOLD, PREFETCH_BUCKET_ELEMENTS,
                     SUB_GROUP_ELEMENTS, EngineConfigError, reduce_bucket_elements)
from .fit import Fit, Tried, combinations, override_text, setting_value, sizes_of, step_seconds
from .models import ModelLoadError, RewardModel, apply_lora, count_parameters, load_causal_lm
from .optim import OPTIMIZERS, planned_state_bytes
from .stages import STAGES, stage_named

GIB = 2**30


def per_model(function):
    """Memoizes `function(model, *args)` per model (held weakly) and arguments: a plan reads the same
    model's parameters many times (pipeline.fit plans hundreds of workloads on one), and the models it
    plans are built for it on the meta device and not changed after."""
    cache = weakref.WeakKeyDictionary()

    @functools.wraps(function)
    def memoized(model, *args, **kwargs):
        results = cache.setdefault(model, {})
        key = (args, tuple(sorted(kwargs.items())))
        if key not in results:
            results[key] = function(model, *args, **kwargs)
        return results[key]
    return memoized


def build_meta_model(config: RunConfig, stage: str = "sft"):
    """The run's trained model (LoRA applied) on the meta device: only config.json is read. The reward
    stage trains a reward model (backbone + v_head, no LM head)."""
    if STAGES[stage].trains_reward_model:
        model = RewardModel.from_causal_lm(config.model, device="meta")
    else:
        model = load_causal_lm(config.model, device="meta")
    if config.model.lora.enabled:
        with torch.device("meta"):  # the adapters too: initialising them on the CPU takes seconds at 7B
            model = apply_lora(model, config.model.lora)
    return model


def build_meta_critic(config):
    """PPO's critic on the meta device: the reward model it starts from (`ppo.critic_init: reward`) or
    the policy's backbone with a new v_head; None for other stages."""
    ppo = getattr(config, "ppo", None)
    if ppo is None:
        return None
    return meta_reward_model(config, ppo.reward_model_path if ppo.critic_init == "reward" else None)


def meta_reward_model(config, path: Optional[str]):
    """A reward model on the meta device: the one at `path`, from its config.json where it exists, else
    one on the run's base model (LoRA off), whose architecture is then assumed."""
    if path and (Path(path) / "config.json").is_file():
        return RewardModel.from_pretrained(path, device="meta")
    return RewardModel.from_causal_lm(base_model_config(config), device="meta")


def base_model_config(config):
    """The run's model config without LoRA: what a frozen copy or a critic of the base model is."""
    return dataclasses.replace(config.model, lora=dataclasses.replace(config.model.lora, enabled=False))


def largest_layer_numel(model) -> int:
    return max(module_numel for module_numel in
               (sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()))


# ---- what ZeRO-3 holds whole --------------------------------------------------------------------

@per_model
def persistent_numel(model, threshold: int = PARAM_PERSISTENCE_THRESHOLD) -> int:
    """Elements of the parameters ZeRO-3 never partitions (`stage3_param_persistence_threshold`: at most
    `threshold` elements each). Every rank holds them whole, next to its own shard of them."""
    return sum(p.numel() for p in model.parameters() if p.numel() <= threshold)


@per_model
def parameter_modules(model, threshold: int = PARAM_PERSISTENCE_THRESHOLD) -> list:
    """(name, elements, partitioned elements) of each module that holds parameters itself, in registration
    order: the forward order ZeRO-3 traces, for decoder stacks."""
    modules = []
    for name, module in model.named_modules():
        sizes = [p.numel() for p in module.parameters(recurse=False)]
        if sizes:
            modules.append((name, sum(sizes), sum(size for size in sizes if size > threshold)))
    return modules


@per_model
def zero3_gathered_numel(model, checkpointing: bool, reuse_distance: int = MAX_REUSE_DISTANCE,
                         prefetch: int = min(PREFETCH_BUCKET_ELEMENTS, MAX_LIVE_PARAMETERS),
                         threshold: int = PARAM_PERSISTENCE_THRESHOLD) -> int:
    """Partitioned elements a ZeRO-3 training engine holds gathered when its backward starts, from its
    second step on (the first records the module trace). After a module's forward DeepSpeed frees its
    weights unless the module runs again before `reuse_distance` elements of other modules' weights
    have run (`__params_to_release`): between a module's forward and its backward run the rest of the
    forward and the backward down to it (with gradient checkpointing a decoder layer's backward first
    reruns its forward), so a small model stays gathered whole. Plus one prefetch bucket. Modules run
    in the order they are registered in, here: within a layer, DeepSpeed may keep a module more or less
    (Llama registers its norms last)."""
    modules = parameter_modules(model, threshold)
    layer = [re.search(r"\.(\d+)\.", f".{name}.") for name, _, _ in modules]
    layer = [match.group(1) if match else None for match in layer]
    forward = list(range(len(modules)))
    backward, index = [], len(modules) - 1
    while index >= 0:
        if checkpointing and layer[index] is not None:
            # The backward reaches the layer's last module, whose saved inputs make the layer rerun.
            block = [i for i in forward if layer[i] == layer[index]]
            backward += block[-1:] + block + block[-2::-1]
            index = block[0] - 1
        else:
            backward.append(index)
            index -= 1
    trace = forward + backward
    gathered = 0
    for position in forward:
        traversed = 0
        for later in trace[position + 1:]:
            if traversed >= reuse_distance:
                break
            if later == position:
                gathered += modules[position][2]
                break
            traversed += modules[later][1]
    partitioned = sum(module[2] for module in modules)
    return min(partitioned, gathered + prefetch)


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """What the plan needs of a frozen model: its elements, those ZeRO-3 keeps whole, and those a ZeRO-3
    forward holds gathered at once (one module's and a prefetch bucket: without a backward nothing is
    used again, so each module's weights go after its forward), which is also the most one all-gather
    fetches."""
    parameters: int
    persistent: int
    forward_gathered: int

    @classmethod
    def of(cls, model) -> "ModelSize":
        modules = parameter_modules(model)
        partitioned = sum(module[2] for module in modules)
        largest = max(module[2] for module in modules)
        prefetch = min(PREFETCH_BUCKET_ELEMENTS, MAX_LIVE_PARAMETERS)
        return cls(count_parameters(model)[0], persistent_numel(model), min(partitioned, largest + prefetch))


# ---- geometry and workload ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Geometry:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, hf_config) -> "Geometry":
        if hasattr(hf_config, "get_text_config"):
            hf_config = hf_config.get_text_config()
        get = lambda *names, default=None: next(  # noqa: E731
            (getattr(hf_config, n) for n in names if getattr(hf_config, n, None) is not None), default)
        hidden = get("hidden_size", "n_embd", "d_model")
        heads = get("num_attention_heads", "n_head")
        return cls(layers=get("num_hidden_layers", "n_layer"), hidden=hidden,
                   intermediate=get("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden), heads=heads,
                   kv_heads=get("num_key_value_heads", default=heads),
                   head_dim=get("head_dim", default=hidden // heads), vocab=get("vocab_size"))


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one rank runs per micro-batch."""
    stage: str
    rows: int                      # sequences per forward (reward, DPO: chosen and rejected stacked; packed: 1)
    seq_len: int                   # tokens per sequence (the planned worst case: data.max_length; packed: the
                                   # micro-batch's token budget, micro-batch x data.packing_tokens)
    logit_positions: int           # positions per row whose logits are computed; 0: a reward model's scores
    gradient_checkpointing: bool
    logits_chunk: int = 0          # tokens whose logits exist at once (`model.logits_chunk`); 0: all of them
    prompt_len: int = 0            # ReMax: generation from prompt_len to prompt_len + new_tokens
    new_tokens: int = 0
    frozen: tuple = ()             # (name, ModelSize or None: the trained model's, zero3, offload) per frozen model
    gloo: bool = False             # CPU ranks: gloo's all-gather and reduce-scatter copy the whole buffer they fill
    # rollout.engine vllm: the KV cache its engine reserves (None: `generate` on the trainer's module), and on
    # GPUs without `kv_cache_gib` the share of the GPU it takes in all (`gpu_memory_utilization`)
    vllm_kv_bytes: Optional[int] = None
    vllm_gpu_share: float = 0.0
    offload_activations: bool = False  # model.offload_activations (with checkpointing): layer inputs on the host
    offload_optimizer: bool = False    # engine.offload_optimizer: optimizer state, fp32 gradients and step on the host


def workload_of(config, stage: str, frozen_numels: Optional[dict] = None, gloo: bool = False) -> Workload:
    """The per-rank workload of `config` run as `stage` (a row of pipeline.stages.STAGES), on CPU ranks
    (gloo) or GPUs; `frozen_numels` gives the frozen models' sizes ({"reference": ModelSize, "reward":
    ModelSize}; default: the trained model's)."""
    spec = STAGES[stage]
    batch, length = config.engine.micro_batch_size, config.data.max_length
    checkpointing = config.model.gradient_checkpointing
    offloads = dict(offload_activations=checkpointing and config.model.offload_activations,
                    offload_optimizer=config.engine.offload_optimizer)
    frozen_numels = frozen_numels or {}
    section = getattr(config, spec.section) if spec.section else None
    frozen = []
    # With LoRA and no reference of its own, the reference is the actor without its adapters: nothing frozen.
    if spec.reference and not (config.model.lora.enabled and section.ref_model_path is None):
        frozen.append(("reference", frozen_numels.get("reference"), section.ref_zero_stage == 3,
                       section.ref_offload))
    if spec.samples:
        if section.reward_model_path is not None:  # reward functions alone hold no model
            frozen.append(("reward", frozen_numels.get("reward"), section.reward_zero_stage == 3,
                           section.reward_offload))
        prompt = config.data.max_prompt_length
        # ReMax: one sampled and one greedy response per prompt, generated in turn; RLOO, GRPO, PPO: k each.
        rows = batch * getattr(section, "num_samples", 1)
        return Workload(stage, rows, prompt + section.max_new_tokens, section.max_new_tokens + 1, checkpointing,
                        config.model.logits_chunk, prompt_len=prompt, new_tokens=section.max_new_tokens,
                        frozen=tuple(frozen), gloo=gloo,
                        vllm_kv_bytes=vllm_kv_bytes(config.rollout, gloo),
                        vllm_gpu_share=config.rollout.gpu_memory_utilization if vllm_kv_bytes(config.rollout, gloo)
                        == 0 else 0.0, **offloads)
    rows = 2 * batch if spec.pairs else batch
    if config.data.packing:  # the micro-batch's packs, one sequence of at most their token budget
        rows, length = 1, batch * config.data.pack_tokens()
    return Workload(stage, rows, length, 0 if spec.trains_reward_model else length, checkpointing,
                    config.model.logits_chunk, frozen=tuple(frozen), gloo=gloo, **offloads)


def vllm_kv_bytes(rollout, gloo: bool) -> Optional[int]:
    """The KV cache a vLLM rollout engine reserves (pipeline.rl.vllm_engine.create_llm): `kv_cache_gib`, 1
    GiB on CPU ranks, else 0 here: with `gpu_memory_utilization` vLLM sizes it to that share of the GPU
    (`plan --gpu-memory` adds it). None for `generate`."""
    if rollout.engine != "vllm":
        return None
    if rollout.kv_cache_gib is not None:
        return int(rollout.kv_cache_gib * GIB)
    return GIB if gloo else 0


# ---- the components -------------------------------------------------------------------------------

def layer_activation_bytes_per_token(g: Geometry, a: int) -> int:
    """Bytes a decoder layer saves for its backward per token (activations in `a` bytes).

    Two RMSNorms each keep their fp32 input (4H), the rsqrt (4), the normalised value cast back (aH)
    and its product with the weight (aH, the next matmul's input); SDPA keeps q, k, v (after RoPE),
    its output (whose layout o_proj reads as is) and an fp32 logsumexp per head; the gated MLP keeps
    gate, up, act(gate) and their product (4 x I). Counted from the tensors autograd saves (see
    tests/pipeline/test_plan.py)."""
    norms = 2 * (4 * g.hidden + 4 + 2 * a * g.hidden)
    attention = a * (2 * g.heads * g.head_dim + 2 * g.kv_heads * g.head_dim) + 4 * g.heads
    mlp = 4 * a * g.intermediate
    return norms + attention + mlp


def saved_activation_bytes(g: Geometry, rows: int, seq_len: int, a: int, checkpointing: bool) -> int:
    """What the forward of one micro-batch leaves for the backward: every layer's saved tensors, or with
    gradient checkpointing each layer's input; the additive attention mask (B x T x T, shared by the
    layers); the final norm and the LM head's input; the token ids and RoPE's tables. Measured for
    Llama with and without grouped KV heads."""
    tokens = rows * seq_len
    per_layer = a * g.hidden if checkpointing else layer_activation_bytes_per_token(g, a)
    mask = a * rows * seq_len * seq_len
    final_norm = (4 * g.hidden + 4 + 2 * a * g.hidden) * tokens
    ids_and_rope = 8 * tokens + 2 * a * seq_len * g.head_dim  # int64 token ids; RoPE's cos and sin
    return g.layers * per_layer * tokens + mask + final_norm + ids_and_rope


def activation_bytes(g: Geometry, rows: int, seq_len: int, a: int, checkpointing: bool) -> int:
    """Activations at the peak of one micro-batch's backward: what the forward saved, plus one layer's
    worth of gradients in flight, plus (with checkpointing) the one layer the backward rebuilds."""
    layer = layer_activation_bytes_per_token(g, a) * rows * seq_len
    return saved_activation_bytes(g, rows, seq_len, a, checkpointing) + layer + (layer if checkpointing else 0)


def logits_bytes(rows: int, positions: int, vocab: int, a: int, *, training: bool, chunk: int = 0,
                 entropy: bool = False) -> int:
    """What the log-probabilities of `rows` x `positions` tokens hold of their logits (a bytes) at once.

    Chunked (`chunk` tokens, pipeline.chunked_logits): one chunk's logits and their fp32 upcast, which the
    scores and, in the backward's recompute, the gradient overwrite in place (fp32 logits need no upcast);
    with `entropy` an fp32 buffer of its own beside the upcast. With `chunk` 0 all at once: the logits, their
    fp32 upcast for the loss and the fp32 log-softmax; in the backward the fp32 gradient and its cast back
    replace the upcast. A forward without gradients keeps logits and upcast."""
    if positions == 0:
        return 0
    upcast = 4 if a != 4 else 0  # `.float()` is a no-op on fp32 logits
    if chunk:
        cells = min(chunk, rows * positions) * vocab
        # The 16-bit logits live until upcast, and the gradient's 16-bit cast is made from the fp32 buffer.
        return cells * max(4 + (a if upcast else 0), 8 if entropy else 0)
    cells = rows * positions * vocab
    return cells * (a + upcast + (4 if training else 0))


def kv_cache_bytes(g: Geometry, rows: int, length: int, a: int) -> int:
    return 2 * g.layers * rows * length * g.kv_heads * g.head_dim * a


# ---- host memory: what offload moves off the device ----------------------------------------------

def offloaded_activation_bytes(g: Geometry, rows: int, seq_len: int, a: int) -> int:
    """What `model.offload_activations` keeps in host memory per micro-batch: every checkpointed layer's
    input (a x hidden per token; pipeline.models.checkpoint_in_host_memory). The backward copies one
    back at a time, for the layer it rebuilds."""
    return g.layers * a * g.hidden * rows * seq_len


def optimizer_offload(model, stage: int, a: int, world_size: int, kept_grads, bucket,
                      partition_in_bucket: bool) -> tuple:
    """`engine.offload_optimizer` at ZeRO 1-3, as DeepSpeed 0.19 lays it out (stage_1_and_2.py, stage3.py):
    fp32 master weights and optimizer state (the caller moves them), this rank's gradient partition (fp32;
    ZeRO-3's 16-bit one too) and the step on the host; ZeRO-1 keeps its 16-bit gradients on the device
    until they are reduced, and ZeRO-2 reduces straight into the host partition, so no 16-bit partition is
    built on the device and the step casts nothing there. ZeRO 1-2 keep a device buffer of the largest
    trainable parameter in 16 bits for the copies. Returns the device's (gradients kept, bucket in flight,
    offload buffer) and the host's bytes besides master weights and state. Not held to measurement: on CPU
    ranks host and device are one memory."""
    trainable, largest = trainable_numels(model)
    partition = trainable / world_size
    host = 4 * partition + (a * partition if stage == 3 and a != 4 else 0)
    if stage == 1:
        kept_grads = kept_grads - (4 * partition if a != 4 else 0)
    else:
        kept_grads = 0
    if partition_in_bucket:
        bucket -= a * partition
    buffer = a * largest if stage < 3 else 0
    return kept_grads, bucket, buffer, host


@per_model
def trainable_numels(model) -> tuple:
    """(elements trained, those of the largest trained parameter)."""
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    return sum(sizes), max(sizes)


def model_state_rows(model, world_sizes, precision: str = "bf16") -> list:
    """One row per (optimizer, zero stage, world size): weights, gradients and optimizer state on the
    most loaded rank."""
    total, trainable = count_parameters(model)
    frozen = total - trainable
    states = planned_state_bytes(model, world_sizes)
    mixed = precision in ("bf16", "fp16")
    weight_bytes = 2 if mixed else 4
    largest = largest_layer_numel(model)
    rows = []
    for world_size in world_sizes:
        for stage in (0, 1, 2, 3):
            shard = lambda numel, sharded: numel / world_size if sharded else numel  # noqa: E731
            params = weight_bytes * shard(total, stage == 3)
            if stage == 3:
                params += 4 * largest  # one layer gathered in full (DeepSpeed's estimate)
            # ZeRO-3 reduces 16-bit gradients through transient buckets straight into its fp32 partition.
            grads = 0 if (mixed and stage == 3) else weight_bytes * shard(trainable, stage >= 2)
            if mixed:
                grads += 4 * shard(trainable, stage >= 1)  # fp32 gradients for the optimizer
            master = 4 * shard(trainable, stage >= 1) if mixed else 0
            for optimizer in OPTIMIZERS:
                optimizer_bytes = master + states[optimizer, world_size, stage]
                model_states = int(params + grads + optimizer_bytes)
                rows.append({"optimizer": optimizer, "zero_stage": stage, "world_size": world_size,
                             "params_bytes": int(params), "grads_bytes": int(grads),
                             "optimizer_bytes": int(optimizer_bytes), "model_states_bytes": model_states,
                             "total_bytes": model_states,
                             "parameters": total, "trainable_parameters": trainable, "frozen_parameters": frozen})
    return rows


def add_workload(row: dict, model, workload: Workload, precision: str) -> dict:
    """`row` with the workload's components and the peak (`total_bytes`) added."""
    g = Geometry.of(model.config)
    a = 2 if precision in ("bf16", "fp16") else 4
    world_size, stage = row["world_size"], row["zero_stage"]
    total, trainable = row["parameters"], row["trainable_parameters"]
    w = workload
    activations = activation_bytes(g, w.rows, w.seq_len, a, w.gradient_checkpointing)
    # The sampling stages score the actor's entropy along its responses.
    entropy = STAGES[w.stage].samples
    logits = logits_bytes(w.rows, w.logit_positions, g.vocab, a, training=True, chunk=w.logits_chunk, entropy=entropy)
    # DeepSpeed: one gradient bucket (ZeRO-1 accumulates it in fp32).
    bucket_elements = reduce_bucket_elements(trainable)
    bucket = bucket_elements * (4 if stage == 1 and a == 2 else a) if stage >= 1 else 0
    params, kept_grads = row["params_bytes"], row["grads_bytes"]
    bucket_kept = gathered = gather_copy = 0
    # In flight while a full bucket is reduced, when the gradients outgrow it, or else once the
    # backward is done: the bucket and its gradients flattened for the collective.
    reduction = 2 * bucket if stage >= 2 else 0
    if stage == 2 and a == 2:
        # ZeRO-2 fills the bucket as the backward frees activations and, reducing it, builds this rank's
        # 16-bit gradient partition, which the step flattens and casts to fp32 and then frees; fused
        # AdamW and Adam-mini add only per-block values to that.
        kept_grads = 0
        step = (4 + 2 * a) * trainable / world_size
        # Gradients that outgrow the bucket are reduced, and the partition built, while activations live.
        bucket = 0 if trainable <= bucket_elements else reduction + a * trainable / world_size
    elif stage == 1 and a == 2:
        step = a * trainable / world_size
    elif stage == 3:
        # What the engine holds (DeepSpeed's estimate's "one layer gathered" aside): this rank's shard,
        # and whole every parameter under the persistence threshold; a gradient partition in the model's
        # dtype (DeepSpeed's grad_accum_dtype), flattened per sub-group and cast to fp32 for the step;
        # the reduce bucket, allocated at start-up and held once the first backward has filled it;
        # between forward and backward the gathered weights.
        params = a * total / world_size + a * persistent_numel(model)
        kept_grads = a * trainable / world_size
        step = (4 + (a if a != 4 else 0)) * min(SUB_GROUP_ELEMENTS, trainable / world_size)
        # Reducing it flattens its gradients (and gloo's reduce-scatter copies them once more); the
        # forward's all-gathers are copied by gloo too.
        reduction = bucket * (2 if w.gloo else 1)
        bucket_kept, bucket = bucket, (reduction if trainable > bucket_elements else 0)
        gathered = a * zero3_gathered_numel(model, w.gradient_checkpointing)
        gather_copy = a * ModelSize.of(model).forward_gathered if w.gloo else 0
    else:
        step = 0
    optimizer, host, offload_buffer = row["optimizer_bytes"], 0, 0
    if w.offload_optimizer and stage >= 1:
        kept_grads, bucket, offload_buffer, host = optimizer_offload(
            model, stage, a, world_size, kept_grads, bucket, partition_in_bucket=stage == 2 and a == 2
            and trainable > bucket_elements)
        optimizer, host, step = 0, host + optimizer, 0
    if w.offload_activations:
        offloaded = offloaded_activation_bytes(g, w.rows, w.seq_len, a)
        activations -= offloaded - offloaded // g.layers  # one layer's input is back for its recompute
        host += offloaded
    deepspeed = int(bucket + gathered)
    frozen = 0
    frozen_live = 0
    own = ModelSize.of(model) if any(size is None for _, size, _, _ in w.frozen) else None
    for _, size, zero3, offload in w.frozen:
        size = size or own
        if zero3:  # its shard (in CPU memory when offloaded), its small parameters whole, one module gathered
            frozen += (0 if offload else a * size.parameters / world_size) + a * size.persistent
            host += a * size.parameters / world_size if offload else 0
            frozen_live = max(frozen_live, a * size.forward_gathered * (2 if w.gloo else 1))
        else:
            frozen += 0 if offload else a * size.parameters
    generation = scoring = vllm = 0
    if STAGES[w.stage].samples:
        if w.vllm_kv_bytes is not None:
            # A vLLM engine per rank holds a whole copy of the weights and its KV cache for the run. The
            # trainer hands it one decoder layer at a time (gathered at ZeRO-3, merged where LoRA is); the
            # engine's sampling logits (up to 2 responses per row, fp32) come on top on CPU.
            vllm = a * total + w.vllm_kv_bytes
            generation = a * total / max(g.layers, 1) * (2 if stage == 3 else 1) + 2 * w.rows * g.vocab * 4
        else:
            # `generate` runs on whole weights: ZeRO-3 gathers every partitioned parameter at once (in one
            # all-gather, which gloo copies before the generation starts).
            whole = a * (total - persistent_numel(model)) if stage == 3 else 0
            per_step_logits = 2 * w.rows * g.vocab * 4
            generation = whole + max(kv_cache_bytes(g, w.rows, w.seq_len, a) + per_step_logits,
                                     whole if w.gloo else 0)
        # Actor and reference log-probs without gradients: logits of the response and their upcast.
        scoring = frozen_live + logits_bytes(w.rows, w.logit_positions, g.vocab, a, training=False,
                                             chunk=w.logits_chunk, entropy=entropy)
    # gloo's copy of an all-gather is in flight while the forward fetches weights, before most activations exist.
    forward_backward = max(activations + logits, gather_copy) + deepspeed
    kept = params + kept_grads + optimizer + bucket_kept + offload_buffer
    peak = kept + frozen + vllm + max(forward_backward, generation, scoring, step, reduction)
    return dict(row, params_bytes=int(params), kept_bytes=int(kept), kept_grads_bytes=int(kept_grads),
                activations_bytes=int(activations), logits_bytes=int(logits), deepspeed_bytes=deepspeed,
                deepspeed_kept_bytes=int(bucket_kept), gathered_bytes=int(gathered), reduction_bytes=int(reduction),
                forward_backward_bytes=int(forward_backward), optimizer_step_bytes=int(step),
                frozen_bytes=int(frozen), vllm_bytes=int(vllm), vllm_gpu_share=w.vllm_gpu_share,
                generation_bytes=int(generation),
                scoring_bytes=int(scoring),
                total_bytes=int(peak), stage=w.stage, optimizer_bytes=int(optimizer), host_bytes=int(host))


def plan_rows(model, world_sizes, precision: str = "bf16", workload: Optional[Workload] = None,
              critic=None) -> list:
    """One row per (optimizer, zero stage, world size): bytes on the most loaded rank. Without a
    workload only model states; with one, `total_bytes` is the planned peak. `critic` (PPO) is a
    second trained model under the same optimizer and ZeRO stage (`add_critic`)."""
    rows = model_state_rows(model, world_sizes, precision)
    if workload is None:
        return rows
    critic_states = {} if critic is None else {state_key(row): row
                                               for row in model_state_rows(critic, world_sizes, precision)}
    return [planned_row(row, model, workload, precision, critic, critic_states.get(state_key(row))) for row in rows]


def state_key(row: dict) -> tuple:
    return row["optimizer"], row["zero_stage"], row["world_size"]


def planned_row(state_row: dict, model, workload: Workload, precision: str, critic=None,
                critic_state_row: Optional[dict] = None) -> dict:
    """One row of model states (`model_state_rows`) with the workload, and PPO's critic (its own row of
    model states under the same optimizer and ZeRO stage), added."""
    row = add_workload(state_row, model, workload, precision)
    if critic is None:
        return row
    critic_workload = Workload("reward", workload.rows, workload.seq_len, 0, workload.gradient_checkpointing,
                               gloo=workload.gloo, offload_activations=workload.offload_activations,
                               offload_optimizer=workload.offload_optimizer)
    return add_critic(row, add_workload(critic_state_row, critic, critic_workload, precision))


def add_critic(row: dict, critic: dict) -> dict:
    """The actor's `row` with PPO's critic (its own planned row) added. The critic's weights, gradients
    and optimizer state persist like the actor's. Its forward and backward (activations, its gradient
    bucket or gathered weights), its gradient reduction and its optimizer step run after the actor's
    forward and before the actor's backward, so the actor's activations, logits and (ZeRO-3) gathered
    weights are alive through them; the actor's gradient bucket is not yet."""
    critic_phase = max(critic["forward_backward_bytes"], critic["optimizer_step_bytes"], critic["reduction_bytes"])
    alive = row["forward_backward_bytes"] - (row["deepspeed_bytes"] - row["gathered_bytes"])
    forward_backward = alive + max(row["forward_backward_bytes"] - alive, critic_phase)
    kept = row["kept_bytes"] + critic["kept_bytes"]
    phases = (forward_backward, row["generation_bytes"], row["scoring_bytes"], row["optimizer_step_bytes"],
              row["reduction_bytes"])
    return dict(row, kept_bytes=int(kept), critic_bytes=int(critic["kept_bytes"]), critic_phase_bytes=int(critic_phase),
                host_bytes=row["host_bytes"] + critic["host_bytes"],
                critic_parameters=critic["parameters"], total_bytes=int(kept + row["frozen_bytes"] + row["vllm_bytes"] + max(phases)))


def frozen_numels(config, stage: str) -> dict:
    """Sizes (`ModelSize`) of the frozen models, from their config.json where it exists (else the trained
    model's architecture is assumed)."""
    numels, spec = {}, STAGES[stage]
    if spec.samples and getattr(config, stage).reward_model_path is not None:
        numels["reward"] = ModelSize.of(meta_reward_model(config, getattr(config, stage).reward_model_path))
    if spec.reference:
        numels["reference"] = ModelSize.of(load_causal_lm(base_model_config(config), device="meta"))
    return numels


def stage_of(config) -> str:
    """The stage a validated config is for (pipeline.stages.stage_named)."""
    return stage_named({field.name: getattr(config, field.name) for field in dataclasses.fields(config)})


def dry_run_plan(config: RunConfig, world_size: int) -> str:
    """A stage's `--dry-run`: this run's per-rank plan, components and peak, every optimizer of the
    table side by side with the chosen one marked."""
    stage_name = stage_of(config)
    model = build_meta_model(config, stage_name)
    total, trainable = count_parameters(model)
    stage = config.engine.zero_stage
    # This machine's collectives, as the engine picks them (pipeline.engine.init_distributed).
    workload = workload_of(config, stage_name, frozen_numels(config, stage_name), gloo=not torch.cuda.is_available())
    critic = build_meta_critic(config)
    rows = {row["optimizer"]: row for row in plan_rows(model, [world_size], config.engine.precision, workload, critic)
            if row["zero_stage"] == stage}
    states = planned_state_bytes(model, [world_size], [stage])
    chosen = rows[config.optim.name]
    lines = [f"dry run ({stage_name}): {config.model.path or 'model.config'} on the meta device, ZeRO-{stage}, "
             f"{world_size} rank(s), {config.engine.precision}, micro-batch {workload.rows} x {workload.seq_len} tokens"
             f"{' (packed)' if config.data.packing else ''}"
             f"{', gradient checkpointing' if workload.gradient_checkpointing else ''}",
             f"  parameters            {total:>16,}",
             f"  trainable parameters  {trainable:>16,}",
             f"  weights per rank      {chosen['params_bytes'] / GIB:>12.2f} GiB",
             f"  gradients kept        {chosen['kept_grads_bytes'] / GIB:>12.2f} GiB",
             "  optimizer state per rank (fp32):"]
    for name in OPTIMIZERS:
        mark = "  <- chosen" if name == config.optim.name else ""
        lines.append(f"    {name:<20}{states[name, world_size, stage] / GIB:>12.2f} GiB{mark}")
    if {"adam_mini", "adamw"} <= set(OPTIMIZERS):
        ratio = states["adam_mini", world_size, stage] / states["adamw", world_size, stage]
        lines.append(f"    adam_mini / adamw   {ratio:>12.3f}")
    for key, label in (("deepspeed_kept_bytes", "DeepSpeed buffers kept"), ("activations_bytes", "activations"),
                       ("logits_bytes", "logits and loss"), ("deepspeed_bytes", "DeepSpeed buffers"),
                       ("reduction_bytes", "gradient reduction"), ("optimizer_step_bytes", "optimizer step"),
                       ("frozen_bytes", "frozen models"), ("vllm_bytes", "vLLM engine"),
                       ("generation_bytes", "generation"), ("scoring_bytes", "scoring"),
                       ("critic_bytes", "critic state"),
                       ("critic_phase_bytes", "critic training"), ("host_bytes", "host (offloaded)")):
        if chosen.get(key) or key in ("activations_bytes", "deepspeed_bytes"):
            lines.append(f"  {label:<22}{chosen[key] / GIB:>12.2f} GiB")
    lines.append("  peak = weights + gradients kept + optimizer state + DeepSpeed buffers kept + frozen models "
                 "+ the vLLM engine (its weights and KV cache, where `rollout.engine` is vllm) "
                 "+ the largest phase (activations + logits + DeepSpeed buffers, generation, scoring, gradient "
                 "reduction or optimizer step)"
                 + ("; PPO: the critic's state (weights, gradients, optimizer) persists too, and its training "
                    "(forward, backward, step) runs while the actor's activations and logits live"
                    if critic is not None else ""))
    lines.append("  peak per rank:")
    for name, row in rows.items():
        mark = "  <- chosen" if name == config.optim.name else ""
        lines.append(f"    {name:<20}{row['total_bytes'] / GIB:>12.2f} GiB{mark}")
    return "\n".join(lines)


def on_gpu(row: dict, gpu_memory_gib) -> dict:
    """`row` on a GPU of `gpu_memory_gib`: a vLLM engine sized by `gpu_memory_utilization` takes that share
    of the GPU (weights, KV cache and its own activations) rather than only its weights."""
    if not (gpu_memory_gib and row.get("vllm_gpu_share")):
        return row
    reserved = max(row["vllm_bytes"], row["vllm_gpu_share"] * gpu_memory_gib * GIB)
    return dict(row, vllm_bytes=int(reserved), total_bytes=int(row["total_bytes"] - row["vllm_bytes"] + reserved))


def format_table(rows: list, gpu_memory_gib=None) -> str:
    rows = [on_gpu(row, gpu_memory_gib) for row in rows]
    header = ["optimizer", "ZeRO", "ranks", "params GiB", "grads GiB", "optim GiB"]
    keys = ["params_bytes", "grads_bytes", "optimizer_bytes"]
    if rows and "activations_bytes" in rows[0]:
        keys[1] = "kept_grads_bytes"  # what persists between steps; the fp32 rest is in the step column
        header += ["DS kept GiB", "activ. GiB", "logits GiB", "DS GiB", "reduce GiB", "step GiB", "frozen GiB",
                   "gen. GiB"]
        keys += ["deepspeed_kept_bytes", "activations_bytes", "logits_bytes", "deepspeed_bytes", "reduction_bytes",
                 "optimizer_step_bytes", "frozen_bytes", "generation_bytes"]
        if any(row.get("vllm_bytes") for row in rows):
            header.append("vLLM GiB")
            keys.append("vllm_bytes")
    if rows and "critic_bytes" in rows[0]:  # PPO: the critic's persistent state and its training phase
        header += ["critic GiB", "critic phase GiB"]
        keys += ["critic_bytes", "critic_phase_bytes"]
    if any(row.get("host_bytes") for row in rows):  # offloaded: in host memory, not in the peak
        header.append("host GiB")
        keys.append("host_bytes")
    header.append("peak GiB")
    keys.append("total_bytes")
    if gpu_memory_gib:
        header.append(f"fits {gpu_memory_gib:g} GiB")
    lines = [header]
    for row in rows:
        line = [row["optimizer"], str(row["zero_stage"]), str(row["world_size"])] + \
               [f"{row[k] / GIB:.2f}" for k in keys]
        if gpu_memory_gib:
            line.append("yes" if row["total_bytes"] <= gpu_memory_gib * GIB else "no")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in lines)


def markdown_table(config_dir, world_sizes, gpu_memory_gib: float) -> str:
    """A markdown table of every config in `config_dir` (the README's Llama-2-7B table): per config and
    rank count, at the config's ZeRO stage, what a rank holds and its peak with Adam-mini and AdamW.

    Raises:
        ConfigError, ModelLoadError: a config that does not load.
    """
    plans = []
    for path in sorted(Path(config_dir).glob("*.yaml")):
        stage = _stage_in_file(str(path))
        config, rows = config_plan_rows(str(path), world_sizes, stage=stage)
        plans.append((list(STAGES).index(stage), path.stem, stage, config, rows))
        if STAGES[stage].samples and config.rollout.engine == "hf":  # and with vLLM generating, as configured
            config, rows = config_plan_rows(str(path), world_sizes, ["rollout.engine=vllm"], stage=stage)
            share = f"{config.rollout.gpu_memory_utilization:g} of the GPU"
            plans.append((list(STAGES).index(stage), f"{path.stem} + vLLM, {share}", stage, config,
                          [on_gpu(row, gpu_memory_gib) for row in rows]))
    gib = lambda n: f"{n / GIB:.1f}"  # noqa: E731
    peak = lambda r: gib(r["total_bytes"]) + (" (no)" if r["total_bytes"] > gpu_memory_gib * GIB else "")  # noqa: E731
    lines = ["| config | ranks | weights | optimizer state + fp32 master, Adam-mini / AdamW | activations | logits | "
             "generation or scoring | peak, Adam-mini | peak, AdamW |", "|---|---|---|---|---|---|---|---|---|"]
    for _, name, stage, config, rows in sorted(plans, key=lambda plan: plan[:2]):
        for first, world_size in zip([True] + [False] * len(world_sizes), world_sizes):
            row = {r["optimizer"]: r for r in rows
                   if (r["zero_stage"], r["world_size"]) == (config.engine.zero_stage, world_size)}
            mini, adamw = row["adam_mini"], row["adamw"]
            phase = max(mini["generation_bytes"], mini["scoring_bytes"])
            label = workload_label(config, stage, mini, adamw, first)
            cells = [f"{name} ({label})" if label else name, str(world_size), gib(mini["params_bytes"]),
                     f"{gib(mini['optimizer_bytes'])} / {gib(adamw['optimizer_bytes'])}",
                     gib(mini["activations_bytes"]),
                     gib(mini["logits_bytes"]) if mini["logits_bytes"] else "-", gib(phase) if phase else "-",
                     peak(mini), peak(adamw)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def workload_label(config, stage: str, mini: dict, adamw: dict, workload: bool = True) -> str:
    """What one rank runs per step in `config` (unless not `workload`), for a table's first column, and for
    PPO its critic's state, Adam-mini / AdamW, and its training phase."""
    batch, length = config.engine.micro_batch_size, config.data.max_length
    section = getattr(config, stage, None)
    if STAGES[stage].samples:
        samples = getattr(section, "num_samples", 1)
        label = (f"{batch} prompts" + (f" x {samples} samples" if samples > 1 else "")
                 + f", {config.data.max_prompt_length} + {section.max_new_tokens}")
    elif config.data.packing:
        label = f"packed, {batch * config.data.pack_tokens()} tokens"
    elif STAGES[stage].pairs:
        label = f"{batch} pairs x {length}"
    else:
        label = f"{batch} x {length}"
    if config.model.lora.enabled:
        label = f"LoRA rank {config.model.lora.r}, " + label
    parts = [label] if workload else []
    if "critic_bytes" in mini:
        parts.append(f"critic: {mini['critic_bytes'] / GIB:.1f} / {adamw['critic_bytes'] / GIB:.1f} kept, "
                     f"{mini['critic_phase_bytes'] / GIB:.1f} in training")
    return "; ".join(parts)


def config_class(stage: str):
    """The stage's config class (its own section validated with the rest)."""
    return STAGES[stage].config_class


def _stage_in_file(path: str) -> str:
    """The stage a YAML config is for, read before validation (unreadable files: sft, and the
    config loader reports them)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "sft"
    return stage_named(values) if isinstance(values, dict) else "sft"


def config_plan_rows(path: str, world_sizes, overrides=(), stage: Optional[str] = None, gloo: bool = False) -> tuple:
    """The config at `path` (its stage read from the file unless given) and its plan's rows, on GPUs or
    (`gloo`) on CPU ranks.

    Raises:
        ConfigError, ModelLoadError: as `load_config` and the meta model's build do.
    """
    stage = stage or _stage_in_file(path)
    config = load_config(config_class(stage), path, list(overrides))
    model = build_meta_model(config, stage)
    workload = workload_of(config, stage, frozen_numels(config, stage), gloo)
    critic = build_meta_critic(config) if STAGES[stage].critic else None
    return config, plan_rows(model, world_sizes, config.engine.precision, workload, critic)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the run config to plan")
    parser.add_argument("--markdown", metavar="DIR",
                        help="instead, a markdown table of every config in DIR at its ZeRO stage (the README's "
                             "Llama-2-7B table: --markdown configs/llama2-7b --world-sizes 2,8 --gpu-memory 80)")
    parser.add_argument("--world-sizes", default="1,2,8", help="comma-separated rank counts")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU, to say what fits")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--cpu", action="store_true",
                        help="plan CPU ranks (gloo collectives, whose all-gather and reduce-scatter copy their buffer)")
    parser.add_argument("--stage", choices=list(STAGES), default=None,
                        help="the stage to plan for (default: from the config: its remax/dpo section, pairwise data "
                             "for reward, else sft)")
    fit = parser.add_argument_group("fitting a budget (pipeline.fit)")
    fit.add_argument("--fit", action="store_true",
                     help="search the settings that move memory for the fastest combination that fits --gpu-memory "
                          "on --world-size ranks (by the plan and pipeline.fit's cost model)")
    fit.add_argument("--world-size", type=int, help="--fit: the rank count")
    fit.add_argument("--headroom", type=float, default=0.1,
                     help="--fit: the share of --gpu-memory kept free for what the plan does not count (default 0.1)")
    fit.add_argument("--write", metavar="FILE", help="--fit: also write the chosen configuration as a config file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        world_sizes = [int(size) for size in args.world_sizes.split(",")]
        if any(size <= 0 for size in world_sizes):
            raise ValueError
    except ValueError:
        parser.error(f"--world-sizes is {args.world_sizes!r}; give positive integers such as 1,2,8")
    if args.fit:
        return fit_command(parser, args, world_sizes)
    if not args.config and not (args.markdown and args.gpu_memory):
        parser.error("give --config FILE, or --markdown DIR with --gpu-memory GIB")
    try:
        if args.markdown:
            print(markdown_table(args.markdown, world_sizes, args.gpu_memory))
            return 0
        _, rows = config_plan_rows(args.config, world_sizes, args.overrides, args.stage, gloo=args.cpu)
    except (ConfigError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else format_table(rows, args.gpu_memory))
    return 0


# ---- fitting a budget: pipeline.fit's search, planned ----------------------------------------------

def search(path: str, world_size: int, gpu_memory_gib: float, headroom: float, overrides=()) -> Fit:
    """Every combination of pipeline.fit's settings on the config at `path` (with `overrides`) the config
    layer accepts, planned at `world_size` ranks on GPUs of `gpu_memory_gib` and costed. The models are
    built once: no searched setting changes them.

    Raises:
        ConfigError, ModelLoadError: the config (with `overrides`) does not load.
        EngineConfigError: its global batch does not divide over `world_size` ranks.
    """
    stage = _stage_in_file(path)
    config = load_config(config_class(stage), path, list(overrides))
    model, critic = build_meta_model(config, stage), build_meta_critic(config) if STAGES[stage].critic else None
    numels, precision = frozen_numels(config, stage), config.engine.precision
    a = 2 if precision in ("bf16", "fp16") else 4
    geometry = Geometry.of(model.config)
    sizes = sizes_of(model, critic, numels, offloaded_activation_bytes(geometry, 1, 1, a),
                     geometry.vocab * geometry.hidden)
    states = {state_key(row): row for row in model_state_rows(model, [world_size], precision)}
    critic_states = {} if critic is None else {state_key(row): row
                                               for row in model_state_rows(critic, [world_size], precision)}
    accepted, refused = combinations(config, stage, world_size)
    tried = []
    for settings, candidate in accepted:
        key = (candidate.optim.name, candidate.engine.zero_stage, world_size)
        workload = workload_of(candidate, stage, numels)
        row = on_gpu(planned_row(states[key], model, workload, precision, critic, critic_states.get(key)),
                     gpu_memory_gib)
        changes = {key: value for key, value in settings.items() if setting_value(config, key) != value}
        tried.append(Tried(settings, changes, row, step_seconds(candidate, stage, world_size, sizes, workload),
                           row["total_bytes"] <= (1 - headroom) * gpu_memory_gib * GIB))
    return Fit(path, stage, config, world_size, gpu_memory_gib, headroom, tried, refused)


def fit_report(fit: Fit) -> str:
    """The chosen combination: the search's size, its cost and peak against the config's own, the
    overrides that differ from the config, and its plan."""
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


def write_fitted_config(fit: Fit, overrides, path: str) -> None:
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


def fit_command(parser, args, world_sizes: list) -> int:
    """`--fit`: prints the fastest fitting combination, its overrides and plan (with --json, the search as
    JSON; with --markdown DIR, a table of every config there at each of --world-sizes), writes it as a
    config file with --write. 1 when nothing fits, naming the budget and the smallest peak found; 2 when
    the config does not load."""
    if not ((args.config and args.world_size or args.markdown) and args.gpu_memory):
        parser.error("--fit needs --config FILE and --world-size N (or --markdown DIR and --world-sizes), and "
                     "--gpu-memory GIB")
    if (args.world_size or 1) <= 0 or args.gpu_memory <= 0 or not 0 <= args.headroom < 1:
        parser.error(f"--world-size {args.world_size} and --gpu-memory {args.gpu_memory:g} must be positive and "
                     f"--headroom {args.headroom:g} in [0, 1)")
    try:
        if args.markdown:
            print(fit_markdown([search(str(path), world_size, args.gpu_memory, args.headroom)
                                for path in sorted(Path(args.markdown).glob("*.yaml")) for world_size in world_sizes]))
            return 0
        fit = search(args.config, args.world_size, args.gpu_memory, args.headroom, args.overrides)
    except (ConfigError, ModelLoadError, EngineConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    chosen = fit.chosen
    if args.json:
        print(json.dumps(fit.as_json(), indent=1))
    if chosen is None:
        print(f"error: {args.config}: no combination of the searched settings fits {fit.budget}; the smallest peak "
              f"found is {fit.smallest.row['total_bytes'] / GIB:.1f} GiB ({override_text(fit.smallest.changes)})",
              file=sys.stderr)
        return 1
    if args.write:
        write_fitted_config(fit, args.overrides, args.write)
    if not args.json:
        print(fit_report(fit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
