"""The run directory (`output_dir`) and everything written into it, owned by one object.

    run = RunDirectory(config)         # nothing touched yet
    run.check(world_size)              # before loading: refuses to clobber a run, or a resume it cannot continue
    ...load data and models, build engines...
    run.claim(ds_config)               # the first write: config.yaml, ds_config.json (old outputs removed
                                       # under checkpoint.overwrite)
    state = run.resume(engine)         # trainer state of the newest complete checkpoint, or None
    run.metrics_logger(resume_step)    # metrics.jsonl + TensorBoard, rank 0
    run.save_checkpoint(engine, step, state)
    run.export(engine, tokenizer, "final")   # or "best", with metadata

Claiming happens only once data and models have loaded, so a run that fails on bad input
leaves an earlier run in the same directory byte for byte.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from .checkpoint import (ResumeError, check_resumable, export_final, latest_checkpoint, load_checkpoint,
                         save_checkpoint, verify_on_rank_zero)
from .config import save_config
from .metrics import MetricsLogger

logger = logging.getLogger(__name__)

RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "final", "best")


class RunDirError(ValueError):
    """The output directory holds a run that this one would overwrite."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class RunDirectory:
    def __init__(self, config):
        self.config = config
        self.path = Path(config.output_dir)

    def check(self, world_size: int) -> None:
        """Refuses, before anything is loaded or written, a run that would clobber or cannot continue one.

        A directory holding `metrics.jsonl`, `checkpoints/`, `final/` or `best/` is a run: it is
        continued only with `checkpoint.resume=true` and replaced only with `checkpoint.overwrite=true`.

        Raises:
            RunDirError: naming the directory and both ways forward.
            ResumeError: with `checkpoint.resume`, the newest checkpoint was written by another number of ranks
                and cannot continue on this many (another optimizer or global batch).
        """
        checkpoint = self.config.checkpoint
        existing = [name for name in RUN_OUTPUTS if (self.path / name).exists()]
        if existing and not (checkpoint.resume or checkpoint.overwrite):
            raise RunDirError(f"`output_dir` {self.path} already holds a run ({', '.join(existing)}); "
                              "continue it with checkpoint.resume=true, start afresh with checkpoint.overwrite=true, "
                              "or choose another output_dir")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"`output_dir` {self.path} is a file, not a directory; choose another output_dir")
        if checkpoint.resume:
            from .engine import batch_plan  # imported here: the engine module pulls in DeepSpeed

            check_resumable(self.path, world_size, batch_plan(self.config, world_size).global_batch_size)

    def claim(self, ds_config: Optional[dict] = None) -> Path:
        """Takes `output_dir` for this run: an overwritten run's outputs go, the resolved config and the
        DeepSpeed config (exactly what DeepSpeed was given) are written. Collective when distributed.

        Raises:
            ResumeError: resuming, and the checkpoint's files fail `verify_checkpoint` (nothing written).
        """
        checkpoint = self.config.checkpoint
        newest = latest_checkpoint(self.path) if checkpoint.resume else None
        if newest is not None:
            # Refused before the resumed run writes anything: its files' SHA-256 and safe unpickling.
            verify_on_rank_zero(newest)
        if _rank() == 0:
            if checkpoint.overwrite and not checkpoint.resume:
                # Asked for explicitly: an old run's checkpoints left behind would be picked up by a later resume.
                (self.path / "metrics.jsonl").unlink(missing_ok=True)
                for name in ("checkpoints", "final", "best", "tensorboard"):
                    shutil.rmtree(self.path / name, ignore_errors=True)
            self.path.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.path / "config.yaml")
            if ds_config is not None:
                (self.path / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
        _barrier()
        return self.path

    def resume(self, engine, extra_engines: Optional[dict] = None) -> Optional[dict]:
        """With `checkpoint.resume`, loads the newest complete checkpoint into `engine` (and `extra_engines`,
        and every rank's RNG states) and returns its trainer state; None when the run starts from step 0."""
        if not self.config.checkpoint.resume:
            return None
        checkpoint = latest_checkpoint(self.path)
        if checkpoint is None:
            return None
        state = load_checkpoint(engine, checkpoint, extra_engines, verify=False)  # claim() verified it
        logger.info("resumed from %s (step %d)", checkpoint, state["step"])
        return state

    def metrics_logger(self, resume_step: Optional[int]) -> MetricsLogger:
        """metrics.jsonl and TensorBoard on rank 0; a resumed run drops rows logged after its checkpoint."""
        return MetricsLogger(self.path, rank=_rank(), tensorboard=self.config.logging.tensorboard,
                             resume_step=resume_step)

    def save_checkpoint(self, engine, step: int, trainer_state: dict, extra_engines: Optional[dict] = None) -> Path:
        return save_checkpoint(engine, self.path, step, trainer_state, self.config.checkpoint.keep_last,
                               extra_engines)

    def export(self, engine, tokenizer, name: str = "final", metadata: Optional[dict] = None) -> Path:
        """The model as a Hugging Face directory `output_dir/<name>` (with `<name>.json` holding
        `metadata`, if given). Collective. Written beside the target and swapped in, so `<name>/`
        always holds one complete model, even when a run is killed mid-export."""
        staging, retired, target = (self.path / f".{name}_staging", self.path / f".{name}_retired",
                                    self.path / name)
        rank = _rank()
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run cut off mid-export
        _barrier()
        export_final(engine, tokenizer, staging)  # writes staging/final
        if rank == 0:
            shutil.rmtree(retired, ignore_errors=True)
            if target.exists():
                target.rename(retired)
            (staging / "final").rename(target)
            if metadata is not None:
                (target / f"{name}.json").write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
            shutil.rmtree(retired, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()
        return target


__all__ = ["RunDirectory", "RunDirError", "ResumeError", "RUN_OUTPUTS"]
