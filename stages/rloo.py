"""RLOO: REINFORCE with a leave-one-out baseline over k samples per prompt (Ahmadian et al. 2024), no critic.

    python -m stages.rloo --config configs/tiny/rloo.yaml [key.sub=value ...]
    deepspeed --num_gpus 2 --module stages.rloo --config configs/llama2-7b/rloo.yaml

Per prompt the actor samples `rloo.num_samples` (k) responses; the frozen reward model scores each.
By default the KL to the frozen reference goes into the reward (r - kl_coef * the log-ratio summed
over the response), and each sample's advantage is its reward minus the mean reward of the other
k - 1 samples of its prompt, credited to every token. The loss is PPO's clipped surrogate, token mean;
with one update per rollout (the default) its ratio is 1 and it is REINFORCE with that baseline, the
old log-probabilities being the current ones detached (no second actor forward).
`rloo.kl_penalty: loss` charges the KL as a k3 loss term instead; `rloo.updates_per_rollout` > 1
trains on each rollout for that many optimizer steps, the ratio then clipped to 1 +- clip_range.
"""
from __future__ import annotations

import dataclasses
import sys

from pipeline.rl.algos import rloo_advantage
from pipeline.rl.sections import GroupSection, SamplingRunConfig
from pipeline.rl.stage import run_group_stage
from pipeline.run import main


@dataclasses.dataclass
class RlooSection(GroupSection):
    kl_penalty: str = "reward"  # the RLOO paper's sequence-level penalty


@dataclasses.dataclass
class RlooConfig(SamplingRunConfig):
    rloo: RlooSection = dataclasses.field(default_factory=RlooSection)

    def problems(self) -> list:
        return super().problems() + self.rloo.problems(self, "rloo")


def run(config: RlooConfig) -> dict:
    """Trains the actor for the planned steps; returns the last evaluation's metrics."""
    k = config.rloo.num_samples
    return run_group_stage(config, config.rloo, "rloo", lambda reward: rloo_advantage(reward, k))


if __name__ == "__main__":
    sys.exit(main(run, RlooConfig, description=__doc__.splitlines()[0]))
