"""The stage table (pipeline/stages.py) against what is on disk: every stage file has a row, every row's
module, config class, run function and script exist, and each shipped config is recognised as its stage
and loads with that stage's config class."""

import pytest

from pipeline.config import load_config
from pipeline.plan import _stage_in_file
from pipeline.stages import STAGES
from tests.conftest import REPO_ROOT

CONFIG_STAGES = {"sft_full": "sft", "sft_lora": "sft", "reward": "reward", "dpo": "dpo", "remax": "remax",
                 "rloo": "rloo", "grpo": "grpo", "ppo": "ppo"}


def test_every_stage_file_has_a_row_and_every_row_its_parts():
    files = {path.stem for path in (REPO_ROOT / "stages").glob("*.py") if path.stem != "__init__"}
    assert files == {spec.module.removeprefix("stages.") for spec in STAGES.values()}
    for spec in STAGES.values():
        assert callable(spec.run) and spec.config_class.__name__ == spec.config_name
        assert (REPO_ROOT / spec.script).is_file(), spec.script
        if spec.section:  # its own section is a field of its config class
            assert spec.section in spec.config_class.__dataclass_fields__


@pytest.mark.parametrize("directory", ["tiny", "llama2-7b"])
def test_each_shipped_config_is_read_as_its_stage(directory):
    for name, stage in CONFIG_STAGES.items():
        path = REPO_ROOT / "configs" / directory / f"{name}.yaml"
        assert _stage_in_file(str(path)) == stage, path
        config = load_config(STAGES[stage].config_class, str(path))
        assert config.data.format == STAGES[stage].data_format, path
