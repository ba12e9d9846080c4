"""benchmarks/peer_trl: both trainers run every step of each pair on the same settings, so the
ratios it prints compare like with like. (Its timings are for a quiet machine, not for a test.)"""
import json

from benchmarks.peer_trl import main, trl_common


def test_trl_runs_without_activation_checkpointing_like_ours(tmp_path):
    from trl import GRPOConfig, RewardConfig, SFTConfig

    for config_class in (SFTConfig, RewardConfig, GRPOConfig):
        args = config_class(**trl_common(tmp_path, 3))
        assert args.activation_checkpointing is False and args.gradient_checkpointing is False


def test_each_pair_takes_every_step_on_both_sides(tmp_path):
    report = tmp_path / "peer.json"
    assert main(["--steps", "4", "--warmup", "1", "--hidden", "64", "--layers", "1", "--pairs", "sft,reward",
                 "--json", str(report)]) == 0
    results = json.loads(report.read_text())
    assert sorted(results) == ["reward", "sft"]
    for pair in results.values():
        for side in ("ours", "trl"):
            assert pair[side]["steps"] == 4 and pair[side]["step_ms"] > 0 and pair[side]["first_step_s"] > 0
