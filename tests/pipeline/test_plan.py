"""Memory plans: a tiny model checked against bytes counted by hand, Llama-2-7B with AdamW against
DeepSpeed's own estimators, ZeRO-3's gathered weights against a DeepSpeed engine's, and the README's
7B table against the plan (tests/benchmarks/test_memory_vs_plan.py holds whole plans to measurement)."""
import json
import re
import weakref

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import LlamaConfig, LlamaForCausalLM

from optimizers import Adam_mini
from pipeline.config import DataConfig, EngineConfig, ModelConfig, RunConfig
from pipeline.models import enable_gradient_checkpointing
from pipeline.packing import collate_packed_sft, model_inputs
from pipeline.plan import (Geometry, Workload, kv_cache_bytes, logits_bytes, main, persistent_numel, plan_rows,
                           saved_activation_bytes, workload_of, zero3_gathered_numel)
from tests.conftest import REPO_ROOT
from tests.tiny_models import tiny_llama


def row(rows, optimizer, stage, world_size):
    return next(r for r in rows if (r["optimizer"], r["zero_stage"], r["world_size"]) == (optimizer, stage, world_size))


def test_tiny_model_bytes_by_hand():
    model = tiny_llama()
    numel = sum(p.numel() for p in model.parameters())
    rows = plan_rows(model, [1, 2], precision="fp32")
    # fp32, one rank, ZeRO-0: weights and gradients 4 bytes each; AdamW two fp32 states per element.
    single = row(rows, "adamw", 0, 1)
    assert (single["params_bytes"], single["grads_bytes"], single["optimizer_bytes"]) == (4 * numel, 4 * numel,
                                                                                           8 * numel)
    # Adam-mini's state is what the optimizer itself says: m per element, v per block.
    layouts = Adam_mini(model.named_parameters(), dim=96, n_heads=3, n_kv_heads=1).partition_report.layouts
    blocks = sum(layout.num_blocks for layout in layouts)
    assert row(rows, "adam_mini", 0, 1)["optimizer_bytes"] == 4 * (numel + blocks)
    # ZeRO-2 on 2 ranks: gradients and optimizer state halve (to the nearest padded slice), weights do not.
    sharded = row(rows, "adamw", 2, 2)
    assert sharded["params_bytes"] == 4 * numel and sharded["grads_bytes"] == 2 * numel
    assert 8 * numel / 2 <= sharded["optimizer_bytes"] <= 8 * numel / 2 * 1.001
    assert all(r["total_bytes"] == r["model_states_bytes"]
               == r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] for r in rows)


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_llama2_7b_adamw_agrees_with_deepspeed_estimators(world_size):
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    rows = plan_rows(model, [world_size], precision="bf16")
    total = sum(p.numel() for p in model.parameters())
    zero2 = estimate_zero2_model_states_mem_needs(total, world_size, 1, cpu_offload=False)[1]
    zero3 = estimate_zero3_model_states_mem_needs(total, 32000 * 4096, world_size, 1, cpu_offload=False,
                                                  cpu_offload_params=False)[1]
    assert row(rows, "adamw", 2, world_size)["model_states_bytes"] == pytest.approx(zero2, rel=0.05)
    assert row(rows, "adamw", 3, world_size)["model_states_bytes"] == pytest.approx(zero3, rel=0.05)
    mini, adamw = row(rows, "adam_mini", 2, world_size), row(rows, "adamw", 2, world_size)
    fp32_master = 4 * total / (world_size if world_size > 1 else 1)
    assert (mini["optimizer_bytes"] - fp32_master) / (adamw["optimizer_bytes"] - fp32_master) == pytest.approx(0.5, abs=0.002)


