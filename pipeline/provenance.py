"""Where a benchmark's figures came from: the commit, whether the tree differed from it, the machine and
the library versions, as one line the benchmarks print and write under their tables."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The checked-out commit (short), with "+ changes" when tracked files differ from it; "unknown"
    outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + changes" if changed else head


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> str:
    """One line: date, commit, CPU and its cores, torch and DeepSpeed versions (read from the installed
    packages' metadata: importing DeepSpeed here would cost seconds and print its accelerator warning)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{datetime.date.today().isoformat()}, commit {commit()}, {cpu_model()} ({cores} cores), "
            f"torch {installed('torch')}, deepspeed {installed('deepspeed')}")


def installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
