"""Checkpoints: RNG round trips, finding and pruning on disk, and an exact resume under real DeepSpeed ranks.

The multi-rank test launches checkpoint_worker.py once (2 ranks, ZeRO-2 then ZeRO-3) and reads its figures.
"""
import random
import re

import numpy as np
import pytest
import torch

from pipeline.checkpoint import (COMPLETE_MARKER, ResumeError, capture_rng_state, latest_checkpoint, load_checkpoint,
                                 prune_checkpoints, restore_rng_state, save_checkpoint)
from tests.conftest import launch_ranks, read_json

WORKER_LR, WORKER_STEPS = 1e-3, 6  # checkpoint_worker.py: lr * (step + 1) / (2 * steps) warmup


def draws() -> dict:
    return {"python": [random.random() for _ in range(3)], "numpy": np.random.rand(3).tolist(),
            "torch": torch.rand(3).tolist()}


def make_checkpoint_dirs(output_dir, complete=(), incomplete=()):
    root = output_dir / "checkpoints"
    for step in (*complete, *incomplete):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    for step in complete:
        (root / f"step_{step}" / COMPLETE_MARKER).write_text(f"{step}\n")
    return root


def names(root) -> list:
    return sorted(path.name for path in root.iterdir())


# ---- RNG ----------------------------------------------------------------------------------------

def test_restored_rng_state_repeats_every_generators_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = draws()
    moved_on = draws()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected
    assert moved_on != expected  # the draws after the first ones differ, so equality above means something


def test_rng_state_survives_gaussian_caches():
    # Python and numpy keep the second of each pair of normal draws in their state.
    random.gauss(0, 1)
    np.random.standard_normal()
    state = capture_rng_state()
    expected = (random.gauss(0, 1), float(np.random.standard_normal()), torch.randn(2).tolist())
    restore_rng_state(state)
    assert (random.gauss(0, 1), float(np.random.standard_normal()), torch.randn(2).tolist()) == expected


# ---- finding and pruning ------------------------------------------------------------------------

def test_latest_checkpoint_is_the_highest_complete_step(tmp_path):
    root = make_checkpoint_dirs(tmp_path, complete=(2, 9, 10), incomplete=(12,))
    (root / "latest").write_text("step_12")  # DeepSpeed's own pointer is not what decides
    (root / "step_x").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step_10"  # 10 > 9 numerically, and 12 is incomplete


def test_latest_checkpoint_is_none_without_a_complete_one(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    make_checkpoint_dirs(tmp_path, incomplete=(4,))
    assert latest_checkpoint(tmp_path) is None


def test_prune_keeps_the_newest_and_drops_older_incomplete(tmp_path):
    root = make_checkpoint_dirs(tmp_path, complete=(1, 2, 4, 5), incomplete=(3, 7))
    deleted = prune_checkpoints(tmp_path, keep_last=2, protect=root / "step_5")
    assert sorted(path.name for path in deleted) == ["step_1", "step_2", "step_3"]
    assert names(root) == ["step_4", "step_5", "step_7"]  # step_7 is newer than any complete one


def test_prune_never_deletes_the_protected_checkpoint(tmp_path):
    # A stale, higher-numbered checkpoint is newer by step than the one just written.
    root = make_checkpoint_dirs(tmp_path, complete=(1, 2, 9))
    prune_checkpoints(tmp_path, keep_last=1, protect=root / "step_2")
    assert names(root) == ["step_2", "step_9"]


# ---- errors before any engine work --------------------------------------------------------------

def test_load_refuses_a_checkpoint_without_complete(tmp_path):
    root = make_checkpoint_dirs(tmp_path, incomplete=(5,))
    with pytest.raises(ResumeError, match="step_5 is not a complete checkpoint"):
        load_checkpoint(engine=None, checkpoint=root / "step_5")


@pytest.mark.parametrize("keep_last, trainer_state, error, message", [
    (0, {}, ValueError, "keep_last is 0"),
    (2, {"step": 4}, ValueError, r'trainer_state\["step"\] is 4 but the checkpoint is for step 3'),
    (2, {"sampler": object()}, TypeError, "not JSON serializable"),
])
def test_save_rejects_bad_arguments_before_writing(tmp_path, keep_last, trainer_state, error, message):
    with pytest.raises(error, match=message):
        save_checkpoint(engine=None, output_dir=tmp_path, step=3, trainer_state=trainer_state, keep_last=keep_last)
    assert not (tmp_path / "checkpoints").exists()


# ---- exact resume under DeepSpeed ---------------------------------------------------------------

@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint_worker")
    launch_ranks(2, ["tests/pipeline/checkpoint_worker.py", "--out", out / "results.json",
                     "--output-dir", out / "run"], timeout=300)
    return read_json(out / "results.json")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_resumed_run_matches_uninterrupted_bitwise(resumed, stage):
    result = resumed[stage]
    assert result["loaded"] == "step_3"  # not the incomplete step_5 beside it
    assert result["trainer_state"] == {"step": 3, "epoch": 0, "batch_index": 3}
    assert result["fresh_max_delta"] > 0.01  # the fresh engine started from other weights
    for rank in result["ranks"]:
        assert rank["resume_max_delta"] == 0.0
        assert rank["resumed_draws"] == rank["uninterrupted_draws"]
    # Each rank got its own RNG streams back, not rank 0's.
    assert result["ranks"][0]["resumed_draws"] != result["ranks"][1]["resumed_draws"]
    assert result["resumed_lr"] == result["uninterrupted_lr"] == pytest.approx(
        WORKER_LR * (WORKER_STEPS + 1) / (2 * WORKER_STEPS))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_checkpoints_on_disk_are_complete_and_pruned(resumed, stage):
    result = resumed[stage]
    files = result["saved_files"]
    assert {"COMPLETE", "trainer_state.json", "rng_rank0.pt", "rng_rank1.pt"} <= set(files)
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(files)
    assert result["after_first_run"] == ["step_2", "step_3"]  # saved at 1, 2, 3 with keep_last 2
    # Saving step 6 dropped step_2 (beyond keep_last) and the incomplete step_5 (older than step_6).
    assert result["after_resumed_save"] == ["step_3", "step_6"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_tampered_checkpoints_are_refused_naming_the_file_and_run_no_code(resumed, stage):
    tampered = resumed[stage]["tampered"]
    assert tampered["payload_ran"] is False
    # COMPLETE as written: the first replaced file (in sorted order) fails its SHA-256.
    assert re.search(r"tampered_payload/checkpoints/step_6/\S+\.pt differs from what was written", tampered["payload"])
    # COMPLETE rewritten to match: the files pass their SHA-256, and unpickling refuses the payload.
    assert re.search(r"tampered_payload_rehashed/checkpoints/step_6/\S+\.pt holds objects other than tensors",
                     tampered["payload_rehashed"])
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt differs from what was written" in tampered["flipped"]
