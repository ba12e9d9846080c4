"""Per-rank memory plans: everything a rank holds at its peak, for ZeRO 0-3, Adam-mini next to AdamW.

    python -m pipeline.plan --config FILE [--world-sizes 1,2,8] [--gpu-memory 80] [--json] [key.sub=value ...]

The model is built on the meta device from its config.json (no weights are read); the stage (SFT,
reward, DPO, ReMax) is read from the config, and the reward stage is planned as a reward model.

Model states follow DeepSpeed's layout (its `estimate_zero{2,3}_model_states_mem_needs`): with
bf16/fp16, 16-bit weights and gradients plus fp32 gradients and an fp32 master copy; ZeRO-1 shards
the optimizer side, ZeRO-2 the gradients too, ZeRO-3 the weights too. The optimizer's own state
comes from the optimizer's accounting (Adam-mini's `planned_state_bytes`, AdamW's two fp32 values
per element). On top, per rank:
  activations     what autograd keeps for the backward (Llama-style layer, SDPA: no T x T matrix),
                  every layer, or with gradient checkpointing each layer's input plus one layer rebuilt
  logits          the B x T x vocab logits, their fp32 upcast and log-softmax (the loss), where computed
  DeepSpeed       the gradient reduce bucket; ZeRO-3: the gathered weights it keeps live
  optimizer step  the step's temporaries (ZeRO's flattened gradient partition)
  frozen models   reference policy and reward model weights (ReMax, DPO)
  critic          PPO: a second trained model (weights, gradients, optimizer state); its forward,
                  backward and step run while the actor's activations are alive
  generation      ReMax: KV cache and, at ZeRO-3, the actor gathered whole for `generate`
The peak is what persists between steps (weights, the gradients DeepSpeed keeps, optimizer state,
frozen models) plus the largest of the phases (forward/backward, generation, scoring, optimizer step;
ZeRO-2's fp32 gradient partition exists only in the step); "fits" is decided on it. Checked against
measured peaks on 2 CPU ranks by benchmarks/memory_vs_plan.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

from .config import ConfigError, RunConfig, load_config
from .engine import MAX_LIVE_PARAMETERS, SUB_GROUP_ELEMENTS, reduce_bucket_elements
from .models import ModelLoadError, RewardModel, apply_lora, count_parameters, load_causal_lm
from .optim import OPTIMIZERS, planned_state_bytes
from .stages import STAGES, stage_named

GIB = 2**30
def build_meta_model(config: RunConfig, stage: str = "sft"):
    """The run's trained model (LoRA applied) on the meta device: only config.json is read. The reward
    stage trains a reward model (backbone + v_head, no LM head)."""
    if STAGES[stage].trains_reward_model:
        model = RewardModel.from_causal_lm(config.model, device="meta")
    else:
        model = load_causal_lm(config.model, device="meta")
    if config.model.lora.enabled:
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
    rows: int                      # sequences per forward (reward, DPO: chosen and rejected stacked)
    seq_len: int                   # tokens per sequence (the planned worst case: data.max_length)
    logit_positions: int           # positions per row whose logits are computed; 0: a reward model's scores
    gradient_checkpointing: bool
    prompt_len: int = 0            # ReMax: generation from prompt_len to prompt_len + new_tokens
    new_tokens: int = 0
    frozen: tuple = ()             # (name, parameters, zero3, offload) of each frozen model


def workload_of(config, stage: str, frozen_numels: Optional[dict] = None) -> Workload:
    """The per-rank workload of `config` run as `stage` (a row of pipeline.stages.STAGES);
    `frozen_numels` gives the frozen models' sizes ({"reference": n, "reward": n}; default: the trained
    model's)."""
    spec = STAGES[stage]
    batch, length = config.engine.micro_batch_size, config.data.max_length
    checkpointing = config.model.gradient_checkpointing
    frozen_numels = frozen_numels or {}
    section = getattr(config, spec.section) if spec.section else None
    frozen = []
    # With LoRA and no reference of its own, the reference is the actor without its adapters: nothing frozen.
    if spec.reference and not (config.model.lora.enabled and section.ref_model_path is None):
        frozen.append(("reference", frozen_numels.get("reference"), section.ref_zero_stage == 3,
                       section.ref_offload))
    if spec.samples:
        frozen.append(("reward", frozen_numels.get("reward"), section.reward_zero_stage == 3,
                       section.reward_offload))
        prompt = config.data.max_prompt_length
        # ReMax: one sampled and one greedy response per prompt, generated in turn; RLOO, GRPO, PPO: k each.
        rows = batch * getattr(section, "num_samples", 1)
        return Workload(stage, rows, prompt + section.max_new_tokens, section.max_new_tokens + 1, checkpointing,
                        prompt_len=prompt, new_tokens=section.max_new_tokens, frozen=tuple(frozen))
    rows = 2 * batch if spec.pairs else batch
    return Workload(stage, rows, length, 0 if spec.trains_reward_model else length, checkpointing,
                    frozen=tuple(frozen))


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


