"""The model set of a policy stage: the trained actor, the frozen reference (or the LoRA actor with its
adapters disabled), and optionally the frozen reward model, the reward functions and PPO's trained critic.
DPO builds the same set without a reward model.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Callable, Optional

from pipeline.chunked_logits import LOGITS_CHUNK
from pipeline.engine import create_engine, create_frozen_engine, frozen_ds_config, sharded_creation, training_ds_config
from pipeline.models import (RewardModel, adapters_disabled, apply_lora, enable_gradient_checkpointing, load_causal_lm,
                             load_reference, model_dtype)
from pipeline.rl.sections import FrozenModel


@dataclasses.dataclass
class Models:
    actor: object                     # training DeepSpeed engine
    reference: Optional[object]       # frozen engine the KL is measured against; None: the LoRA actor without adapters
    tokenizer: object
    reward: Optional[object] = None   # frozen engine around a RewardModel (None for DPO)
    gold_reward: Optional[Callable] = None   # (prompts, responses) -> list of floats
    missing_eos_penalty: Optional[float] = None
    critic: Optional[object] = None   # PPO's value model: a training engine of its own
    logits_chunk: int = LOGITS_CHUNK  # tokens of logits at once in every log-probability (`model.logits_chunk`)
    reward_functions: Optional[object] = None  # pipeline.rl.rewards.RewardFunctions, added to the model's score


def load_reward_model(config, path: str, field: str, dtype) -> RewardModel:
    """The reward model at `path` (a frozen scorer, or PPO's critic to train) in `dtype`, with the run's
    attention implementation and remote-code setting; errors name `field`."""
    return RewardModel.from_pretrained(path, dtype=dtype, attn_implementation=config.model.attn_implementation,
                                       trust_remote_code=config.model.trust_remote_code, field=field)


def build_models(config, tokenizer, total_steps: int, reference: FrozenModel, reward: Optional[FrozenModel] = None,
                 gold_reward: Optional[Callable] = None, missing_eos_penalty: Optional[float] = None,
                 reward_functions=None):
    """(Models, the actor's TrainingEngine): the actor from `model`, the frozen `reference` and, when
    given, the frozen `reward` model and the reward functions.

    Raises:
        ModelLoadError: naming `model.path` or the frozen model's field.
        EngineConfigError: as create_engine / create_frozen_engine.
    """
    # Every model loads in the precision it runs in (bf16 engines: bf16 straight from safetensors).
    dtype = model_dtype(config.model, config.engine.precision)
    # One model at a time: each is created (sharded from the start where its engine is ZeRO-3) and
    # wrapped in its engine before the next loads, so load transients never stack. The frozen models
    # first: a wrong path fails before minutes of loading the actor.
    reward_engine = None
    if reward is not None:
        with sharded_creation(frozen_ds_config(config, reward.zero_stage, reward.offload)):
            reward_model = load_reward_model(config, reward.path, reward.field, dtype)
        reward_engine = create_frozen_engine(config, reward_model, zero_stage=reward.zero_stage, offload=reward.offload)
    # From its own files (memory-mapped), never a copy of the actor; None with LoRA: the actor with its
    # adapters disabled is the reference, with no second copy of the weights at all.
    with sharded_creation(frozen_ds_config(config, reference.zero_stage, reference.offload)):
        reference_model = load_reference(config.model, reference.path, dtype=dtype, field=reference.field)
    copy_reference = reference_model is None and not config.model.lora.enabled
    frozen = lambda model: create_frozen_engine(config, model, zero_stage=reference.zero_stage,  # noqa: E731
                                                offload=reference.offload)
    reference_engine = None if reference_model is None else frozen(reference_model)
    # A fresh model (`model.config`) has no files: its reference is a copy of its starting weights,
    # so it is built whole (only test and demo models are built from a config).
    with contextlib.nullcontext() if copy_reference else sharded_creation(training_ds_config(config)):
        actor = load_causal_lm(config.model, dtype=dtype)
    if copy_reference:
        # DeepSpeed casts it as it does the actor (parameters only: `.to(bf16)` would also round RoPE's inv_freq).
        reference_engine = frozen(copy.deepcopy(actor))
    if config.model.lora.enabled:
        actor = apply_lora(actor, config.model.lora)
    built = create_engine(config, actor, total_steps)
    models = Models(actor=built.engine, reference=reference_engine, tokenizer=tokenizer, reward=reward_engine,
                    gold_reward=gold_reward, missing_eos_penalty=missing_eos_penalty,
                    logits_chunk=config.model.logits_chunk, reward_functions=reward_functions)
    return models, built


def build_critic(config, init: str, reward_model_path: str, lr: Optional[float], total_steps: int):
    """PPO's critic as a TrainingEngine: a RewardModel from `reward_model_path` (`init` "reward") or from
    `model` with a new v_head ("policy"), trained by the configured optimizer at `lr` (None: `optim.lr`)
    under the actor's ZeRO settings.

    Raises:
        ModelLoadError: naming `ppo.reward_model_path` or `model.path`.
    """
    model_config = config.model
    dtype = model_dtype(model_config, config.engine.precision)
    critic_config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=lr or config.optim.lr))
    # At ZeRO-3 each parameter is split over the ranks as it is created, as the actor's are.
    with sharded_creation(training_ds_config(critic_config)):
        if init == "reward":
            critic = load_reward_model(config, reward_model_path, "ppo.reward_model_path", dtype)
        else:
            critic = RewardModel.from_causal_lm(model_config, dtype=dtype)  # LoRA is the actor's only
    if init == "reward" and model_config.gradient_checkpointing:
        enable_gradient_checkpointing(critic.backbone, model_config.offload_activations)
    return create_engine(critic_config, critic, total_steps)


@contextlib.contextmanager
def reference_policy(models: Models):
    """The frozen reference, or the LoRA actor with its adapters disabled when there is none."""
    if models.reference is not None:
        yield models.reference
    else:
        with adapters_disabled(models.actor) as reference:
            yield reference
