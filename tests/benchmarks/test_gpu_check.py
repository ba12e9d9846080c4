"""benchmarks/gpu_check: the configs it writes are valid stage configs, the model is the 1.1B one it
claims, and the report reads the stages' metrics and the plan, on a tiny rehearsal of every stage
(what GPU_CHECK_SIZE=tiny bash benchmarks/gpu_check.sh runs on a CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from benchmarks.gpu_check import SIZES, STAGES, VOCAB_SIZE, prepare, report, stage_configs
from pipeline.config import load_config
from pipeline.models import count_parameters, load_causal_lm
from stages.remax import RemaxConfig
from stages.reward import RewardConfig
from stages.sft import SFTConfig
from tests.conftest import launch_ranks

CONFIG_CLASSES = {"sft": SFTConfig, "reward": RewardConfig, "remax": RemaxConfig}


def test_prepared_configs_validate_as_the_stages_read_them(tmp_path):
    prepare(tmp_path, "tiny", steps=3)
    for stage in STAGES:
        config = load_config(CONFIG_CLASSES[stage.removesuffix("_vllm")], str(tmp_path / "configs" / f"{stage}.yaml"))
        if stage.endswith("_vllm"):  # where vLLM is installed: ReMax again, generating with it
            assert config.rollout.engine == "vllm"
        assert (config.engine.precision, config.engine.zero_stage, config.training.max_steps) == ("bf16", 2, 3)
        assert config.optim.name == "adam_mini" and config.model.gradient_checkpointing and config.model.dtype == "bf16"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert len(tokenizer) == VOCAB_SIZE and tokenizer.eos_token_id == 3 and tokenizer.pad_token_id == 0
    row = json.loads((tmp_path / "data" / "sft.jsonl").read_text().splitlines()[0])
    assert len(tokenizer(row["prompt"] + " " + row["response"])["input_ids"]) <= SIZES["tiny"]["max_length"]


def test_the_full_size_model_has_tinyllama_parameters(tmp_path):
    size = SIZES["1b"]
    model = stage_configs(tmp_path, size, steps=8)["sft"]["model"]["config"]
    sft = load_config(SFTConfig, None, [f"model.config={json.dumps(model)}", "data.path=d"])
    total, _ = count_parameters(load_causal_lm(sft.model, device="meta"))
    assert total == pytest.approx(1.1e9, rel=0.01)
    # Rows fit unskipped: prompt + response within max_length, generation within what is left.
    assert size["prompt_words"] + size["response_words"] + 2 <= size["max_length"]
    assert size["prompt_words"] < size["max_prompt_length"]
    assert size["max_new_tokens"] <= size["max_length"] - size["max_prompt_length"]


@pytest.mark.slow
def test_the_report_reads_a_rehearsal_of_every_stage(tmp_path, capsys):
    """The CPU rehearsal's stages (GPU_CHECK_SIZE=tiny, 2 steps each, in one 1-rank launch as the script
    runs them one after another), then the report: a row per stage with its steps, the peak the stage
    logged and `pipeline.plan`'s total for the stage's config, as the plan prints it."""
    prepare(tmp_path, "tiny", steps=2)
    runs = [f"stages.{stage.removesuffix('_vllm')} --config {tmp_path / 'configs' / f'{stage}.yaml'}"
            for stage in STAGES]
    launch_ranks(1, ["tests/stages/stage_sequence_worker.py", "--out", tmp_path / "runs.json",
                     *[f"--run={run}" for run in runs]])
    assert [run["exit"] for run in json.loads((tmp_path / "runs.json").read_text())["runs"]] == [0] * len(STAGES)

    figures = report(tmp_path, tmp_path / "gpu_check.json")
    printed = capsys.readouterr().out.splitlines()
    assert [row["stage"] for row in figures] == list(STAGES)
    assert [line.split()[0] for line in printed[1:]] == list(STAGES)
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == figures
    for row in figures:
        config = tmp_path / "configs" / f"{row['stage']}.yaml"
        output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
        logged = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [line for line in logged if "tokens_per_s" in line]
        assert row["steps"] == 2 and row["peak_memory_bytes"] == max(line["peak_memory_bytes"] for line in steps)
        plan = subprocess.run([sys.executable, "-m", "pipeline.plan", "--config", str(config), "--world-sizes", "1",
                               "--json"], capture_output=True, text=True, check=True)
        [planned] = [r for r in json.loads(plan.stdout) if (r["optimizer"], r["zero_stage"]) == ("adam_mini", 2)]
        assert row["plan_bytes"] == planned["total_bytes"] and row["peak_over_plan"] > 0
