"""Safe loading and launching: no unrestricted unpickling or code execution in the shipped source,
and the launcher passes `key=value` overrides to Python exactly as typed, running none of them."""
import ast
import json
import os
import subprocess

import pytest

from pipeline.config import ModelConfig
from tests.conftest import REPO_ROOT

SOURCE_DIRS = ("pipeline", "stages", "optimizers", "scripts", "training_scripts", "benchmarks", "examples")


def source_files(suffix: str) -> list:
    return sorted(path for folder in SOURCE_DIRS for path in (REPO_ROOT / folder).rglob(f"*{suffix}"))


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(path, root=REPO_ROOT) -> list:
    """`torch.load` without `weights_only=True`, `trust_remote_code=True`, `eval` / `exec` and pickle imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            function = node.func
            if (isinstance(function, ast.Attribute) and function.attr == "load"
                    and isinstance(function.value, ast.Name) and function.value.id == "torch"
                    and not is_true(keywords.get("weights_only"))):
                found.append(f"{where}: torch.load without weights_only=True")
            if is_true(keywords.get("trust_remote_code")):
                found.append(f"{where}: trust_remote_code=True")
            if isinstance(function, ast.Name) and function.id in ("eval", "exec"):
                found.append(f"{where}: {function.id}()")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            if isinstance(node, ast.ImportFrom) and [alias.name for alias in node.names] == ["UnpicklingError"]:
                continue  # the exception a refused weights-only load raises, to name the file
            if any(name.split(".")[0] in ("pickle", "cPickle", "dill") for name in names):
                found.append(f"{where}: imports pickle")
    return found


def test_source_never_unpickles_or_runs_code_it_did_not_write():
    files = source_files(".py")
    assert len(files) > 20  # the scan sees the tree
    assert [problem for path in files for problem in unsafe_calls(path)] == []


def test_the_scan_catches_an_unrestricted_torch_load(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nstate = torch.load('x.pt')\nsafe = torch.load('x.pt', weights_only=True)\n")
    assert unsafe_calls(probe, root=tmp_path) == ["probe.py:2: torch.load without weights_only=True"]


def test_remote_code_is_off_unless_the_config_turns_it_on():
    assert ModelConfig().trust_remote_code is False


LAUNCH = REPO_ROOT / "training_scripts" / "launch.sh"
HOSTILE = ["output_dir=/tmp/a run dir", "data.path=$(touch {marker})", "seed=1;touch {marker}",
           "model.path=`touch {marker}`", "note=it's \"quoted\" & {{braced}}"]


def test_launcher_passes_overrides_through_unchanged_and_runs_none(tmp_path):
    """The real launcher (DeepSpeed's runner, one rank) starting a module that records its argv."""
    (tmp_path / "argv_echo.py").write_text(
        "import json, os, sys\n"
        "with open(os.environ['ARGV_ECHO_OUT'], 'w') as f:\n"
        "    json.dump(sys.argv[1:], f)\n")
    marker, out = tmp_path / "executed", tmp_path / "argv.json"
    overrides = [text.format(marker=marker) for text in HOSTILE]
    env = dict(os.environ, PYTHONPATH=str(tmp_path), ARGV_ECHO_OUT=str(out), NUM_GPUS="1", DS_ACCELERATOR="cpu")
    env.pop("HOSTFILE", None)
    result = subprocess.run(["bash", str(LAUNCH), "argv_echo", "my config.yaml", *overrides], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text()) == ["--local_rank=0", "--config", "my config.yaml", *overrides]
    assert not marker.exists()


@pytest.mark.parametrize("num_gpus", ["a[$(touch {marker})]", "0", "two"])
def test_launcher_refuses_a_num_gpus_that_is_not_a_count(tmp_path, num_gpus):
    marker = tmp_path / "executed"
    env = dict(os.environ, NUM_GPUS=num_gpus.format(marker=marker))
    env.pop("HOSTFILE", None)
    result = subprocess.run(["bash", str(LAUNCH), "stages.sft", "c.yaml"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "NUM_GPUS is" in result.stderr and "positive integer" in result.stderr
    assert not marker.exists()  # bash arithmetic would have run the substitution
