"""The stages on local snapshots of the public datasets, as users run them (2 DeepSpeed CPU ranks):
SFT on UltraChat's `train_sft` with a built-in template, then the reward model on UltraFeedback's
`train_prefs` from that export, which carries the template so the reward config names none, then
ReMax on UltraFeedback's `train_gen` prompts, rendered as user turns with the generation prompt."""
import json

import pytest
import yaml
from transformers import AutoTokenizer

from pipeline.chat_templates import BUILTIN_TEMPLATES
from tests import public_datasets as public
from tests.conftest import launch_ranks
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    tokenizer = public.byte_tokenizer()
    tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, max_position_embeddings=128).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def snapshot(root, rows: dict, schema):
    for split, split_rows in rows.items():
        public.write_parquet(public.shard(root, split), split_rows * 4, schema)  # enough rows for 2 ranks
    return root


def stage_config(path, run_dir, model, data: dict) -> str:
    values = dict(output_dir=str(run_dir), seed=0, model={"path": str(model)},
                  data={"max_length": 96, "max_prompt_length": 48, **data},
                  optim={"lr": 1e-3, "betas": [0.9, 0.95]}, engine={"zero_stage": 2, "micro_batch_size": 2},
                  training={"max_steps": 2, "eval_every_steps": 2}, logging={"progress_bar": False})
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_sft_on_ultrachat_then_reward_on_ultrafeedback(tmp_path, model_dir):
    ultrachat = snapshot(tmp_path / "ultrachat_200k", {"train_sft": public.UC_TRAIN, "test_sft": public.UC_TEST},
                         public.UC_SCHEMA)
    ultrafeedback = snapshot(tmp_path / "ultrafeedback_binarized",
                             {"train_prefs": public.UF_TRAIN, "test_prefs": public.UF_TEST,
                              "train_gen": public.UF_TRAIN, "test_gen": public.UF_TEST}, public.UF_SCHEMA)
    sft_dir = tmp_path / "sft"
    result = launch_ranks(2, ["--module", "stages.sft", "--config", stage_config(
        tmp_path / "sft.yaml", sft_dir, model_dir,
        {"path": str(ultrachat), "split": "train_sft", "eval_split": "test_sft", "format": "sft",
         "chat_template": "zephyr", "cache_dir": str(tmp_path / "cache")})])
    assert f"{ultrachat} [train_sft]: kept 8 of 8 rows" in result.stdout + result.stderr
    assert AutoTokenizer.from_pretrained(sft_dir / "final").chat_template == BUILTIN_TEMPLATES["zephyr"]
    # Two ranks, two splits: each tokenised once, so two cache entries.
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2

    reward_dir = tmp_path / "reward"
    result = launch_ranks(2, ["--module", "stages.reward", "--config", stage_config(
        tmp_path / "reward.yaml", reward_dir, sft_dir / "final",
        {"path": str(ultrafeedback), "split": "train_prefs", "eval_split": "test_prefs", "format": "pairwise"})])
    assert (f"{ultrafeedback} [train_prefs]: kept 8 of 16 rows; skipped 4 chosen equals rejected (rows 3, 7, 11, 15), "
            "4 empty answer in 'chosen' (rows 4, 8, 12, 16)") in result.stdout + result.stderr
    metrics = [json.loads(line) for line in (reward_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in row for row in metrics)

    remax_dir = tmp_path / "remax"
    config = stage_config(tmp_path / "remax.yaml", remax_dir, sft_dir / "final",
                          {"path": str(ultrafeedback), "split": "train_gen", "eval_split": "test_gen", "format": "prompt"})
    values = yaml.safe_load(open(config))
    values["remax"] = {"reward_model_path": str(reward_dir / "final"), "max_new_tokens": 8, "eval_every_steps": 2}
    open(config, "w").write(yaml.safe_dump(values))
    result = launch_ranks(2, ["--module", "stages.remax", "--config", config])
    assert f"{ultrafeedback} [train_gen]: kept 16 of 16 rows" in result.stdout + result.stderr
    metrics = [json.loads(line) for line in (remax_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in metrics if "baseline_reward" in row]
    assert [row["step"] for row in trained] == [1, 2] and all(abs(row["reward"]) < 1e3 for row in trained)
    assert any("eval/reward" in row for row in metrics)
    assert (remax_dir / "final" / "config.json").exists()
