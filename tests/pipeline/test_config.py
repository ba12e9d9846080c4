"""Config loading: YAML, overrides, types, ranges, combinations, and every problem at once."""
import pytest

from pipeline.config import ConfigError, RunConfig, load_config, save_config

GOOD = """\
output_dir: runs/test
seed: 3
model:
  path: models/tiny
data:
  path: data/train.jsonl
  format: pairwise
optim:
  name: adamw
  lr: 1e-5
  betas: [0.9, 0.95]
engine:
  zero_stage: 3
  micro_batch_size: 4
"""


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(tmp_path, text, overrides=()):
    with pytest.raises(ConfigError) as caught:
        load_config(RunConfig, write(tmp_path, text), overrides)
    return caught.value


def test_good_file_with_overrides(tmp_path):
    config = load_config(RunConfig, write(tmp_path, GOOD), ["engine.zero_stage=2", "optim.lr=3e-6",
                                                             "model.lora.enabled=true", "model.lora.r=16"])
    assert config.seed == 3 and config.data.format == "pairwise"
    assert config.optim.lr == 3e-6 and isinstance(config.optim.lr, float)  # "1e-5" is a string in YAML 1.1
    assert config.engine.zero_stage == 2 and config.engine.micro_batch_size == 4
    assert config.model.lora.enabled and config.model.lora.r == 16


def test_resolved_config_round_trips(tmp_path):
    config = load_config(RunConfig, write(tmp_path, GOOD))
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(RunConfig, tmp_path / "resolved.yaml") == config


def test_every_problem_is_reported_at_once_naming_field_value_and_fix(tmp_path):
    error = problems_of(tmp_path, GOOD.replace("zero_stage: 3", "zero_stage: 4\n  offload_param: true")
                        .replace("lr: 1e-5", "lr: -1e-5\n  lrr: 2").replace("micro_batch_size: 4",
                                                                             "micro_batch_size: four"))
    text = str(error)
    assert "config.yaml" in text
    assert "unknown key `optim.lrr`; did you mean `optim.lr`?" in text
    assert "`engine.zero_stage` is 4; use 0, 1, 2 or 3" in text
    assert "`optim.lr` is -1e-05; it must be positive" in text
    assert "`engine.micro_batch_size` is 'four'; expected int" in text
    assert "parameter offload needs ZeRO-3" in text
    assert len(error.problems) == 5


@pytest.mark.parametrize("override, message", [
    ("engine.precision=fp8", "`engine.precision` is 'fp8'; use one of fp32, bf16, fp16"),
    ("engine.micro_batch_size=-2", "`engine.micro_batch_size` is -2; it must be a positive integer"),
    ("engine.offload_optimizer=true", None),  # fine with ZeRO-3
    ("model.lora.r=4", "`model.lora.r` is set but `model.lora.enabled` is false"),
    ("model.offload_activations=true", "`model.offload_activations` is true with `model.gradient_checkpointing` "
                                       "false; what it offloads are the checkpointed layer inputs"),
    ("data.max_prompt_length=600", "`data.max_prompt_length` (600) must be below `data.max_length` (512)"),
    ("optim.betas=[0.9, 1.0]", "`optim.betas` is [0.9, 1.0]"),
    ("optim.betas=[a,b]", "`optim.betas[0]` is 'a'; expected float"),
    ("optim.betas=[0.9]", "`optim.betas` is [0.9]; give two numbers"),
    ("optim.lr=nan", "`optim.lr` is 'nan'; expected a finite number"),
    ("optim.weight_decay=.inf", "`optim.weight_decay` is inf; expected a finite number"),
    ("optim.eps=0", "`optim.eps` is 0; a block whose gradients are all zero would divide by zero"),
    ("optim.min_lr_ratio=1.5", "`optim.min_lr_ratio` is 1.5; use a value in [0, 1]"),
    ("model.lora.target_modules=[q_proj, 7]", "`model.lora.target_modules[1]` is 7; expected str"),
    ("trainer.steps=3", "unknown key `trainer`"),
    ("seed=abc", "`seed` is 'abc'; expected int"),
])
def test_bad_values_name_the_field(tmp_path, override, message):
    if message is None:
        assert load_config(RunConfig, write(tmp_path, GOOD), [override]).engine.offload_optimizer
        return
    overrides = [override] if isinstance(override, str) else override
    assert message in str(problems_of(tmp_path, GOOD, overrides))


def test_offload_with_zero0_is_refused(tmp_path):
    text = str(problems_of(tmp_path, GOOD.replace("zero_stage: 3", "zero_stage: 0\n  offload_optimizer: true")))
    assert "offload needs ZeRO 1, 2 or 3" in text


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed", "YAML syntax error at line 1"),
    ("- just\n- a list\n", "must hold a mapping of sections"),
])
def test_broken_files(tmp_path, text, message):
    assert message in str(problems_of(tmp_path, text))


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        load_config(RunConfig, None, ["engine.zero_stage"])


def test_unreadable_file_names_it(tmp_path, monkeypatch):
    # chmod 000 does not stop root, so the refusal is simulated.
    path = write(tmp_path, GOOD)

    def refuse(self, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_text", refuse)
    with pytest.raises(ConfigError, match=r"(?s)config\.yaml: .*cannot read the config: .*Permission denied"):
        load_config(RunConfig, path)


@pytest.mark.parametrize("text, kind", [("7\n", "a number"), ("just text\n", "a string"), ("- a\n", "a list")])
def test_top_level_that_is_not_a_mapping_is_named(tmp_path, text, kind):
    assert f"the file holds {kind} at the top level" in str(problems_of(tmp_path, text))


def test_directory_given_as_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give the YAML config file itself"):
        load_config(RunConfig, tmp_path)
