"""Memory plans: a tiny model checked against bytes counted by hand, and Llama-2-7B with AdamW
against DeepSpeed's own estimators."""
import json

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import LlamaConfig, LlamaForCausalLM

from optimizers import Adam_mini
from pipeline.plan import main, plan_rows
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
    assert all(r["total_bytes"] == r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] for r in rows)


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
    assert row(rows, "adamw", 2, world_size)["total_bytes"] == pytest.approx(zero2, rel=0.05)
    assert row(rows, "adamw", 3, world_size)["total_bytes"] == pytest.approx(zero3, rel=0.05)
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
                            "optimizer_bytes", "total_bytes"}
    assert main(["--config", "nope.yaml"]) == 2