def test_json_rows_from_a_config(capsys):
    code = main(["--config", str(REPO_ROOT / "configs/llama2-7b/remax.yaml"), "--world-sizes", "2", "--json",
                 f"model.path={REPO_ROOT / 'configs/llama2-7b/llama-2-7b'}"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 * 4
    assert set(rows[0]) >= {"optimizer", "zero_stage", "world_size", "params_bytes", "grads_bytes",
                            "optimizer_bytes", "total_bytes", "activations_bytes", "logits_bytes", "generation_bytes",
                            "frozen_bytes", "deepspeed_bytes", "optimizer_step_bytes"}
    assert all(r["stage"] == "remax" and r["generation_bytes"] > 0 for r in rows)
    assert main(["--config", "nope.yaml"]) == 2


def saved_bytes_of_forward(model, **inputs) -> int:
    """Bytes of the distinct storages autograd saves for the backward in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model(**inputs, use_cache=False)
    return sum(saved.values())


def forward_inputs(layout: str) -> tuple:
    """(rows, length, inputs) of a padded batch, or of 4 rows packed into one sequence (pipeline.packing)."""
    generator = torch.Generator().manual_seed(0)
    if layout == "packed":
        rows = [torch.randint(0, 203, (n,), generator=generator).tolist() for n in (20, 7, 30, 9)]
        batch = collate_packed_sft([[{"input_ids": ids, "labels": ids} for ids in rows]])
        return 1, batch["input_ids"].shape[1], model_inputs(batch)
    input_ids = torch.randint(0, 203, (2, 48), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0  # padding: the additive mask is built and kept
    return 2, 48, {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("layout", ["padded", "packed"])  # packed: one sequence, the mask block-diagonal
@pytest.mark.parametrize("kv_heads", [3, 1], ids=["mha", "gqa"])  # 3 query heads: 1 KV head is grouped attention
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_planned_activations_are_the_tensors_autograd_saves(dtype, kv_heads, layout):
    rows, length, inputs = forward_inputs(layout)
    for checkpointing in (False, True):
        model = tiny_llama(num_hidden_layers=1, num_key_value_heads=kv_heads, mlp_bias=False, dtype=dtype).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        measured = saved_bytes_of_forward(model, **inputs)
        a = 2 if dtype == torch.bfloat16 else 4
        planned = saved_activation_bytes(Geometry.of(model.config), rows, length, a, checkpointing)
        # The plan counts the LM head's input (the last norm's output, a x hidden per token), which this
        # forward of the base model does not build.
        lm_head_input = a * 96 * rows * length
        if checkpointing:
            # The layer's input and the mask are held by the checkpoint (not all through autograd's hooks):
            # the plan may exceed the hooks' count by those, never fall below it.
            held_by_checkpoint = a * 96 * rows * length + a * rows * length * length
            assert measured <= planned - lm_head_input <= measured + held_by_checkpoint
        else:
            assert planned - lm_head_input == measured


def test_logits_kv_cache_and_workloads_by_hand():
    # bf16 logits, their fp32 upcast and the fp32 log-softmax: 2 + 4 + 4 bytes per cell; fp32 logits: 4 + 4.
    assert logits_bytes(2, 10, 100, 2, training=True) == 2 * 10 * 100 * 10
    assert logits_bytes(2, 10, 100, 4, training=True) == 2 * 10 * 100 * 8
    assert logits_bytes(2, 10, 100, 2, training=False) == 2 * 10 * 100 * 6
    assert logits_bytes(2, 0, 100, 2, training=True) == 0  # a reward model computes no logits
    # Chunked (pipeline.chunked_logits): one chunk's bf16 logits and fp32 upcast, 6 bytes a cell (fp32: the logits
    # alone, 4); with the entropy an fp32 buffer more, 8; a chunk wider than the batch holds the batch.
    assert logits_bytes(2, 10, 100, 2, training=True, chunk=4) == 4 * 100 * 6
    assert logits_bytes(2, 10, 100, 4, training=True, chunk=4) == 4 * 100 * 4
    assert logits_bytes(2, 10, 100, 2, training=False, chunk=4, entropy=True) == 4 * 100 * 8
    assert logits_bytes(2, 10, 100, 2, training=True, chunk=1024) == 2 * 10 * 100 * 6
    geometry = Geometry.of(tiny_llama().config)  # 2 layers, 1 KV head of 32
    assert kv_cache_bytes(geometry, 4, 20, 2) == 2 * 2 * 4 * 20 * 1 * 32 * 2
    config = RunConfig(model=ModelConfig(config={"model_type": "llama"}), data=DataConfig(path="x", max_length=64),
                       engine=EngineConfig(micro_batch_size=3))
    assert (workload_of(config, "reward").rows, workload_of(config, "reward").logit_positions) == (6, 0)
    assert (workload_of(config, "sft").rows, workload_of(config, "sft").logit_positions) == (3, 64)
    assert workload_of(config, "sft").logits_chunk == config.model.logits_chunk == 1024
    # Packed: the micro-batch's 3 packs as one sequence of their budget (default: a row; a pair's two).
    config.data.packing = True
    sft = workload_of(config, "sft")
    assert (sft.rows, sft.seq_len, sft.logit_positions) == (1, 3 * 64, 3 * 64)
    config.data.format = "pairwise"
    reward = workload_of(config, "reward")
    assert (reward.rows, reward.seq_len, reward.logit_positions) == (1, 3 * 128, 0)
    config.data.packing_tokens = 500
    assert workload_of(config, "reward").seq_len == 3 * 500


def test_a_run_rewarded_by_functions_alone_plans_no_reward_model():
    from pipeline.config import load_config
    from pipeline.plan import frozen_numels
    from stages.grpo import GrpoConfig

    base = ["model.config={model_type: llama}", "data.path=d", "data.format=prompt", "engine.micro_batch_size=2",
            "grpo.max_new_tokens=32", "data.max_length=64", "data.max_prompt_length=32"]
    with_model = load_config(GrpoConfig, None, [*base, "grpo.reward_model_path=r"])
    functions = load_config(GrpoConfig, None, [*base, "reward.functions=[{name: math_answer}]"])
    assert [name for name, *_ in workload_of(with_model, "grpo").frozen] == ["reference", "reward"]
    assert [name for name, *_ in workload_of(functions, "grpo").frozen] == ["reference"]
    assert set(frozen_numels(functions, "grpo")) == {"reference"}
    model = tiny_llama()
    numel = sum(p.numel() for p in model.parameters())
    rows = {name: row(plan_rows(model, [2], "fp32", workload_of(config, "grpo")), "adam_mini", 2, 2)
            for name, config in (("with_model", with_model), ("functions", functions))}
    # Frozen at ZeRO-0, fp32: a whole copy each; the tiny model stands in for both (no sizes given).
    assert rows["with_model"]["frozen_bytes"] == 2 * 4 * numel and rows["functions"]["frozen_bytes"] == 4 * numel


def test_peak_adds_workload_to_what_persists():
    model = tiny_llama()
    config = RunConfig(model=ModelConfig(config={"model_type": "llama"}), data=DataConfig(path="x", max_length=32),
                       engine=EngineConfig(micro_batch_size=2, precision="bf16"))
    rows = plan_rows(model, [2], "bf16", workload_of(config, "sft"))
    for r in rows:
        forward_backward = r["activations_bytes"] + r["logits_bytes"] + r["deepspeed_bytes"]
        phases = (forward_backward, r["optimizer_step_bytes"], r["reduction_bytes"])
        assert r["total_bytes"] == r["kept_bytes"] + max(phases)
        assert r["total_bytes"] > r["kept_bytes"] > 0
    zero2 = row(rows, "adamw", 2, 2)
    numel = sum(p.numel() for p in model.parameters())
    # ZeRO-2 keeps no gradients between steps: its 16-bit partition is built when the bucket is reduced
    # (the bucket and its flattened copy: 2 x 2 bytes per element) and freed by the step, which flattens
    # it and casts it to fp32 (2 + 2 + 4 bytes per element of the rank's half).
    assert zero2["kept_bytes"] == zero2["params_bytes"] + zero2["optimizer_bytes"]
    assert zero2["reduction_bytes"] == 4 * numel
    assert zero2["optimizer_step_bytes"] == 8 * numel // 2


def layer_input_bytes_kept(model, input_ids) -> int:
    """Bytes of the decoder layers' inputs the graph still holds once the forward is done (a weak reference
    to each dies when nothing but the reference is left)."""
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: inputs.append((weakref.ref(args[0]),
                                                                                  args[0].nbytes)))
             for layer in model.model.layers]
    loss = model(input_ids=input_ids, labels=input_ids).loss
    kept = sum(nbytes for reference, nbytes in inputs if reference() is not None)
    for hook in hooks:
        hook.remove()
    del loss
    return kept


def test_offloaded_activations_are_planned_in_host_memory():
    """`model.offload_activations`: what leaves the graph (measured: the layer inputs it no longer holds) is
    what the plan moves to the host, and the device keeps one layer's input, back for its recompute."""
    rows, length, layers = 2, 24, 3
    input_ids = torch.randint(0, 203, (rows, length), generator=torch.Generator().manual_seed(0))
    freed = {}
    for offload in (False, True):
        model = tiny_llama(num_hidden_layers=layers).train()
        enable_gradient_checkpointing(model, offload)
        freed[offload] = layer_input_bytes_kept(model, input_ids)
    plans = {}
    for offload in (False, True):
        config = RunConfig(model=ModelConfig(config={"model_type": "llama"}, gradient_checkpointing=True,
                                             offload_activations=offload),
                           data=DataConfig(path="x", max_length=length), engine=EngineConfig(micro_batch_size=rows))
        plans[offload] = row(plan_rows(model, [1], "fp32", workload_of(config, "sft")), "adamw", 0, 1)
    moved = freed[False] - freed[True]
    assert moved == layers * 4 * 96 * rows * length  # every layer's fp32 input
    assert plans[True]["host_bytes"] == moved and plans[False]["host_bytes"] == 0
    assert plans[False]["activations_bytes"] - plans[True]["activations_bytes"] == moved - moved // layers
    assert plans[False]["total_bytes"] - plans[True]["total_bytes"] == moved - moved // layers


def test_offloaded_optimizer_by_hand():
    """`engine.offload_optimizer`, bf16, ZeRO-2 on 2 ranks: fp32 master weights, AdamW's two states and the
    fp32 gradient partition move to the host; the device keeps the bf16 weights and a bf16 buffer of the
    largest parameter (the embedding), and its step casts nothing."""
    model = tiny_llama()
    numel = sum(p.numel() for p in model.parameters())
    embedding = 203 * 96
    config = RunConfig(model=ModelConfig(config={"model_type": "llama"}), data=DataConfig(path="x", max_length=32),
                       engine=EngineConfig(micro_batch_size=2, precision="bf16", offload_optimizer=True))
    offloaded = row(plan_rows(model, [2], "bf16", workload_of(config, "sft")), "adamw", 2, 2)
    assert offloaded["optimizer_bytes"] == 0 and offloaded["optimizer_step_bytes"] == 0
    assert offloaded["kept_bytes"] == 2 * numel + 2 * embedding
    # master, exp_avg and exp_avg_sq (fp32, each rank's half, padded to a few elements) and the fp32 gradients
    assert 16 * numel / 2 <= offloaded["host_bytes"] <= 16 * numel / 2 * 1.001


def test_ppo_plans_its_critic_as_a_second_trained_model(capsys):
    """The 7B PPO config: the actor's rows as for any policy stage, plus the critic (the reward model's
    backbone and v_head) with its own weights, gradients and optimizer state, and its training phase
    inside the actor's forward/backward (the critic steps before the actor's backward)."""
    from pipeline.config import load_config
    from pipeline.models import RewardModel
    from pipeline.plan import build_meta_critic, config_class

    config_file = str(REPO_ROOT / "configs/llama2-7b/ppo.yaml")
    config = load_config(config_class("ppo"), config_file)
    critic = build_meta_critic(config)
    assert isinstance(critic, RewardModel)
    critic_numel = sum(p.numel() for p in critic.parameters())
    assert critic_numel == pytest.approx(6.61e9, rel=0.01)  # Llama-2-7B less its LM head, plus a v_head

    assert main(["--config", config_file, "--world-sizes", "2,8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for r in rows:
        # The critic is planned as what it is, a trained reward model on the actor's sequences (8 prompts x
        # 1024 tokens, scoring every position): its state persists next to the actor's, its training runs
        # inside the actor's forward/backward.
        critic_training = row(plan_rows(critic, [r["world_size"]], "bf16", Workload("reward", 8, 1024, 0, True)),
                              r["optimizer"], r["zero_stage"], r["world_size"])
        assert r["critic_bytes"] == critic_training["kept_bytes"]
        assert r["critic_phase_bytes"] == max(critic_training["forward_backward_bytes"],
                                              critic_training["optimizer_step_bytes"],
                                              critic_training["reduction_bytes"])
        # Actor forward, then the critic's forward/backward, reduction and step (the actor's activations,
        # logits and gathered weights alive; its gradient bucket not yet), then the actor's backward.
        alive = r["activations_bytes"] + r["logits_bytes"] + r["gathered_bytes"]
        forward_backward = alive + max(r["deepspeed_bytes"] - r["gathered_bytes"], r["critic_phase_bytes"])
        phases = (forward_backward, r["generation_bytes"], r["scoring_bytes"], r["optimizer_step_bytes"],
                  r["reduction_bytes"])
        assert r["total_bytes"] == pytest.approx(r["kept_bytes"] + r["frozen_bytes"] + max(phases), abs=8)
    gib = 2**30
    # At 2 ranks PPO's two trained 7B models do not fit an 80 GB card at any ZeRO stage; at 8 ranks ZeRO-2 does.
    assert min(r["total_bytes"] for r in rows if r["world_size"] == 2) > 80 * gib
    assert row(rows, "adam_mini", 2, 8)["total_bytes"] < 80 * gib


def test_readme_7b_table_is_the_plans(capsys, monkeypatch):
    """The README's Llama-2-7B table is the output of the command its marker names, for the plan as it
    is now: a change to the plan, the configs or DeepSpeed's settings that moves a figure fails here
    until the table is regenerated."""
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"<!-- generated by `python -m pipeline\.plan ([^`]*)`[^>]*-->\n(.*?)"
                      r"<!-- end of generated table -->", readme, re.S)
    assert match, "README.md has no generated plan table"
    monkeypatch.chdir(REPO_ROOT)
    assert main(match.group(1).split()) == 0
    assert capsys.readouterr().out == match.group(2)


def zero3_engine_gathered_numel(model, reuse_distance: int) -> int:
    """Elements DeepSpeed's ZeRO-3 holds gathered when the backward of the second step starts (the first
    traces the modules), counted from the parameters' own status, in a world of one."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from pipeline.engine import init_distributed

    init_distributed()
    # Nothing prefetched and nothing kept whole, so what is gathered is what the reuse distance keeps.
    zero = {"stage": 3, "stage3_max_reuse_distance": reuse_distance, "stage3_prefetch_bucket_size": 0,
            "stage3_param_persistence_threshold": 0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9})
    input_ids = torch.randint(0, 203, (1, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        gathered = sum(p.ds_numel for p in model.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE)
        engine.backward(loss)
        engine.step()
    engine.destroy()
    return gathered


# A 4-layer tiny Llama: ~71k elements a layer, 19,584 in the head and final norm. 40k keeps the head and the
# last layer's MLP, 1e9 everything; with checkpointing only the limits are compared (see zero3_gathered_numel).
@pytest.mark.parametrize("reuse_distance,checkpointing", [(0, False), (40_000, False), (150_000, False),
                                                          (10**9, False), (0, True), (10**9, True)])
def test_zero3_gathered_weights_are_deepspeeds(reuse_distance, checkpointing):
    model = tiny_llama(num_hidden_layers=4)
    if checkpointing:
        enable_gradient_checkpointing(model)
    planned = zero3_gathered_numel(model, checkpointing, reuse_distance=reuse_distance, prefetch=0, threshold=0)
    measured = zero3_engine_gathered_numel(model, reuse_distance)
    # The plan takes a layer's modules in registration order, where Llama's two norms (96 elements each)
    # come last; DeepSpeed traces them as they run, first in their blocks.
    assert abs(planned - measured) <= 2 * 96
    assert measured > 0 or reuse_distance == 0


def test_zero3_keeps_parameters_under_the_threshold_whole_by_hand():
    """The suite's narrow and wide Llamas (tests/benchmarks/test_memory_vs_plan.py): at width 256 with an MLP
    of 384 every matrix of a layer has at most 1e5 elements and stays whole on every rank; at 320 only
    the norms do."""
    def meta_llama(width):
        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(vocab_size=16384, hidden_size=width, intermediate_size=384,
                                                num_hidden_layers=12, num_attention_heads=width // 64,
                                                num_key_value_heads=width // 64, tie_word_embeddings=False))
    assert persistent_numel(meta_llama(256)) == 12 * (4 * 256 * 256 + 3 * 256 * 384 + 2 * 256) + 256
    assert persistent_numel(meta_llama(320)) == 12 * 2 * 320 + 320
    narrow = meta_llama(256)
    total = sum(p.numel() for p in narrow.parameters())
    config = RunConfig(model=ModelConfig(config={"model_type": "llama"}), data=DataConfig(path="x", max_length=32),
                       engine=EngineConfig(micro_batch_size=2, precision="bf16", zero_stage=3))
    zero3 = row(plan_rows(narrow, [2], "bf16", workload_of(config, "sft")), "adamw", 3, 2)
    # bf16: each rank's half of every parameter, and the layers whole besides.
    assert zero3["params_bytes"] == 2 * total / 2 + 2 * (12 * (4 * 256 * 256 + 3 * 256 * 384 + 2 * 256) + 256)
