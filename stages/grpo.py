"""GRPO: group-relative policy optimisation over k samples per prompt (Shao et al. 2024), no critic.

    python -m stages.grpo --config configs/tiny/grpo.yaml [key.sub=value ...]
    deepspeed --num_gpus 2 --module stages.grpo --config configs/llama2-7b/grpo.yaml

Per prompt the actor samples `grpo.num_samples` (k) responses; the frozen reward model scores each.
A sample's advantage is its reward minus its group's mean, divided by the group's standard deviation
(`grpo.scale_rewards: false` keeps it unscaled, as Dr. GRPO); a group whose rewards are all equal gets
zero. The loss is PPO's clipped surrogate over every response token (token mean), trained on each
rollout for `grpo.updates_per_rollout` optimizer steps, plus kl_coef times the k3 estimate of the KL
to the frozen reference (`grpo.kl_penalty: reward` puts the summed log-ratio into the reward instead).
With one update per rollout the old log-probabilities are the current ones detached (no second forward).
"""
from __future__ import annotations

import dataclasses
import sys

from pipeline.rl.algos import grpo_advantage
from pipeline.rl.sections import GroupSection, SamplingRunConfig
from pipeline.rl.stage import run_group_stage
from pipeline.run import main


@dataclasses.dataclass
class GrpoSection(GroupSection):
    kl_penalty: str = "loss"      # k3 per token in the loss, as DeepSeekMath's GRPO
    scale_rewards: bool = True    # divide by the group's std; false: only subtract its mean
    std_eps: float = 1e-4         # added to the std so that nearly equal rewards do not blow up


@dataclasses.dataclass
class GrpoConfig(SamplingRunConfig):
    grpo: GrpoSection = dataclasses.field(default_factory=GrpoSection)

    def problems(self) -> list:
        problems = super().problems() + self.grpo.problems(self, "grpo")
        if not self.grpo.std_eps > 0:
            problems.append(f"`grpo.std_eps` is {self.grpo.std_eps}; it must be positive")
        return problems


def run(config: GrpoConfig) -> dict:
    """Trains the actor for the planned steps; returns the last evaluation's metrics."""
    grpo = config.grpo
    return run_group_stage(config, grpo, "grpo", lambda reward: grpo_advantage(
        reward, grpo.num_samples, scale=grpo.scale_rewards, eps=grpo.std_eps))


if __name__ == "__main__":
    sys.exit(main(run, GrpoConfig, description=__doc__.splitlines()[0]))
