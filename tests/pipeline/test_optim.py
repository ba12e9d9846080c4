"""The optimizer table: every entry builds, plans the state it then really holds, and checks its values."""
import pytest
import torch

from pipeline.config import OptimConfig
from pipeline.optim import OPTIMIZERS, build_optimizer, held_state_bytes, planned_state_bytes, zero_slice_numel
from tests.tiny_models import tiny_llama


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_entry_plans_the_state_it_holds_after_a_step(name):
    model = tiny_llama()
    optimizer = build_optimizer(OptimConfig(name=name, lr=1e-3), model)
    ids = torch.arange(24).reshape(2, 12)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    planned = planned_state_bytes(model, [1], [0])[name, 1, 0]
    held = held_state_bytes(optimizer)
    # Per-parameter step counters (a 0-dim tensor each in torch's AdamW) are the only state not planned.
    assert 0 <= held - planned <= 4 * len(list(model.parameters()))
    assert planned > 0


def test_the_plan_shards_state_as_deepspeed_does():
    # ZeRO-1/2: one flat group padded to a multiple of 2 x ranks, split evenly; ZeRO-3: each tensor on its own.
    assert zero_slice_numel([5, 6], 2, 0, 2) == 6 and zero_slice_numel([5, 6], 2, 1, 2) == 5
    assert zero_slice_numel([5, 6], 2, 0, 3) == 3 + 3 and zero_slice_numel([5, 6], 2, 1, 3) == 2 + 3
    assert zero_slice_numel([5, 6], 2, 1, 0) == 11


def test_adam_mini_keeps_about_half_of_adamws_state():
    with torch.device("meta"):
        model = tiny_llama()
    planned = planned_state_bytes(model, [2], [2])
    assert planned["adam_mini", 2, 2] / planned["adamw", 2, 2] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_entry_checks_the_values_it_would_refuse(name):
    entry = OPTIMIZERS[name]
    assert entry.problems(OptimConfig(name=name)) == []
    problems = entry.problems(OptimConfig(name=name, lr=0.0, betas=[0.9, 1.0], eps=-1.0))
    assert [problem.split("`")[1] for problem in problems] == ["optim.lr", "optim.betas", "optim.eps"]