def logits_bytes(rows: int, positions: int, vocab: int, a: int, *, training: bool) -> int:
    """Logits (a bytes), their fp32 upcast for the loss and the fp32 log-softmax; in the backward the fp32
    gradient and its cast back replace the upcast. A forward without gradients keeps logits and upcast."""
    if positions == 0:
        return 0
    cells = rows * positions * vocab
    upcast = 4 if a != 4 else 0  # `.float()` is a no-op on fp32 logits
    return cells * (a + upcast + (4 if training else 0))


def kv_cache_bytes(g: Geometry, rows: int, length: int, a: int) -> int:
    return 2 * g.layers * rows * length * g.kv_heads * g.head_dim * a


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
    logits = logits_bytes(w.rows, w.logit_positions, g.vocab, a, training=True)
    # DeepSpeed: one gradient bucket (ZeRO-1 accumulates it in fp32); ZeRO-3 keeps up to max_live
    # gathered weights between forward and backward, on top of its own shard.
    bucket = reduce_bucket_elements(trainable) * (4 if stage == 1 and a == 2 else a) if stage >= 1 else 0
    live = a * min(MAX_LIVE_PARAMETERS, total) * (1 - 1 / world_size) if stage == 3 else 0
    deepspeed = int(bucket + live)
    # Gradients: ZeRO-2 keeps this rank's 16-bit gradient partition between steps and builds the fp32
    # one only for the step (flattened from the 16-bit one, then cast); ZeRO-3 keeps its fp32 partition
    # (allocated once) and flattens it per sub-group for the step. Fused AdamW and Adam-mini add only
    # per-block values to that.
    kept_grads = row["grads_bytes"]
    if stage == 2 and a == 2:
        kept_grads = a * trainable / world_size
        step = (4 + a) * trainable / world_size
    elif stage == 1 and a == 2:
        step = a * trainable / world_size
    elif stage == 3:
        step = 4 * min(SUB_GROUP_ELEMENTS, trainable / world_size)
    else:
        step = 0
    frozen = 0
    frozen_live = 0
    for _, numel, zero3, offload in w.frozen:
        numel = numel if numel is not None else total
        frozen += 0 if offload else (a * numel / world_size if zero3 else a * numel)
        if zero3:  # gathered while it runs (from CPU when offloaded)
            own_shard = 0 if offload else 1 / world_size
            frozen_live = max(frozen_live, a * min(MAX_LIVE_PARAMETERS, numel) * (1 - own_shard))
    generation = scoring = 0
    if STAGES[w.stage].samples:
        gathered = a * total * (1 - 1 / world_size) if stage == 3 else 0  # `generate` runs on whole weights
        per_step_logits = 2 * w.rows * g.vocab * 4
        generation = gathered + kv_cache_bytes(g, w.rows, w.seq_len, a) + per_step_logits
        # Actor and reference log-probs without gradients: logits of the response and their upcast.
        scoring = frozen_live + logits_bytes(w.rows, w.logit_positions, g.vocab, a, training=False)
    forward_backward = activations + logits + deepspeed
    kept = row["params_bytes"] + kept_grads + row["optimizer_bytes"]
    peak = kept + frozen + max(forward_backward, generation, scoring, step)
    return dict(row, kept_bytes=int(kept), kept_grads_bytes=int(kept_grads), activations_bytes=int(activations),
                logits_bytes=int(logits), deepspeed_bytes=deepspeed, optimizer_step_bytes=int(step),
                frozen_bytes=int(frozen), generation_bytes=int(generation),
                scoring_bytes=int(scoring), total_bytes=int(peak), stage=w.stage)


def plan_rows(model, world_sizes, precision: str = "bf16", workload: Optional[Workload] = None,
              critic=None) -> list:
    """One row per (optimizer, zero stage, world size): bytes on the most loaded rank. Without a
    workload only model states; with one, `total_bytes` is the planned peak. `critic` (PPO) is a
    second trained model under the same optimizer and ZeRO stage (`add_critic`)."""
    rows = model_state_rows(model, world_sizes, precision)
    if workload is None:
        return rows
    rows = [add_workload(row, model, workload, precision) for row in rows]
    if critic is not None:
        critic_workload = Workload("reward", workload.rows, workload.seq_len, 0, workload.gradient_checkpointing)
        critic_rows = {(row["optimizer"], row["zero_stage"], row["world_size"]): add_workload(
            row, critic, critic_workload, precision) for row in model_state_rows(critic, world_sizes, precision)}
        rows = [add_critic(row, critic_rows[row["optimizer"], row["zero_stage"], row["world_size"]]) for row in rows]
    return rows


