"""The installed torch / transformers / DeepSpeed / peft / trl, checked at start-up against the bounds
this project is tested with, so a stack that cannot work is refused in one line before minutes of loading.

    check_versions()          # in a stage's entry: one line on stderr and exit 2 when the stack cannot work
    version_problems()        # the same findings as a list of sentences

REQUIRED holds the same bounds as pyproject.toml, environment.yml and scripts/setup.sh (a test keeps
them equal). Versions are read from the installed packages' metadata: nothing is imported.
"""
from __future__ import annotations

import sys
from importlib import metadata
from typing import Mapping, Optional

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# package -> (bounds, why a version outside them cannot work)
REQUIRED = {
    "torch": (">=2.6", "transformers 5 disables PyTorch below 2.6, and then no model loads"),
    "transformers": (">=4.56,<6", "the model, generation and checkpointing calls are those of 4.56-5.x"),
    "deepspeed": ("==0.19.8", "the ZeRO partition layout and checkpoint format Adam-mini relies on are 0.19's"),
    "peft": (">=0.17", "LoRA adapters are created and saved through peft 0.17+"),
    "trl": (">=1.0,<2", "the log-probability and entropy helpers are trl 1.x's"),
}
SETUP_HINT = "run `bash scripts/setup.sh` (or `pip install -e .` against the torch you have)"


class VersionError(RuntimeError):
    """The installed packages cannot work together; the message names each package, version and bound."""


def installed_versions(packages=tuple(REQUIRED)) -> dict:
    """{package: version string or None when it is not installed}, from the installed metadata."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def version_problems(installed: Optional[Mapping[str, Optional[str]]] = None) -> list:
    """One sentence per package of REQUIRED that is missing or outside its bounds.

    `installed` maps package -> version (None: not installed); by default the installed metadata.
    Local labels (`2.13.0+cpu`, `+cu126`) and pre-releases (nightlies) count as their version.
    """
    installed = installed_versions() if installed is None else installed
    problems = []
    for package, (bounds, why) in REQUIRED.items():
        found = installed.get(package)
        if found is None:
            problems.append(f"{package} is not installed (this project needs {package}{bounds})")
            continue
        try:
            fits = SpecifierSet(bounds).contains(Version(found), prereleases=True)
        except InvalidVersion:
            problems.append(f"{package} reports version {found!r}, which is not a version number")
            continue
        if not fits:
            problems.append(f"{package} {found} is installed, this project needs {package}{bounds}: {why}")
    return problems


def check_versions(installed: Optional[Mapping[str, Optional[str]]] = None) -> None:
    """Raises VersionError, with every problem on one line, when the installed stack cannot work.

    Raises:
        VersionError: naming each package, the version found and the bound it misses.
    """
    problems = version_problems(installed)
    if problems:
        raise VersionError("; ".join(problems) + f"; {SETUP_HINT}")


def exit_on_incompatible_versions(exit_code: int = 2) -> None:
    """For a stage's entry: prints `error: ...` (one line) to stderr and exits with `exit_code` when
    `check_versions` refuses the installed stack; returns quietly otherwise."""
    try:
        check_versions()
    except VersionError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(exit_code) from None
