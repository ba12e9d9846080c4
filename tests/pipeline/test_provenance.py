import os
import subprocess

import pytest
import torch

from pipeline.provenance import REPO_ROOT, provenance


def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_the_line_names_the_checked_out_commit_the_cores_and_torch():
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    line = provenance()
    assert f"commit {head}" in line
    assert ("+ changes" in line) == changed
    assert f"({len(os.sched_getaffinity(0))} cores)" in line
    assert f"torch {torch.__version__}" in line
