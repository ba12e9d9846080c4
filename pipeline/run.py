"""What every stage does before and around its loop: the command line, the run directory,
and turning known user errors into a short message and exit code 2.

    python -m stages.sft --config configs/tiny/sft_full.yaml engine.zero_stage=3 [--debug]
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .checkpoint import ResumeError, check_resumable
from .config import ConfigError, load_config, save_config

logger = logging.getLogger(__name__)
EXIT_USER_ERROR = 2


class RunDirError(ValueError):
    """The output directory holds a run that this one would overwrite."""


def user_errors() -> tuple:
    """Exceptions that describe bad input, reported without a traceback unless --debug."""
    from optimizers import ShardMismatchError  # optimizer state saved at another world size

    from .engine import EngineConfigError  # imported late: these import deepspeed
    from .loop import NonFiniteStepsError
    errors = [ConfigError, RunDirError, EngineConfigError, FileNotFoundError, ShardMismatchError, ResumeError,
              NonFiniteStepsError]
    for module, name in (("pipeline.data", "DataError"), ("pipeline.models", "ModelLoadError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def parse_args(argv: Optional[Sequence[str]] = None, description: str = "") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, build the model on the meta device and print the memory plan; no training")
    parser.add_argument("--world-size", type=int, default=None, help="ranks to plan for in a dry run")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied after the file")
    return parser.parse_args(argv)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def check_run_dir(config, world_size: int) -> None:
    """Refuses, before anything is loaded or written, a run that would clobber or cannot continue one.

    A directory holding `metrics.jsonl` or `checkpoints/` is a run: it is continued only with
    `checkpoint.resume=true` and replaced only with `checkpoint.overwrite=true`.

    Raises:
        RunDirError: naming the directory and both ways forward.
        ResumeError: with `checkpoint.resume`, the newest checkpoint was written by another number of ranks.
    """
    output_dir = Path(config.output_dir)
    existing = [name for name in ("metrics.jsonl", "checkpoints", "final", "best") if (output_dir / name).exists()]
    if existing and not (config.checkpoint.resume or config.checkpoint.overwrite):
        raise RunDirError(f"`output_dir` {output_dir} already holds a run ({', '.join(existing)}); "
                          "continue it with checkpoint.resume=true, start afresh with checkpoint.overwrite=true, "
                          "or choose another output_dir")
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"`output_dir` {output_dir} is a file, not a directory; choose another output_dir")
    if config.checkpoint.resume:
        check_resumable(output_dir, world_size)


def start_run_dir(config) -> Path:
    """Claims `output_dir` for this run: the old run's outputs go under `checkpoint.overwrite`, and the
    resolved config is written. Call it once everything the run needs has loaded and checked out
    (`create_engine` does), so a run that fails on bad data or a bad model leaves an earlier run as it was.
    """
    output_dir = Path(config.output_dir)
    if config.checkpoint.overwrite and not config.checkpoint.resume and rank() == 0:
        # Asked for explicitly: an old run's checkpoints left behind would be picked up by a later resume.
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
        for name in ("checkpoints", "final", "best", "tensorboard"):
            shutil.rmtree(output_dir / name, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank() == 0:
        save_config(config, output_dir / "config.yaml")
    return output_dir


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights; data order is set by the sampler."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dry_run_plan(config, world_size: int) -> str:
    """The model on the meta device (only config.json is read) and this run's per-rank memory:
    parameters and gradients, and the optimizer state of Adam-mini next to AdamW's."""
    from optimizers import Adam_mini, geometry_from_model

    from .models import apply_lora, count_parameters, load_causal_lm

    model = load_causal_lm(config.model, device="meta")
    if config.model.lora.enabled:
        model = apply_lora(model, config.model.lora)
    total, trainable = count_parameters(model)
    stage = config.engine.zero_stage
    adam_mini = Adam_mini(model.named_parameters(), **geometry_from_model(model))
    # Both optimizers keep fp32 state; AdamW two values per element of this rank's slice.
    mini_bytes = max(adam_mini.planned_state_bytes(world_size, rank, stage) for rank in range(world_size))
    slice_numel, _ = adam_mini.planned_state_numel(world_size, 0, stage)
    adamw_bytes = 2 * 4 * slice_numel
    bytes_per_param = 2 if config.engine.precision in ("bf16", "fp16") else 4
    shard = world_size if stage == 3 else 1
    gib = 2**30
    chosen = "adam_mini" if config.optim.name == "adam_mini" else "adamw"
    lines = [f"dry run: {config.model.path or 'model.config'} on the meta device, ZeRO-{stage}, "
             f"{world_size} rank(s), {config.engine.precision}",
             f"  parameters            {total:>16,}",
             f"  trainable parameters  {trainable:>16,}",
             f"  weights per rank      {total * bytes_per_param / shard / gib:>12.2f} GiB",
             "  optimizer state per rank (fp32):",
             f"    adam_mini           {mini_bytes / gib:>12.2f} GiB{'  <- chosen' if chosen == 'adam_mini' else ''}",
             f"    adamw               {adamw_bytes / gib:>12.2f} GiB{'  <- chosen' if chosen == 'adamw' else ''}",
             f"    adam_mini / adamw   {mini_bytes / adamw_bytes:>12.3f}"]
    return "\n".join(lines)


def main(stage: Callable, config_class, argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    """Loads the config, checks the run directory and runs `stage(config)`; the stage's `create_engine`
    claims the directory (`start_run_dir`) once data and model have loaded.

    Returns the process exit code: 0, or EXIT_USER_ERROR after printing a one-paragraph
    message for bad input (the traceback only with --debug).
    """
    args = parse_args(argv, description)
    logging.basicConfig(level=logging.INFO if rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_class, args.config, args.overrides)
        if args.dry_run:
            print(dry_run_plan(config, args.world_size or int(os.environ.get("WORLD_SIZE", "1"))))
            return 0
        check_run_dir(config, int(os.environ.get("WORLD_SIZE", "1")))
        seed_everything(config.seed)
        stage(config)
    except user_errors() as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
