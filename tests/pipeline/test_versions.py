"""The start-up check refuses, in one line, a torch / transformers / DeepSpeed stack that cannot work."""
import subprocess
import sys

import pytest

from pipeline.versions import REQUIRED, VersionError, check_versions, installed_versions, version_problems
from tests.conftest import REPO_ROOT

WORKING = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "deepspeed": "0.19.8", "peft": "0.21.2", "trl": "1.16.0"}


def test_the_installed_stack_passes():
    assert installed_versions()["torch"] is not None
    assert version_problems() == []
    check_versions()


@pytest.mark.parametrize("versions", [WORKING, dict(WORKING, torch="2.6.0+cu124", transformers="4.56.2"),
                                      dict(WORKING, torch="2.14.0.dev20260301+cu128")])
def test_stacks_within_the_bounds_pass(versions):
    assert version_problems(versions) == []


def test_torch_below_what_transformers_5_needs_is_refused_by_name():
    problems = version_problems(dict(WORKING, torch="2.5.1"))
    assert problems == [f"torch 2.5.1 is installed, this project needs torch>=2.6: {REQUIRED['torch'][1]}"]
    assert "transformers 5 disables PyTorch below 2.6" in problems[0]


def test_every_problem_is_reported_on_one_line():
    broken = dict(WORKING, torch="2.4.0", deepspeed="0.16.4", trl=None, transformers="6.0.0")
    with pytest.raises(VersionError) as error:
        check_versions(broken)
    message = str(error.value)
    assert "\n" not in message
    for expected in ("torch 2.4.0 is installed", "transformers 6.0.0 is installed, this project needs "
                     "transformers>=4.56,<6", "deepspeed 0.16.4 is installed, this project needs deepspeed==0.19.8",
                     "trl is not installed", "bash scripts/setup.sh"):
        assert expected in message
    assert "peft" not in message


def test_a_stage_entry_exits_2_with_one_line_when_torch_is_too_old(tmp_path):
    """A torch 2.5.1 distribution first on the path, as an old conda environment would have it."""
    dist_info = tmp_path / "torch-2.5.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.5.1\n")
    code = "from pipeline.versions import exit_on_incompatible_versions; exit_on_incompatible_versions(); print('ran')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": f"{tmp_path}:{REPO_ROOT}", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: torch 2.5.1 is installed")
