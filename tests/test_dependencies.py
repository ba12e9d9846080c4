"""One set of dependency bounds: pyproject.toml, environment.yml, scripts/setup.sh and the start-up
check in pipeline/versions.py agree, and scripts/setup.sh picks the torch build the machine can use."""
import os
import re
import subprocess
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from pipeline.versions import REQUIRED
from tests.conftest import REPO_ROOT

SETUP = REPO_ROOT / "scripts" / "setup.sh"


def bounds(requirements) -> dict:
    """{normalised name: specifier string} of requirement lines."""
    parsed = [Requirement(line) for line in requirements]
    return {req.name.lower().replace("_", "-"): str(req.specifier) for req in parsed}


def pyproject_bounds() -> dict:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return bounds(project["dependencies"] + project["optional-dependencies"]["test"])


def environment() -> dict:
    return yaml.safe_load((REPO_ROOT / "environment.yml").read_text())


def test_environment_yml_states_the_bounds_of_pyproject_toml():
    conda = environment()
    pip_lines = next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict))
    assert pip_lines[-1] == "-e ."
    assert bounds(pip_lines[:-1]) == pyproject_bounds()
    # No torch from conda: the `pytorch` channel stopped at 2.5, below what transformers 5 needs.
    assert "pytorch" not in conda["channels"]
    conda_packages = [item.split("=")[0].split(">")[0] for item in conda["dependencies"] if isinstance(item, str)]
    assert not {"pytorch", "pytorch-cuda", "torch"} & set(conda_packages)


def test_the_start_up_check_holds_the_bounds_of_pyproject_toml():
    declared = pyproject_bounds()
    for package, (required, _) in REQUIRED.items():
        assert declared[package] == str(Requirement(f"{package}{required}").specifier), package
    assert Version("2.5.1") not in Requirement(f"torch{REQUIRED['torch'][0]}").specifier


def test_setup_sh_pins_a_torch_within_the_bounds_and_states_no_others():
    script = SETUP.read_text()
    pinned = re.search(r'^TORCH_VERSION="([^"]+)"', script, re.M).group(1)
    assert Requirement(f"torch{pyproject_bounds()['torch']}").specifier.contains(pinned)
    code = "\n".join(line.split("#")[0] for line in script.splitlines())
    # Everything but torch comes from pyproject.toml through `-e ".[test]"`: no other package is bounded here.
    assert {name for name, _ in re.findall(r'"([A-Za-z][\w.-]*)(==|>=|<=|~=|<|>)', code)} == {"torch"}
    assert '-e ".[test]"' in code


def fake_setup_run(tmp_path, with_gpu: bool) -> list:
    """scripts/setup.sh run in a copy of the repository whose .venv/bin/python records its arguments
    instead of installing; PATH holds an answering `nvidia-smi` only `with_gpu`."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text(SETUP.read_text())
    venv_bin, tools = tmp_path / ".venv" / "bin", tmp_path / "tools"
    venv_bin.mkdir(parents=True)
    tools.mkdir()
    log = tmp_path / "calls.log"
    (venv_bin / "python").write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    (venv_bin / "python").chmod(0o755)
    if with_gpu:
        (tools / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100-SXM4-80GB'\n")
        (tools / "nvidia-smi").chmod(0o755)
    system = ":".join(d for d in ("/usr/bin", "/bin") if os.path.isdir(d))
    env = {"PATH": f"{tools}:{system}", "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


@pytest.mark.parametrize("with_gpu", [False, True])
def test_setup_sh_installs_the_cuda_torch_only_where_there_is_an_nvidia_gpu(tmp_path, with_gpu):
    calls = fake_setup_run(tmp_path, with_gpu)
    torch_call = next(call for call in calls if " torch==" in f" {call}")
    pinned = re.search(r'^TORCH_VERSION="([^"]+)"', SETUP.read_text(), re.M).group(1)
    if with_gpu:
        assert f"torch=={pinned} " not in torch_call and torch_call.endswith(f"torch=={pinned}")
    else:
        assert f"torch=={pinned}+cpu --extra-index-url https://download.pytorch.org/whl/cpu" in torch_call
    project_call = calls.index(next(call for call in calls if "-e .[test]" in call))
    assert calls.index(torch_call) < project_call  # torch first: DeepSpeed builds against it
    assert "exit_on_incompatible_versions" in calls[-1]  # and the stack is checked at the end
