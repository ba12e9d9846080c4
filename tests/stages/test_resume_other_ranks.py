"""A stage saved on 2 ranks continues on 3 (checkpoint.resume=true, optimizers.reshard): the same
rows per step (engine.global_batch_size), the data position re-derived and said so in the log, and
the run ends where the 2-rank run that never stopped ends (SFT, Adam-mini, CPU fp32). ZeRO-3, whose
model-states files and weight partitions are per rank; ZeRO-2 passed the same test (final weights
within 6e-8, step-5 loss within 3e-8 relative) and shares all but those paths. In fp32 and in bf16.

One row per micro-batch, so each row's loss is averaged the same way on 2 ranks (accumulation 3)
and on 3 (accumulation 2): the two runs differ only in the order of floating-point sums."""
import importlib.util
import json
import re
import shutil

import pytest
import torch
import yaml

from tests.conftest import launch_ranks
from tests.stages.test_crash_resume import (assert_same_tensors, inputs, safetensors_of, stage_args,  # noqa: F401
                                            stage_config)

pytestmark = pytest.mark.slow

STEPS, CHECKPOINT_AT = 5, 3  # 56 rows, 6 per step: the checkpoint falls in the middle of the first epoch
# The bound. Measured: final weights 1.2e-7 apart (they moved 0.039), step-5 loss 6e-8 relative
# (ZeRO-2: 6e-8 and 3e-8).
CLOSE = 1e-6
BF16_LOSS_CLOSE = 1e-2  # relative: bf16 keeps 3 significant digits


def train_rows(output_dir) -> list:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_saved_on_two_ranks_continues_on_three(inputs, tmp_path, precision):  # noqa: F811 (the imported fixture)
    """bf16 keeps fp32 masters beside the bf16 weights DeepSpeed computes with: the re-cut restores
    the masters, and the weights are their rounding."""
    config = stage_config("sft", 3, inputs)
    config["engine"].update(micro_batch_size=1, global_batch_size=6, precision=precision)
    config["training"].update(max_steps=STEPS, eval_every_steps=CHECKPOINT_AT)
    config["checkpoint"].update(every_steps=CHECKPOINT_AT)
    config_file = tmp_path / "sft.yaml"
    config_file.write_text(yaml.safe_dump(config))
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    launch_ranks(2, stage_args("sft", config_file, uninterrupted))
    shutil.copytree(uninterrupted, resumed)  # its last checkpoint is step 3; steps 4-5 run again on 3 ranks

    result = launch_ranks(3, stage_args("sft", config_file, resumed, "checkpoint.resume=true"))
    log = result.stdout + result.stderr
    assert re.search(r"resumed from \S+step_3 \(step 3\)", log), log[-3000:]
    # 3 steps of 6 rows: 9 micro-batches per rank on 2 ranks are 6 on 3.
    assert ("data position re-derived for 3 rank(s): the checkpoint was written by 2 (micro-batch 1 x accumulation "
            "3); epoch 0 continues after its first 3 steps (18 rows of the same order), from micro-batch 6 of each "
            "rank (was 9)") in log

    expected, actual = train_rows(uninterrupted), train_rows(resumed)
    assert [row["step"] for row in actual] == list(range(1, STEPS + 1))
    # fp32: the runs differ in the order of sums alone. bf16: the forward computes in bf16 (8 bits of
    # mantissa), so a master 1e-7 apart can round to the neighbouring bf16 weight and move the loss.
    loss_close = CLOSE if precision == "fp32" else BF16_LOSS_CLOSE
    for before, after in zip(expected, actual):
        assert after["loss"] == pytest.approx(before["loss"], rel=loss_close, abs=0), after["step"]
        assert after["lr"] == pytest.approx(before["lr"], rel=1e-12), after["step"]
    final_before, final_after = safetensors_of(uninterrupted / "final"), safetensors_of(resumed / "final")
    assert final_before.keys() == final_after.keys()
    initial = safetensors_of(inputs / "model")
    if precision == "fp32":
        travelled = max((final_before[key] - initial[key]).abs().max().item() for key in final_before)
        worst = max((final_before[key] - final_after[key]).abs().max().item() for key in final_before)
        assert worst <= CLOSE < travelled / 100
    else:
        # bf16 gradients summed in another order (accumulation 2 on 3 ranks, 3 on 2) move a few weights
        # to a neighbouring bf16 value, and Adam's normalised step carries that on. Measured: at most 3.1%
        # of a tensor's elements more than one bf16 spacing apart, mean difference at most 0.12% of the
        # mean distance the weights travelled.
        for key in final_before:
            before, after = final_before[key].float(), final_after[key].float()
            spacing = torch.finfo(torch.bfloat16).eps * torch.maximum(before.abs(), after.abs())
            assert ((before - after).abs() > spacing).float().mean().item() <= 0.05, key
            moved = (before - initial[key].float()).abs().mean().item()
            assert (before - after).abs().mean().item() <= 0.01 * moved, key


HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: the test below re-cuts PPO and trains on")
def test_ppo_saved_on_two_ranks_continues_on_three_with_its_critic(inputs, tmp_path):  # noqa: F811
    """PPO's critic is a second Adam-mini engine in the same checkpoint (`critic/`): both are re-cut.
    The step-2 checkpoint of a 2-rank run, resumed on 3 ranks and on 2 with nothing left to train,
    exports bitwise the same actor and critic (a critic left as loaded from the reward model would
    differ)."""
    from optimizers.reshard import FULL_STATE_FILE

    config = stage_config("ppo", 2, inputs)
    config["engine"].update(micro_batch_size=1, global_batch_size=6)
    config["optim"].update(scheduler="constant", warmup_steps=0)
    config["training"].update(max_steps=4, eval_every_steps=2)
    config["checkpoint"].update(every_steps=2)
    config["ppo"]["eval_every_steps"] = 2
    config_file = tmp_path / "ppo.yaml"
    config_file.write_text(yaml.safe_dump(config))
    saved, on_two, on_three = tmp_path / "saved", tmp_path / "on_two", tmp_path / "on_three"
    launch_ranks(2, stage_args("ppo", config_file, saved))  # its last checkpoint is step 2
    shutil.copytree(saved, on_two)
    shutil.copytree(saved, on_three)

    at_step_2 = ("checkpoint.resume=true", "training.max_steps=2")
    launch_ranks(2, stage_args("ppo", config_file, on_two, *at_step_2))
    result = launch_ranks(3, stage_args("ppo", config_file, on_three, *at_step_2))
    assert re.search(r"resumed from \S+step_2 \(step 2\)", result.stdout + result.stderr)
    for engine_dir in ("", "critic"):  # each engine's pieces put together once, beside its own files
        assert (on_three / "checkpoints/step_2" / engine_dir / FULL_STATE_FILE).is_file()
    for export in ("final", "critic"):
        assert_same_tensors(safetensors_of(on_two / export), safetensors_of(on_three / export), export)
    trained, initial = safetensors_of(on_three / "critic"), safetensors_of(inputs / "reward")
    assert any(not trained[key].equal(initial[key]) for key in initial)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (bash scripts/setup.sh --vllm)")
def test_ppo_resumed_on_three_ranks_trains_on_as_the_run_that_never_stopped(inputs, tmp_path):  # noqa: F811
    """PPO with its critic (a second Adam-mini engine, re-cut beside the actor), saved at step 2 on 2
    ranks and trained on to step 4 on 3, against the 2-rank run that never stopped. The rollouts come
    from vLLM, which seeds each sample from its prompt's row in the dataset (not from the rank or the
    micro-batch), so both runs sample the same responses to the same prompts; one row per micro-batch,
    so the two differ only in the order of floating-point sums (as the SFT test above)."""
    from optimizers.reshard import FULL_STATE_FILE

    config = stage_config("ppo", 2, inputs)
    config["engine"].update(micro_batch_size=1, global_batch_size=6)
    config["training"].update(max_steps=4, eval_every_steps=4)
    config["checkpoint"].update(every_steps=2)
    config["ppo"]["eval_every_steps"] = 4
    config["rollout"] = {"engine": "vllm"}
    config_file = tmp_path / "ppo.yaml"
    config_file.write_text(yaml.safe_dump(config))
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    launch_ranks(2, stage_args("ppo", config_file, uninterrupted))
    shutil.copytree(uninterrupted, resumed)  # its last checkpoint is step 2; steps 3-4 run again on 3 ranks

    result = launch_ranks(3, stage_args("ppo", config_file, resumed, "checkpoint.resume=true"))
    assert re.search(r"resumed from \S+step_2 \(step 2\)", result.stdout + result.stderr)
    for engine_dir in ("", "critic"):  # each engine's pieces put together once, beside its own files
        assert (resumed / "checkpoints/step_2" / engine_dir / FULL_STATE_FILE).is_file()
    expected, actual = train_rows(uninterrupted), train_rows(resumed)
    assert [row["step"] for row in actual] == [1, 2, 3, 4]
    for before, after in zip(expected[2:], actual[2:]):
        # The same responses (lengths and rewards), and losses that differ in the order of sums alone.
        assert after["response_length"] == before["response_length"], after["step"]
        for name in ("reward", "kl", "loss", "value_loss", "entropy", "grad_norm", "critic_grad_norm"):
            assert after[name] == pytest.approx(before[name], rel=CLOSE, abs=CLOSE), (name, after["step"])
    for export in ("final", "critic"):
        final_before, final_after = safetensors_of(uninterrupted / export), safetensors_of(resumed / export)
        assert final_before.keys() == final_after.keys()
        worst = max((final_before[key] - final_after[key]).abs().max().item() for key in final_before)
        assert worst <= CLOSE, (export, worst)
