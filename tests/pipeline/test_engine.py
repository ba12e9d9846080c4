"""The engine factory: batch arithmetic, the generated DeepSpeed config, optimizer injection,
the LR schedule, refusals, and the factory under 2 real DeepSpeed CPU ranks."""
import math

import pytest
import torch

from optimizers import Adam_mini
from pipeline.config import DataConfig, EngineConfig, ModelConfig, OptimConfig, RunConfig
from pipeline.optim import build_optimizer
from pipeline.engine import (MAX_LIVE_PARAMETERS, MAX_REUSE_DISTANCE, PARAM_PERSISTENCE_THRESHOLD,
                             PREFETCH_BUCKET_ELEMENTS, REDUCE_BUCKET_ELEMENTS, EngineConfigError, batch_plan,
                             build_ds_config, check_device, create_frozen_engine, frozen_ds_config, lr_multiplier,
                             reduce_bucket_elements)
from tests.conftest import launch_ranks, read_json
from tests.tiny_models import tiny_llama


def config(**sections) -> RunConfig:
    base = dict(output_dir="unused", model=ModelConfig(path="unused"), data=DataConfig(path="unused"))
    base.update(sections)
    return RunConfig(**base)


def test_batch_arithmetic_in_one_place():
    plan = batch_plan(config(engine=EngineConfig(micro_batch_size=4, gradient_accumulation_steps=3)), world_size=2)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.global_batch_size) == (4, 3, 24)
    derived = batch_plan(config(engine=EngineConfig(micro_batch_size=4, global_batch_size=32)), world_size=2)
    assert derived.gradient_accumulation_steps == 4


@pytest.mark.parametrize("engine, message", [
    (EngineConfig(micro_batch_size=4, global_batch_size=30), "`engine.global_batch_size` 30 is not a multiple"),
    (EngineConfig(micro_batch_size=4, global_batch_size=32, gradient_accumulation_steps=2),
     "`engine.gradient_accumulation_steps` 2 disagrees"),
])
def test_batch_sizes_that_do_not_divide_are_refused(engine, message):
    with pytest.raises(EngineConfigError, match=message):
        batch_plan(config(engine=engine), world_size=2)


def test_ds_config_is_explicit_about_everything_that_matters(monkeypatch):
    run = config(engine=EngineConfig(zero_stage=3, precision="bf16", offload_optimizer=True, offload_param=True,
                                     micro_batch_size=2, gradient_accumulation_steps=4),
                 optim=OptimConfig(gradient_clipping=0.5))
    ds = build_ds_config(run, batch_plan(run, world_size=2))
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_allow_untested_optimizer"] is True and ds["zero_force_ds_cpu_optimizer"] is False
    fp32 = build_ds_config(config(), batch_plan(config(), world_size=1))
    assert "bf16" not in fp32 and fp32["gradient_clipping"] == 1.0
    assert "offload_optimizer" not in fp32["zero_optimization"]
    # The buffer sizes the memory plan reads are the ones DeepSpeed gets, for frozen ZeRO-3 models too.
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == MAX_LIVE_PARAMETERS
    assert ds["zero_optimization"]["reduce_bucket_size"] == REDUCE_BUCKET_ELEMENTS
    monkeypatch.setattr("pipeline.engine.init_distributed", lambda: 2)  # no process group needed here
    frozen = frozen_ds_config(run, zero_stage=3)["zero_optimization"]
    for section in (ds["zero_optimization"], frozen):
        assert section["stage3_param_persistence_threshold"] == PARAM_PERSISTENCE_THRESHOLD
        assert section["stage3_max_reuse_distance"] == MAX_REUSE_DISTANCE
        assert section["stage3_prefetch_bucket_size"] == PREFETCH_BUCKET_ELEMENTS


def test_reduce_bucket_is_never_larger_than_the_gradients():
    assert reduce_bucket_elements(1234) == 1234  # a LoRA run: not 5e8 elements allocated for nothing
    assert reduce_bucket_elements(6_738_415_616) == REDUCE_BUCKET_ELEMENTS


def test_adam_mini_is_injected_with_the_models_geometry():
    optimizer = build_optimizer(OptimConfig(lr=2e-5, betas=[0.9, 0.95], weight_decay=0.1, shared_groups=False),
                                tiny_llama())
    assert isinstance(optimizer, Adam_mini)
    assert (optimizer.geometry.n_heads, optimizer.geometry.n_kv_heads, optimizer.geometry.head_dim) == (3, 1, 32)
    counts = optimizer.partition_report.as_dict()["rule_counts"]
    assert counts == {"element": 6, "lora": 0, "head": 4, "row": 12, "tensor": 5}
    decays = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decays["model.norm.weight"] == 0.0 and decays["model.layers.0.mlp.up_proj.bias"] == 0.0
    assert decays["model.layers.0.self_attn.q_proj.weight"] == 0.1


