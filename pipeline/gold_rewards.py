"""The synthetic tasks' gold rewards by name: the one registry that the configs' `gold_reward` fields
and the `*_gold` reward functions read. Light to import: a task's module loads on first use."""
from __future__ import annotations

import importlib
from typing import Callable

# Gold reward name -> the task module whose `gold_reward_batch(prompts, responses)` it is.
GOLD_REWARD_MODULES = {"demo": "pipeline.demo_task", "compare": "pipeline.compare_task"}
GOLD_REWARDS = tuple(GOLD_REWARD_MODULES)


def gold_reward_batch(name: str) -> Callable:
    """The batch gold reward of task `name` (one of GOLD_REWARDS).

    Raises:
        ImportError: the task's module cannot be imported.
    """
    return importlib.import_module(GOLD_REWARD_MODULES[name]).gold_reward_batch
