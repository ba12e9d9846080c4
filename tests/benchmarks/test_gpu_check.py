"""benchmarks/gpu_check: the configs it writes are valid stage configs, the model is the 1.1B one it
claims, and the report reads the stages' metrics. (The stages themselves run in the CPU rehearsal,
GPU_CHECK_SIZE=tiny bash benchmarks/gpu_check.sh, and on a GPU.)"""
import json

import pytest
from transformers import AutoTokenizer

from benchmarks.gpu_check import SIZES, STAGES, VOCAB_SIZE, prepare, stage_configs
from pipeline.config import load_config
from pipeline.models import count_parameters, load_causal_lm
from stages.remax import RemaxConfig
from stages.reward import RewardConfig
from stages.sft import SFTConfig

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
