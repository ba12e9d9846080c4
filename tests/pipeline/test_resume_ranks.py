"""Which checkpoints continue on another number of ranks, and where the data continues.

No ranks are started: the rank-count check reads only a checkpoint's files, and the data position
is arithmetic that a sampler check holds to the real `DistributedSampler` order."""
import json

import pytest
from torch.utils.data import DistributedSampler

from pipeline.checkpoint import RANKS_FILE, ResumeError, _check_rank_count
from pipeline.engine import BatchPlan
from pipeline.loop import Position, position_on_other_ranks


def fake_checkpoint(directory, world_size, record=None):
    directory.mkdir()
    for rank in range(world_size):
        (directory / f"rng_rank{rank}.pt").write_bytes(b"")
    if record is not None:
        (directory / RANKS_FILE).write_text(json.dumps(record))
    return directory


ADAM_MINI = {"world_size": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 3, "zero_stage": 2,
             "optimizer": "Adam_mini"}


def test_same_rank_count_needs_nothing_more(tmp_path):
    assert _check_rank_count(fake_checkpoint(tmp_path / "step_4", 2), 2, 999) is None


def test_adam_mini_with_the_same_global_batch_continues_on_another_count(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "step_4", 2, ADAM_MINI)
    assert _check_rank_count(checkpoint, 3, 12) == ADAM_MINI


@pytest.mark.parametrize("record, global_batch, reason", [
    (ADAM_MINI, 8, r"only with the same global batch.* it trained on 12 rows per step \(micro-batch 2 x "
                   r"accumulation 3 x 2 ranks\), this run's is 8; set engine.global_batch_size=12"),
    ({**ADAM_MINI, "optimizer": "AdamW"}, 12, r"it holds AdamW state under ZeRO-2; only Adam-mini's"),
    ({**ADAM_MINI, "zero_stage": 0}, 12, r"under ZeRO-0; only Adam-mini's under ZeRO-1/2/3"),
    (None, 12, r"it has no ranks.json"),
])
def test_other_checkpoints_are_refused_with_the_reason(tmp_path, record, global_batch, reason):
    checkpoint = fake_checkpoint(tmp_path / "step_4", 2, record)
    with pytest.raises(ResumeError, match=r"step_4 was written by 2 ranks but this run has 4: .*" + reason +
                       r".*Resume with 2 ranks \(NUM_GPUS=2\)"):
        _check_rank_count(checkpoint, 4, global_batch)


def rows_taken(world_size, micro_batch_size, accumulation, position, steps, num_rows=50, seed=7):
    """Rows each optimizer step takes from `position` on, by the loop's sampler (drop_last, per rank)."""
    per_rank = [list(DistributedSampler(range(num_rows), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True))[position.micro_batch * micro_batch_size:]
                for rank in range(world_size)]
    window = micro_batch_size * accumulation
    return [sorted(row for rank_rows in per_rank for row in rank_rows[step * window:(step + 1) * window])
            for step in range(steps)]


@pytest.mark.parametrize("saved_ranks, new_ranks", [(2, 3), (3, 2), (6, 1)])
def test_the_position_moves_so_every_later_step_takes_the_same_rows(saved_ranks, new_ranks):
    global_batch, micro_batch_size = 12, 2
    saved = {"world_size": saved_ranks, "micro_batch_size": micro_batch_size,
             "gradient_accumulation_steps": global_batch // (micro_batch_size * saved_ranks)}
    plan = BatchPlan(micro_batch_size, global_batch // (micro_batch_size * new_ranks), new_ranks)
    position = Position(step=5, epoch=1, micro_batch=2 * saved["gradient_accumulation_steps"])  # 2 steps into epoch 1
    moved = position_on_other_ranks(position, saved, plan)
    assert (moved.step, moved.epoch, moved.micro_batch) == (5, 1, 2 * plan.gradient_accumulation_steps)
    expected = rows_taken(saved_ranks, micro_batch_size, saved["gradient_accumulation_steps"], position, steps=2)
    assert rows_taken(new_ranks, micro_batch_size, plan.gradient_accumulation_steps, moved, steps=2) == expected


def test_a_position_inside_a_window_is_refused():
    saved = {"world_size": 2, "micro_batch_size": 1, "gradient_accumulation_steps": 3}
    with pytest.raises(ValueError, match="micro-batch 4 of epoch 0.* accumulation window of 3"):
        position_on_other_ranks(Position(1, 0, 4), saved, BatchPlan(1, 2, 3))
