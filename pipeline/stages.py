"""The table of stages: what the runner, the memory plan, `--dry-run`, the benchmarks and the tests read
to know which stages exist and what each one trains, samples and holds frozen.

A new algorithm is one stage file under stages/ (its config class with its own section, and `run`),
one row here, and its configs and script.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Optional


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    module: str                    # `python -m <module>` runs it
    config_name: str               # its config class, in `module`
    script: str                    # its launch script
    data_format: str               # the `data.format` it trains on
    section: Optional[str] = None  # its own config section
    trains_reward_model: bool = False  # the trained model is a RewardModel (scores, no LM head)
    pairs: bool = False            # each row is a pair, forwarded stacked (2 sequences)
    reference: bool = False        # a frozen reference policy (or the LoRA actor without adapters)
    samples: bool = False          # generates from prompts and rewards them (a frozen reward model, reward functions)
    critic: bool = False           # trains a value model beside the actor

    @property
    def config_class(self):
        return getattr(importlib.import_module(self.module), self.config_name)

    @property
    def run(self):
        return importlib.import_module(self.module).run


STAGES = {spec.name: spec for spec in (
    StageSpec("sft", "stages.sft", "SFTConfig", "training_scripts/sft/run_sft_full.sh", "sft"),
    StageSpec("reward", "stages.reward", "RewardConfig", "training_scripts/reward/run_reward.sh", "pairwise",
              trains_reward_model=True, pairs=True),
    StageSpec("dpo", "stages.dpo", "DpoConfig", "training_scripts/dpo/run_dpo.sh", "pairwise", section="dpo",
              pairs=True, reference=True),
    StageSpec("remax", "stages.remax", "RemaxConfig", "training_scripts/po/remax/run_remax.sh", "prompt",
              section="remax", reference=True, samples=True),
    StageSpec("rloo", "stages.rloo", "RlooConfig", "training_scripts/po/rloo/run_rloo.sh", "prompt",
              section="rloo", reference=True, samples=True),
    StageSpec("grpo", "stages.grpo", "GrpoConfig", "training_scripts/po/grpo/run_grpo.sh", "prompt",
              section="grpo", reference=True, samples=True),
    StageSpec("ppo", "stages.ppo", "PpoConfig", "training_scripts/po/ppo/run_ppo.sh", "prompt",
              section="ppo", reference=True, samples=True, critic=True),
)}

SAMPLING_STAGES = tuple(name for name, spec in STAGES.items() if spec.samples)


def stage_named(values: dict) -> str:
    """The stage a config (its top-level keys and values, validated or not) is for: the stage whose own
    section it has, else the one whose data format it names (pairwise: the reward model), else sft."""
    for spec in STAGES.values():
        if spec.section is not None and spec.section in values:
            return spec.name
    data = values.get("data") or {}
    data_format = data.get("format") if isinstance(data, dict) else getattr(data, "format", None)
    return "reward" if data_format == "pairwise" else "sft"
