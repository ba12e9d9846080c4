"""Bad input through the real SFT and reward stages: one message naming the field, file or row,
exit code 2, no traceback, and an earlier run in `output_dir` left byte for byte.

In process where the error comes before the process group is set up (config, data, model);
one command-line run for an error raised after it.
"""
import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from pipeline.run import EXIT_USER_ERROR, main
from stages.reward import RewardConfig
from stages.reward import run as reward_run
from stages.sft import SFTConfig
from stages.sft import run as sft_run
from tests.conftest import REPO_ROOT, rank_env
from tests.tiny_models import save_tiny_model_dir

GOOD_ROW = {"prompt": "what is red", "response": " red is good", "chosen": " good", "rejected": " bad"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def config_file(tmp_path, model_dir, **sections) -> str:
    values = {"output_dir": str(tmp_path / "run"), "model": {"path": str(model_dir)},
              "data": {"path": write_jsonl(tmp_path / "good.jsonl", [GOOD_ROW] * 8), "format": "sft",
                       "max_length": 12, "max_prompt_length": 6},
              "engine": {"zero_stage": 0, "micro_batch_size": 2}, "logging": {"progress_bar": False}}
    for name, section in sections.items():
        values[name] = {**values.get(name, {}), **section} if isinstance(section, dict) else section
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def run_main(capsys, stage, config_class, config, *overrides) -> tuple:
    code = main(stage, config_class, ["--config", config, *overrides])
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return code, error


def snapshot(directory) -> dict:
    return {path: path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def make_earlier_run(output_dir):
    checkpoint = output_dir / "checkpoints" / "step_2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("2\n")
    (checkpoint / "rng_rank0.pt").write_bytes(b"rng")
    (output_dir / "metrics.jsonl").write_text('{"step": 2, "loss": 1.5}\n')
    (output_dir / "config.yaml").write_text("output_dir: the earlier run\n")
    (output_dir / "final").mkdir()
    (output_dir / "final" / "model.safetensors").write_bytes(b"weights")
    return snapshot(output_dir)


# ---- the config file and the command line ----------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    (None, "is a directory; give the YAML config file itself"),
    ("", "`model.path` is not set"),
    ("- a\n- list\n", "holds a list at the top level; it must hold a mapping of sections"),
    ("7\n", "holds a number at the top level"),
    ("model: [unclosed\n", "YAML syntax error at line 2"),
])
def test_unusable_config_files_name_the_file(tmp_path, capsys, text, message):
    if text is None:
        path = tmp_path
    else:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
    code, error = run_main(capsys, sft_run, SFTConfig, str(path))
    assert code == EXIT_USER_ERROR and message in error and f"error: {path}:" in error


@pytest.mark.parametrize("override, message", [
    ("engine.zero_stag=1", "unknown key `engine.zero_stag`; did you mean `engine.zero_stage`?"),
    ("colour=red", "unknown key `colour`"),
    ("engine.micro_batch_size=four", "`engine.micro_batch_size` is 'four'; expected int"),
    ("optim.lr=[1, 2]", "`optim.lr` is [1, 2]; expected float"),
    ("engine.zero_stage=4", "`engine.zero_stage` is 4; use 0, 1, 2 or 3"),
    ("optim.lr=-1e-5", "`optim.lr` is -1e-05; it must be positive"),
    ("engine.micro_batch_size=0", "`engine.micro_batch_size` is 0; it must be a positive integer"),
    ("engine.micro_batch_size=-1", "`engine.micro_batch_size` is -1; it must be a positive integer"),
    ("model.lora.r=16", "`model.lora.r` is set but `model.lora.enabled` is false"),
    ("model.logits_chunk=-1", "`model.logits_chunk` is -1; give the tokens per chunk of logits"),
    ("engine.zero_stage", "override 'engine.zero_stage' is not of the form key.sub=value"),
])
def test_bad_settings_name_the_field(tmp_path, capsys, model_dir, override, message):
    code, error = run_main(capsys, sft_run, SFTConfig, config_file(tmp_path, model_dir), override)
    assert code == EXIT_USER_ERROR and message in error


# ---- models and data --------------------------------------------------------------------------------

def test_model_paths_that_hold_no_model_name_the_field(tmp_path, capsys, model_dir):
    config = config_file(tmp_path, model_dir)
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no model"),
                          (config_only, "holds no weights")):
        code, error = run_main(capsys, sft_run, SFTConfig, config, f"model.path={path}",
                               f"model.tokenizer_path={model_dir}")
        assert code == EXIT_USER_ERROR and f"error: `model.path` {path} {message}" in error
    # The tokenizer comes from model.path too: an empty directory is named as such, not as a tokenizer failure.
    code, error = run_main(capsys, sft_run, SFTConfig, config, f"model.path={tmp_path / 'empty'}")
    assert code == EXIT_USER_ERROR
    assert f"error: `model.path` {tmp_path / 'empty'} holds no model or tokenizer (no config.json)" in error


