"""Runs of one setting under several seeds: which runs belong together, and whether a difference
between two settings is larger than what the seed alone moves.

Two runs belong together when their resolved configs (`config.yaml` in the run directory) differ only
in `seed` and in where they write: `output_dir`, and the paths inside the directory that holds their
run (a pipeline's own earlier stages, e.g. `runs/adamw-seed1/sft/final` for `runs/adamw-seed1/remax`).
"""
from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import yaml

# Two-sided 5% critical values of Student's t by degrees of freedom (2n - 2 for n seeds per side).
T_CRITICAL_5PCT = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
                   10: 2.228, 12: 2.179, 14: 2.145, 16: 2.120, 18: 2.101}
RUN_ROOT = "{run root}"


def mean_std(values: list) -> tuple:
    """(mean, sample std; 0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare_seeds(baseline: list, other: list) -> dict:
    """Two-sample t-test (pooled variance) of two settings' per-seed values: the difference of means
    (other - baseline), the pooled std, t, and `within_noise` when |t| is below the two-sided 5% critical
    value (t and the verdict None with a single seed on either side: no spread to compare with)."""
    (mean_a, std_a), (mean_b, std_b) = mean_std(baseline), mean_std(other)
    difference, df = mean_b - mean_a, len(baseline) + len(other) - 2
    if min(len(baseline), len(other)) < 2:
        return {"difference": difference, "pooled_std": None, "t": None, "df": df, "t_critical": None,
                "within_noise": None}
    pooled = math.sqrt(((len(baseline) - 1) * std_a ** 2 + (len(other) - 1) * std_b ** 2) / df)
    spread = pooled * math.sqrt(1 / len(baseline) + 1 / len(other))
    t = difference / spread if spread > 0 else (0.0 if difference == 0 else math.copysign(math.inf, difference))
    critical = T_CRITICAL_5PCT.get(df)
    return {"difference": difference, "pooled_std": pooled, "t": t, "df": df, "t_critical": critical,
            "within_noise": None if critical is None else abs(t) < critical}


def read_run_config(run_dir) -> dict:
    """The resolved config a run wrote (`config.yaml`), or {} when it has none (then it is a group of its
    own). Read as plain YAML data: nothing in it runs."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return config if isinstance(config, dict) else {}


def setting_of(config: dict) -> str:
    """The part of a resolved config that makes a setting: without `seed` and `output_dir`, and with the
    directory that holds the run's output directory written as "{run root}" wherever a path starts with it."""
    if not config:
        return ""
    output_dir = config.get("output_dir")
    root = str(Path(output_dir).parent) if output_dir else None

    def strip(value):
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items()}
        if isinstance(value, list):
            return [strip(item) for item in value]
        if isinstance(value, str) and root and root not in ("", ".") and value.startswith(root + "/"):
            return RUN_ROOT + value[len(root):]
        return value

    setting = {key: strip(value) for key, value in config.items() if key not in ("seed", "output_dir")}
    return json.dumps(setting, sort_keys=True, default=str)


def group_label(names: list) -> str:
    """A group's name: its runs' common name with the seed taken out (`adamw-seed1/remax` -> `adamw/remax`)."""
    stripped = {re.sub(r"[-_.]?seed[-_]?\d+", "", name) for name in names}
    return stripped.pop() if len(stripped) == 1 and all(stripped) else names[0]


def seed_groups(configs: dict) -> dict:
    """{group label: [run names]} from {run name: resolved config}, in the runs' order: runs whose settings
    are equal (`setting_of`) form one group; a run without a config is a group of its own."""
    by_setting: dict = {}
    for name, config in configs.items():
        key = setting_of(config) if config else f"run {name}"
        by_setting.setdefault(key, []).append(name)
    groups = {}
    for members in by_setting.values():
        label = group_label(members) if len(members) > 1 else members[0]
        while label in groups:  # two settings whose names differ only by seed: keep them apart
            label += "'"
        groups[label] = members
    return groups
