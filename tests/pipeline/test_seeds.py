"""Runs of one setting under several seeds: grouping from the resolved configs, and the t-test that
says whether two settings differ beyond the seeds' spread."""
import statistics

import pytest
import yaml

from pipeline.seeds import compare_seeds, mean_std, seed_groups


def config(root, seed, lr=1e-3):
    """A ReMax run of a pipeline under `root`: its own SFT policy and reward model beside it."""
    return {"seed": seed, "output_dir": f"{root}/remax", "model": {"path": f"{root}/sft/final"},
            "remax": {"reward_model_path": f"{root}/reward/final", "kl_coef": 0.05},
            "optim": {"name": "adam_mini", "lr": lr}, "data": {"path": "data/prompts.jsonl"}}


def test_runs_that_differ_only_by_seed_and_their_own_paths_are_one_group():
    configs = {f"adamw-seed{seed}/remax": config(f"runs/cmp/adamw-seed{seed}", seed) for seed in range(3)}
    configs["fast-seed0/remax"] = config("runs/cmp/fast-seed0", 0, lr=3e-3)  # another setting
    configs["fast-seed1/remax"] = config("runs/cmp/fast-seed1", 1, lr=3e-3)
    configs["no_config"] = {}
    groups = seed_groups(configs)
    assert groups == {"adamw/remax": ["adamw-seed0/remax", "adamw-seed1/remax", "adamw-seed2/remax"],
                      "fast/remax": ["fast-seed0/remax", "fast-seed1/remax"], "no_config": ["no_config"]}


def test_a_shared_path_outside_the_runs_own_directory_still_tells_settings_apart():
    first, second = config("runs/a", 0), config("runs/a", 1)
    second["data"]["path"] = "data/other.jsonl"
    assert len(seed_groups({"x": first, "y": second})) == 2
    # The same data under two seeds, each run's own SFT policy: one group, named by its first run.
    assert seed_groups({"x": first, "y": config("runs/b", 1)}) == {"x": ["x", "y"]}


def test_resolved_configs_are_read_as_data(tmp_path):
    from pipeline.seeds import read_run_config

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 1\nmodel: !!python/object/apply:os.system ['true']\n")
    assert read_run_config(tmp_path / "run") == {}  # safe_load refuses the tag: a group of its own
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config("runs/a", 2)))
    assert read_run_config(tmp_path / "run")["seed"] == 2


def test_seed_comparison_is_a_pooled_two_sample_t_test():
    hf = [0.50, 0.52, 0.54]  # mean 0.52, std 0.02
    assert mean_std(hf) == (pytest.approx(0.52), pytest.approx(statistics.stdev(hf)))
    close = compare_seeds(hf, [0.53, 0.55, 0.57])  # mean 0.55, std 0.02
    # pooled std 0.02; standard error of the difference 0.02 * sqrt(2 / 3) = 0.016330; t = 0.03 / 0.016330
    assert close["difference"] == pytest.approx(0.03) and close["pooled_std"] == pytest.approx(0.02)
    assert close["t"] == pytest.approx(1.83712, rel=1e-4) and close["df"] == 4 and close["t_critical"] == 2.776
    assert close["within_noise"]
    far = compare_seeds(hf, [0.70, 0.72, 0.74])
    assert far["t"] == pytest.approx(12.2474, rel=1e-4) and not far["within_noise"]
    assert compare_seeds([0.5, 0.5], [0.5, 0.5])["within_noise"]
    single = compare_seeds([0.5], [0.6])
    assert single["difference"] == pytest.approx(0.1) and single["t"] is None and single["within_noise"] is None
