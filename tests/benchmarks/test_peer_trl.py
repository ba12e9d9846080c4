"""benchmarks/peer_trl: each pair trains the same batch on both sides, in fp32, without activation
checkpointing, and both trainers take every step, so the ratios it prints compare like with like.
(Its timings are for a quiet machine, not for a test.)"""
import json

import pytest
import yaml

from benchmarks.peer_trl import (BATCH, PAIRS, SAMPLES, SAMPLING, main, our_config, our_per_step, our_stage, trl_args,
                                 trl_common, trl_per_step, trl_precision)


def test_trl_runs_fp32_without_activation_checkpointing_like_ours(tmp_path, monkeypatch):
    from trl import DPOConfig, GRPOConfig, RewardConfig, RLOOConfig, SFTConfig

    for config_class in (SFTConfig, RewardConfig, GRPOConfig, RLOOConfig, DPOConfig):
        args = config_class(**trl_common(tmp_path, 3))
        assert args.bf16 is False and args.fp16 is False and trl_precision(args) == "fp32", config_class.__name__
        # transformers 5.19 has only `gradient_checkpointing`; later 5.x add `activation_checkpointing` (the old name
        # mirrors it): off under either name.
        assert args.gradient_checkpointing is False and getattr(args, "activation_checkpointing", False) is False
        assert args.optim == "adamw_torch_fused"
    # Accelerate's own switch would still autocast: the benchmark sees it (and refuses to run).
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert trl_precision(SFTConfig(**trl_common(tmp_path, 3))) == "bf16"


def test_each_pair_sets_the_same_batch_on_both_sides(tmp_path):
    from pipeline.config import load_config

    for pair in PAIRS:
        config_file = tmp_path / f"{pair}.yaml"
        config_file.write_text(yaml.safe_dump(our_config(pair, tmp_path, 3)))
        ours = our_per_step(pair, load_config(our_stage(pair)[1], str(config_file)), world_size=1)
        assert ours == trl_per_step(pair, trl_args(pair, tmp_path, 3)), pair
        assert ours["sequences_trained"] == BATCH * (1 if pair == "sft" else 2), pair
        if pair in SAMPLING:
            assert ours["prompts"] == BATCH and ours["sequences_generated"] == BATCH * SAMPLES


@pytest.mark.slow
def test_every_pair_takes_every_step_on_the_same_batch(tmp_path):
    report = tmp_path / "peer.json"
    assert main(["--steps", "3", "--warmup", "1", "--hidden", "64", "--layers", "1", "--json", str(report)]) == 0
    results = json.loads(report.read_text())
    assert sorted(results) == sorted(PAIRS)
    for name, pair in results.items():
        for side in ("ours", "trl"):
            assert pair[side]["steps"] == 3 and pair[side]["step_ms"] > 0 and pair[side]["first_step_s"] > 0, name
            assert pair[side]["precision"] == "fp32" and pair[side]["activation_checkpointing"] is False, name
        # As each side resolved its own settings: rows / pairs / prompts, sequences trained (and generated).
        assert pair["ours"]["per_step"] == pair["trl"]["per_step"], name
        assert ("sequences_generated" in pair["ours"]["per_step"]) == (name in SAMPLING), name
