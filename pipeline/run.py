"""The stage entry point: the command line, the config, the run directory check, seeding, and
turning known user errors into a short message and exit code 2.

    python -m stages.sft --config configs/tiny/sft_full.yaml engine.zero_stage=3 [--debug]
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import random
import runpy
import sys
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .checkpoint import ResumeError
from .config import ConfigError, load_config
from .rundir import RunDirectory, RunDirError
from .versions import exit_on_incompatible_versions

logger = logging.getLogger(__name__)
EXIT_USER_ERROR = 2


def run_as_main(module: str, argv: Sequence) -> int:
    """Runs `python -m MODULE ARGV` in this process (its entry point, argument parsing and exit code), as
    the benchmarks and tests do to run several stages in one launch; returns the exit code."""
    saved_argv, sys.argv = sys.argv, [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exit_:
        return exit_.code or 0
    finally:
        sys.argv = saved_argv


def user_errors() -> tuple:
    """Exceptions that describe bad input, reported without a traceback unless --debug."""
    from optimizers import ShardMismatchError  # optimizer state saved at another world size

    from .engine import EngineConfigError  # imported late: these import deepspeed
    from .loop import NonFiniteStepsError
    errors = [ConfigError, RunDirError, EngineConfigError, FileNotFoundError, ShardMismatchError, ResumeError,
              NonFiniteStepsError]
    for module, name in (("pipeline.data", "DataError"), ("pipeline.models", "ModelLoadError"),
                         ("pipeline.rl.rewards", "RewardFunctionError")):
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


def configure_console(debug: bool) -> None:
    """Rank 0 shows what a person needs (data kept, plan, one line per logged step, where things were
    written); other ranks only warnings. DeepSpeed's and transformers' chatter, per-rank
    FutureWarnings and the export's shard-writing bars stay behind --debug."""
    logging.basicConfig(level=logging.INFO if rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if debug:
        return
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Client optimizers under ZeRO are what this project does, on purpose (zero_allow_untested_optimizer).
    logging.getLogger("DeepSpeed").addFilter(lambda record: "untested optimizer" not in record.getMessage())


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights; data order is set by the sampler."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finish_collectives() -> None:
    """Waits, on every rank, for the collectives still in flight, and keeps the wait's handle for the
    rest of the process. ZeRO-3 prefetches parameters with all-gathers nobody waits for once the run
    ends. Gloo's barrier waits for (and holds) all work queued before it, and whichever thread drops
    a work last frees its tensors: one of gloo's worker threads doing so during interpreter
    finalization needs the interpreter and aborts the rank ("terminate called without an active
    exception", exit -6). Held here, the last reference is this thread's."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        barrier = dist.barrier(async_op=True)
        barrier.wait()
        _FINISHED_WORK.append(barrier)


_FINISHED_WORK: list = []


def leave_process_group() -> None:
    """Shuts down this process's vLLM engines, then leaves torch's process group, while the interpreter
    is whole (as finish_collectives, the group's threads must not outlive it). The engines go first
    because their shutdown destroys the groups they made over the trainer's."""
    if "pipeline.rl.vllm_engine" in sys.modules:  # imported only where a run asked for vLLM
        sys.modules["pipeline.rl.vllm_engine"].shut_down_engines()
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(stage: Callable, config_class, argv: Optional[Sequence[str]] = None, description: str = "") -> int:
    """Loads the config, checks the run directory and runs `stage(config)`; the training loop claims
    the directory once data and models have loaded.

    Returns the process exit code: 0, or EXIT_USER_ERROR after printing a one-paragraph
    message for bad input (the traceback only with --debug).
    """
    args = parse_args(argv, description)
    exit_on_incompatible_versions(EXIT_USER_ERROR)
    configure_console(args.debug)
    try:
        config = load_config(config_class, args.config, args.overrides)
        if args.dry_run:
            from .plan import dry_run_plan  # builds a meta model: only dry runs pay for the import

            print(dry_run_plan(config, args.world_size or int(os.environ.get("WORLD_SIZE", "1"))))
            return 0
        RunDirectory(config).check(int(os.environ.get("WORLD_SIZE", "1")))
        atexit.unregister(leave_process_group)  # once, however many stages this process runs
        atexit.register(leave_process_group)
        seed_everything(config.seed)
        stage(config)
        finish_collectives()
    except user_errors() as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