@pytest.mark.parametrize("content, message", [
    (None, "missing.jsonl: file not found"),
    (b"", "missing.jsonl: the file is empty"),
    (b"this is not json\n", "missing.jsonl: malformed JSON on line 1"),
    (b'{"prompt": "what is caf\xe9", "response": " red"}\n', "missing.jsonl: not UTF-8 text (byte 0xe9 on line 1)"),
    (b'{"prompt": "what"}\n{"response": " red"}\n',
     "missing.jsonl: kept 0 of 2 rows; skipped 1 missing field 'response' (row 1), 1 missing field 'prompt' (row 2)"),
    # Rows that would train on no label token are dropped; with none left the file is named.
    (b'{"prompt": "what", "response": "  "}\n' * 3, "kept 0 of 3 rows; skipped 3 empty field 'response'"),
    (b'{"prompt": "what is red what is red what", "response": " red"}\n' * 3,
     "kept 0 of 3 rows; skipped 3 prompt over max_prompt_length"),
])
def test_unusable_data_names_the_file_and_rows(tmp_path, capsys, model_dir, content, message):
    data = tmp_path / "missing.jsonl"
    if content is not None:
        data.write_bytes(content)
    code, error = run_main(capsys, sft_run, SFTConfig, config_file(tmp_path, model_dir), f"data.path={data}")
    assert code == EXIT_USER_ERROR and message in error


def test_reward_data_without_pairs_names_the_rows(tmp_path, capsys, model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "what", "chosen": " good"}, {"prompt": "what"}])
    code, error = run_main(capsys, reward_run, RewardConfig, config_file(tmp_path, model_dir),
                           f"data.path={data}", "data.format=pairwise")
    assert code == EXIT_USER_ERROR
    assert "pairs.jsonl: kept 0 of 2 rows; skipped 1 missing field 'rejected' (row 1), " \
           "1 missing field 'chosen' (row 2)" in error


# ---- an earlier run in output_dir --------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["checkpoint.resume=true", "checkpoint.overwrite=true"])
def test_a_run_failing_on_its_data_leaves_the_earlier_run_untouched(tmp_path, capsys, model_dir, flag):
    before = make_earlier_run(tmp_path / "run")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "what", "response": " red"}\n{"prompt": ')
    code, error = run_main(capsys, sft_run, SFTConfig, config_file(tmp_path, model_dir),
                           f"data.path={tmp_path / 'broken.jsonl'}", flag)
    assert code == EXIT_USER_ERROR and "broken.jsonl: malformed JSON on line 2" in error
    assert snapshot(tmp_path / "run") == before  # config.yaml included: it is written once the run starts


def test_a_batch_error_after_the_process_group_is_up_leaves_the_earlier_run_untouched(tmp_path, model_dir):
    """From the command line: `engine.global_batch_size` is checked once the world size is known."""
    before = make_earlier_run(tmp_path / "run")
    command = [sys.executable, "-m", "stages.sft", "--config", config_file(tmp_path, model_dir),
               "engine.global_batch_size=3", "checkpoint.resume=true"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    assert ("error: `engine.global_batch_size` 3 is not a multiple of `engine.micro_batch_size` 2 x 1 rank(s)"
            in result.stderr)
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path / "run") == before


@pytest.mark.slow
def test_resuming_from_a_checkpoint_holding_pickled_code_exits_without_running_it(tmp_path, model_dir):
    """Every `.pt` of the checkpoint replaced by a pickle that would create a file when unpickled, and
    COMPLETE rewritten with the new files' SHA-256 (the integrity check passes): the resume refuses the
    first file in one message, exit 2, the payload never runs and the run directory is left as it was."""
    from pipeline.checkpoint import COMPLETE_MARKER, file_digests
    from tests.pipeline.checkpoint_worker import Payload

    command = [sys.executable, "-m", "stages.sft", "--config", config_file(tmp_path, model_dir),
               "training.max_steps=3", "checkpoint.every_steps=2"]
    first = subprocess.run(command, cwd=REPO_ROOT, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    marker = tmp_path / "payload_ran"
    replaced = sorted(checkpoint.rglob("*.pt"))
    assert len(replaced) >= 2  # DeepSpeed's model states and the RNG state at least
    for path in replaced:
        torch.save({"state": Payload(marker)}, path)
    digests = "".join(f"{digest}  {name}\n" for name, digest in file_digests(checkpoint).items())
    (checkpoint / COMPLETE_MARKER).write_text(f"2\n{digests}")
    before = snapshot(tmp_path / "run")
    resumed = subprocess.run(command + ["checkpoint.resume=true", "training.max_steps=4"], cwd=REPO_ROOT,
                             env=rank_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == EXIT_USER_ERROR, resumed.stderr[-3000:]
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(r"step_2/\S+\.pt holds objects other than tensors", errors[0]), errors
    assert "Traceback" not in resumed.stderr
    assert not marker.exists()
    assert snapshot(tmp_path / "run") == before