def test_adam_mini_shares_one_param_group_by_default():
    model = tiny_llama()
    shared = build_optimizer(OptimConfig(lr=2e-5, weight_decay=0.1), model)
    assert isinstance(shared, Adam_mini) and len(shared.param_groups) == 1
    assert shared.partition_report.as_dict()["rule_counts"] == {"element": 6, "lora": 0, "head": 4, "row": 12,
                                                                 "tensor": 5}
    per_parameter = build_optimizer(OptimConfig(lr=2e-5, shared_groups=False), model)
    assert len(per_parameter.param_groups) == len(list(model.parameters()))


def test_adamw_excludes_norms_and_biases_from_weight_decay():
    model = tiny_llama()
    optimizer = build_optimizer(OptimConfig(name="adamw", weight_decay=0.1), model)
    assert isinstance(optimizer, torch.optim.AdamW)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert names == {n for n, _ in model.named_parameters() if n.endswith("bias") or "norm" in n}


@pytest.mark.parametrize("scheduler, expected", [
    # 2 warm-up steps, then 4 decay steps to min_lr_ratio 0.1
    ("cosine", [1 / 3, 2 / 3, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55]),
    ("linear", [1 / 3, 2 / 3, 1.0, 0.1 + 0.9 * 0.75, 0.55]),
    ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0]),
])
def test_learning_rate_schedule(scheduler, expected):
    run = config(optim=OptimConfig(warmup_steps=2, scheduler=scheduler, min_lr_ratio=0.1))
    assert [lr_multiplier(step, run, total_steps=6) for step in range(5)] == pytest.approx(expected)
    assert lr_multiplier(6, run, total_steps=6) == pytest.approx(0.1 if scheduler != "constant" else 1.0)


def test_unsupported_combinations_are_refused_with_the_field():
    if not torch.cuda.is_available():
        with pytest.raises(EngineConfigError, match="`engine.precision` is fp16"):
            check_device(config(engine=EngineConfig(precision="fp16")))
    with pytest.raises(EngineConfigError, match="needs ZeRO-3"):
        create_frozen_engine(config(), tiny_llama(), zero_stage=2, offload=True)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "results.json"
    launch_ranks(2, ["tests/pipeline/engine_worker.py", "--out", out])
    return read_json(out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_factory_engine_matches_unsharded_training_on_two_ranks(two_ranks, stage):
    result = two_ranks[f"zero{stage}"]
    assert result["optimizer_is_ours"] and result["optimizer_type"] == "Adam_mini"
    assert result["rule_counts"] == {"element": 6, "lora": 0, "head": 4, "row": 12, "tensor": 5}
    assert result["global_batch_size"] == 2 * 2 * 2  # micro 2 x accumulation 2 x 2 ranks
    assert result["ds_config"]["zero_optimization"]["stage"] == stage
    assert result["recorded_ds_config"] == result["ds_config"]  # the run directory records what DeepSpeed got
    assert result["recorded_ds_config"]["zero_allow_untested_optimizer"] is True
    # Accumulation, clipping at 1.0 and the warm-up + cosine schedule all match a plain loop.
    assert max(result["max_delta_per_step"]) <= 1e-6
    expected_lrs = [1e-3 * lr_multiplier(step, _engine_worker_config(), 6) for step in range(6)]
    assert result["lrs"] == pytest.approx(expected_lrs, rel=1e-9)
    if stage == 3:  # the final export gathers the shards into a loadable safetensors model
        assert result["export_max_delta"] == 0.0
        assert "model.safetensors" in result["export_files"] and "tokenizer.json" in result["export_files"]


def _engine_worker_config():
    return config(optim=OptimConfig(lr=1e-3, warmup_steps=2, scheduler="cosine", min_lr_ratio=0.1))


@pytest.mark.slow
def test_ranks_leave_no_shared_memory_behind(two_ranks):
    # DeepSpeed's CPU all-reduce makes a 66 MiB /dev/shm file per rank and never removes it.
    assert two_ranks["shm_names_left"] == []


@pytest.mark.slow
@pytest.mark.parametrize("case", ["frozen_zero3", "frozen_zero3_offload"])
def test_frozen_zero3_engine_shards_weights_and_keeps_outputs(two_ranks, case):
    result = two_ranks[case]
    assert result["max_delta"] <= 1e-6
    assert result["trainable"] == 0
    assert result["local_numel"] * 2 == result["full_numel"]