def add_critic(row: dict, critic: dict) -> dict:
    """The actor's `row` with PPO's critic (its own planned row) added. The critic's weights, gradients
    and optimizer state persist like the actor's. Its forward and backward (activations, its gradient
    bucket), then its optimizer step, run after the actor's forward and before the actor's backward,
    so the actor's activations and logits are alive through them."""
    critic_phase = max(critic["activations_bytes"] + critic["deepspeed_bytes"], critic["optimizer_step_bytes"])
    forward_backward = row["activations_bytes"] + row["logits_bytes"] + max(row["deepspeed_bytes"], critic_phase)
    kept = row["kept_bytes"] + critic["kept_bytes"]
    phases = (forward_backward, row["generation_bytes"], row["scoring_bytes"], row["optimizer_step_bytes"])
    return dict(row, kept_bytes=int(kept), critic_bytes=int(critic["kept_bytes"]), critic_phase_bytes=int(critic_phase),
                critic_parameters=critic["parameters"], total_bytes=int(kept + row["frozen_bytes"] + max(phases)))


def frozen_numels(config, stage: str) -> dict:
    """Parameter counts of the frozen models, from their config.json where it exists (else the trained
    model's architecture is assumed)."""
    numels, spec = {}, STAGES[stage]
    if spec.samples:
        numels["reward"] = count_parameters(meta_reward_model(config, getattr(config, stage).reward_model_path))[0]
    if spec.reference:
        numels["reference"] = count_parameters(load_causal_lm(base_model_config(config), device="meta"))[0]
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
    workload = workload_of(config, stage_name, frozen_numels(config, stage_name))
    critic = build_meta_critic(config)
    rows = {row["optimizer"]: row for row in plan_rows(model, [world_size], config.engine.precision, workload, critic)
            if row["zero_stage"] == stage}
    states = planned_state_bytes(model, [world_size], [stage])
    chosen = rows[config.optim.name]
    lines = [f"dry run ({stage_name}): {config.model.path or 'model.config'} on the meta device, ZeRO-{stage}, "
             f"{world_size} rank(s), {config.engine.precision}, micro-batch {workload.rows} x {workload.seq_len} tokens"
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
    for key, label in (("activations_bytes", "activations"), ("logits_bytes", "logits and loss"),
                       ("deepspeed_bytes", "DeepSpeed buffers"), ("optimizer_step_bytes", "optimizer step"),
                       ("frozen_bytes", "frozen models"), ("generation_bytes", "generation"),
                       ("scoring_bytes", "scoring"), ("critic_bytes", "critic state"),
                       ("critic_phase_bytes", "critic training")):
        if chosen.get(key) or key in ("activations_bytes", "deepspeed_bytes"):
            lines.append(f"  {label:<22}{chosen[key] / GIB:>12.2f} GiB")
    lines.append("  peak = weights + gradients kept + optimizer state + frozen models + the largest phase "
                 "(activations + logits + DeepSpeed buffers, generation, scoring or optimizer step)"
                 + ("; PPO: the critic's state (weights, gradients, optimizer) persists too, and its training "
                    "(forward, backward, step) runs while the actor's activations and logits live"
                    if critic is not None else ""))
    lines.append("  peak per rank:")
    for name, row in rows.items():
        mark = "  <- chosen" if name == config.optim.name else ""
        lines.append(f"    {name:<20}{row['total_bytes'] / GIB:>12.2f} GiB{mark}")
    return "\n".join(lines)


def format_table(rows: list, gpu_memory_gib=None) -> str:
    header = ["optimizer", "ZeRO", "ranks", "params GiB", "grads GiB", "optim GiB"]
    keys = ["params_bytes", "grads_bytes", "optimizer_bytes"]
    if rows and "activations_bytes" in rows[0]:
        keys[1] = "kept_grads_bytes"  # what persists between steps; the fp32 rest is in the step column
        header += ["activ. GiB", "logits GiB", "DS GiB", "step GiB", "frozen GiB", "gen. GiB"]
        keys += ["activations_bytes", "logits_bytes", "deepspeed_bytes", "optimizer_step_bytes", "frozen_bytes",
                 "generation_bytes"]
    if rows and "critic_bytes" in rows[0]:  # PPO: the critic's persistent state and its training phase
        header += ["critic GiB", "critic phase GiB"]
        keys += ["critic_bytes", "critic_phase_bytes"]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-sizes", default="1,2,8", help="comma-separated rank counts")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU, to say what fits")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--stage", choices=list(STAGES), default=None,
                        help="the stage to plan for (default: from the config: its remax/dpo section, pairwise data "
                             "for reward, else sft)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        world_sizes = [int(size) for size in args.world_sizes.split(",")]
        if any(size <= 0 for size in world_sizes):
            raise ValueError
    except ValueError:
        parser.error(f"--world-sizes is {args.world_sizes!r}; give positive integers such as 1,2,8")
    try:
        stage = args.stage or _stage_in_file(args.config)
        config = load_config(config_class(stage), args.config, args.overrides)
        model = build_meta_model(config, stage)
        workload = workload_of(config, stage, frozen_numels(config, stage))
        critic = build_meta_critic(config) if STAGES[stage].critic else None
    except (ConfigError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = plan_rows(model, world_sizes, config.engine.precision, workload, critic)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows, args.gpu_memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
