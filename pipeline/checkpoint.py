"""DeepSpeed checkpoints holding everything a run needs to continue exactly where it stopped.

One checkpoint is `output_dir/checkpoints/step_<N>/`:

    DeepSpeed's files     model, ZeRO optimizer shards, scheduler (`engine.save_checkpoint`)
    rng_rank<r>.pt        each rank's python / numpy / torch (and CUDA) RNG states
    trainer_state.json    {"step": N, the data position (epoch, batch index), stage extras}
    <name>/               DeepSpeed's files of each further training engine (PPO's `critic/`)
    ranks.json            the rank count, batch split, ZeRO stage and optimizer it was written with
    COMPLETE              written by rank 0 last, once every rank has finished writing: the step, then
                          the SHA-256 of every other file (`sha256sum` lines)

A directory without COMPLETE was cut off mid-write and is never loaded. Before anything of a checkpoint
is read, every file COMPLETE lists is checked against its SHA-256 (a changed or truncated file is
refused, named), and every `.pt` file, DeepSpeed's own included, is unpickled with
`torch.load(weights_only=True)` and only the classes DeepSpeed writes allowed: nothing read runs code.
All ranks must see the same `output_dir` (a shared filesystem), as DeepSpeed's own checkpoints require.

A checkpoint continues on another number of ranks when Adam-mini wrote it under ZeRO-1/2/3 and the
global batch (rows per optimizer step) stays the same: `optimizers.reshard` puts the ranks' pieces
together once (`adam_mini_full_state.pt`, beside the checkpoint's files) and each new rank takes its
own. With the same global batch every step sees the same rows and the schedule keeps its length.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from pickle import UnpicklingError  # the error torch.load(weights_only=True) raises; nothing is unpickled here
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_FILE = "trainer_state.json"
RANKS_FILE = "ranks.json"
_STEP_DIR = re.compile(r"step_(\d+)")
logger = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A checkpoint this run cannot continue from; the message says what to do instead."""


def rng_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / f"rng_rank{rank}.pt"


# ---- RNG state ----------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """This process's python, numpy, torch CPU and (if present) CUDA RNG states, in types
    that `torch.load(..., weights_only=True)` accepts (numpy's array becomes a list)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": str(name), "keys": keys.tolist(), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Puts back what `capture_rng_state` returned. CUDA states are restored for the
    devices this process sees (a saved state for a device that is not here is skipped)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], np.asarray(numpy_state["keys"], dtype=np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


# ---- finding and pruning ------------------------------------------------------------------------

def _scan(output_dir) -> tuple:
    """(complete, incomplete): lists of (step, path) under `output_dir/checkpoints`."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    complete, incomplete = [], []
    if not root.is_dir():
        return complete, incomplete
    for child in root.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and child.is_dir():
            entry = (int(match.group(1)), child)
            (complete if (child / COMPLETE_MARKER).is_file() else incomplete).append(entry)
    return sorted(complete), sorted(incomplete)


def latest_checkpoint(output_dir) -> Optional[Path]:
    """The complete checkpoint with the highest step under `output_dir/checkpoints`, or None."""
    complete, _ = _scan(output_dir)
    return complete[-1][1] if complete else None


def _remove(checkpoint: Path) -> None:
    # The marker goes first, so a reader never takes a half-deleted directory for a checkpoint.
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(checkpoint)


def prune_checkpoints(output_dir, keep_last: int, protect: Optional[Path] = None) -> list:
    """Deletes complete checkpoints beyond the newest `keep_last` (never `protect`) and
    incomplete directories older than the newest complete checkpoint. Returns what it deleted.

    Incomplete directories newer than that are left alone: they are never loaded, and a save
    at their step replaces them.
    """
    complete, incomplete = _scan(output_dir)
    if not complete:
        return []
    protect = Path(protect).resolve() if protect is not None else None
    doomed = [path for _, path in complete[:-keep_last] if path.resolve() != protect]
    newest_step = complete[-1][0]
    doomed += [path for step, path in incomplete if step < newest_step]
    for path in doomed:
        _remove(path)
    return doomed


# ---- integrity and safe unpickling ---------------------------------------------------------------

def file_digests(checkpoint: Path) -> dict:
    """{path relative to `checkpoint`: SHA-256 hex} of every file under it but COMPLETE, sorted."""
    digests = {}
    for path in sorted(p for p in Path(checkpoint).rglob("*") if p.is_file()):
        name = path.relative_to(checkpoint).as_posix()
        if name == COMPLETE_MARKER:
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 22), b""):
                digest.update(chunk)
        digests[name] = digest.hexdigest()
    return digests


def recorded_digests(checkpoint: Path) -> Optional[dict]:
    """{relative path: SHA-256} that COMPLETE records; None for a checkpoint written before COMPLETE
    recorded them (its first line, the step, alone)."""
    lines = (Path(checkpoint) / COMPLETE_MARKER).read_text(encoding="utf-8").splitlines()[1:]
    recorded = {}
    for line in lines:
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise ResumeError(f"{checkpoint / COMPLETE_MARKER}: the line {line!r} is not '<sha256>  <file>'")
        recorded[name] = digest
    return recorded or None


def verify_checkpoint(checkpoint: Path) -> None:
    """Checks every file COMPLETE records against its SHA-256, then that every `.pt` file unpickles
    with weights_only (memory-mapped: the tensors are not read), before anything of it is loaded.

    Raises:
        ResumeError: a recorded file is missing or differs from what was written, a `.pt` file holds
            objects beyond tensors and DeepSpeed's records (each named), or COMPLETE is malformed.
    """
    recorded = recorded_digests(checkpoint)
    if recorded is None:
        logger.warning("%s records no SHA-256 of its files (written by an earlier version): its files are "
                       "loaded unverified, still without running any pickled code", checkpoint)
    else:
        found = file_digests(checkpoint)
        for name, digest in recorded.items():
            if name not in found:
                raise ResumeError(f"{checkpoint / name} is missing: the checkpoint is incomplete; resume from "
                                  "another checkpoint or start afresh")
            if found[name] != digest:
                raise ResumeError(f"{checkpoint / name} differs from what was written (SHA-256 {found[name][:12]}..., "
                                  f"recorded {digest[:12]}...): it was changed or truncated; refusing to load the "
                                  "checkpoint")
    for path in sorted(Path(checkpoint).rglob("*.pt")):
        _load_weights_only(path, mmap=True)


def verify_on_rank_zero(checkpoint: Path) -> None:
    """`verify_checkpoint` read by rank 0 alone (the directory is shared), its verdict raised on every rank.

    Raises:
        ResumeError: on every rank, as `verify_checkpoint` raises it on rank 0.
    """
    distributed = dist.is_available() and dist.is_initialized()
    problem = [None]
    if not distributed or dist.get_rank() == 0:
        try:
            verify_checkpoint(checkpoint)
        except ResumeError as error:
            problem[0] = str(error)
    if distributed:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ResumeError(problem[0])


def _load_weights_only(path: Path, map_location="cpu", mmap: bool = False):
    """A checkpoint file through `optimizers.reshard.load_deepspeed_file` (tensors and DeepSpeed's own
    records only); mmap where the file's format allows it.

    Raises:
        ResumeError: the file holds any other pickled object, naming the file and the refused global.
    """
    from optimizers.reshard import load_deepspeed_file

    try:
        try:
            return load_deepspeed_file(path, map_location=map_location, mmap=mmap)
        except RuntimeError as error:  # a file in torch's legacy format cannot be memory-mapped
            if not mmap or "mmap" not in str(error):
                raise
            return load_deepspeed_file(path, map_location=map_location)
    except UnpicklingError as error:
        raise ResumeError(f"{path} holds objects other than tensors and DeepSpeed's own records, which could "
                          f"run code when unpickled; refusing to load it ({str(error).splitlines()[0]})") from None


class _WeightsOnlyLoads:
    """An engine's DeepSpeed checkpoint engine whose loads unpickle tensors and DeepSpeed's own
    records only (DeepSpeed 0.19's `TorchCheckpointEngine.load` passes weights_only=False)."""

    def __init__(self, checkpoint_engine):
        self._checkpoint_engine = checkpoint_engine

    def __getattr__(self, name):
        return getattr(self._checkpoint_engine, name)

    def load(self, path, map_location=None):
        return _load_weights_only(path, map_location=map_location)


def _deepspeed_load(engine, directory: Path, tag: str) -> None:
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyLoads(original)
    try:
        load_path, _ = engine.load_checkpoint(str(directory), tag=tag)
    finally:
        engine.checkpoint_engine = original
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {directory / tag} (engine.load_checkpoint "
                           "returned no path; its log above says why)")


def _load_rng_state(path: Path) -> dict:
    return _load_weights_only(path)


# ---- save and load ------------------------------------------------------------------------------

def save_checkpoint(engine, output_dir, step: int, trainer_state: dict, keep_last: int,
                    extra_engines: Optional[dict] = None) -> Path:
    """Writes `output_dir/checkpoints/step_<step>/` (see the module docstring); every rank calls it.

    `trainer_state` is what the stage needs to continue (epoch, batch index, extras); it is
    written, with "step", to trainer_state.json and also handed to DeepSpeed as client_state.
    `extra_engines` ({name: engine}) are saved into `<checkpoint>/<name>/`, before COMPLETE.
    Afterwards rank 0 prunes old checkpoints (`prune_checkpoints`). Returns the directory.

    Raises:
        ValueError: `keep_last` < 1, or `trainer_state` holds a "step" other than `step`.
        TypeError: `trainer_state` is not JSON-serialisable (raised before anything is written).
        RuntimeError: the engine saves asynchronously, so COMPLETE could precede the files.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last is {keep_last}; keep at least 1 checkpoint")
    if trainer_state.get("step", step) != step:
        raise ValueError(f'trainer_state["step"] is {trainer_state["step"]} but the checkpoint is for step {step}')
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is not None and checkpoint_engine.is_decoupled():
        raise RuntimeError("DeepSpeed's decoupled (asynchronous) checkpoint engine is not supported: the "
                           "COMPLETE marker would be written before the files are")
    state = {"step": step, **trainer_state}
    state_text = json.dumps(state, indent=1)
    rank = dist.get_rank()
    checkpoint = Path(output_dir) / CHECKPOINTS_DIR / f"step_{step}"
    if rank == 0 and checkpoint.exists():
        # Left by a run cut off at this step: its files (perhaps from another world size)
        # must not mix with the new ones.
        _remove(checkpoint)
    dist.barrier()
    engine.save_checkpoint(str(checkpoint.parent), tag=checkpoint.name, client_state={"trainer_state": state})
    for name, extra in (extra_engines or {}).items():
        extra.save_checkpoint(str(checkpoint), tag=name, save_latest=False)
    torch.save(capture_rng_state(), rng_file(checkpoint, rank))
    if rank == 0:
        (checkpoint / TRAINER_STATE_FILE).write_text(state_text + "\n", encoding="utf-8")
        (checkpoint / RANKS_FILE).write_text(json.dumps(_ranks_record(engine), indent=1) + "\n", encoding="utf-8")
    dist.barrier()  # every rank's files are written
    if rank == 0:
        digests = "".join(f"{digest}  {name}\n" for name, digest in file_digests(checkpoint).items())
        (checkpoint / COMPLETE_MARKER).write_text(f"{step}\n{digests}", encoding="utf-8")
    dist.barrier()  # no rank returns before the checkpoint counts as complete
    if rank == 0:
        prune_checkpoints(output_dir, keep_last, protect=checkpoint)
    return checkpoint


def _ranks_record(engine) -> dict:
    """What decides whether a checkpoint can continue on another number of ranks."""
    return {"world_size": dist.get_world_size(), "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "zero_stage": engine.zero_optimization_stage(),
            "optimizer": type(getattr(engine, "basic_optimizer", None)).__name__}


def check_resumable(output_dir, world_size: int, global_batch_size: Optional[int] = None) -> Optional[Path]:
    """The checkpoint a resumed run will load (None: it starts from step 0), checked against this
    run's rank count (and global batch) before any model is built or any file written.

    Raises:
        ResumeError: the checkpoint was written by a different number of ranks and cannot continue on
            this many (see `_check_rank_count`).
    """
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        _check_rank_count(checkpoint, world_size, global_batch_size)
    return checkpoint


def _check_rank_count(checkpoint: Path, world_size: int, global_batch_size: Optional[int] = None) -> Optional[dict]:
    """None when `checkpoint` was written by `world_size` ranks; its ranks.json record when it was
    written by another number and can continue here (Adam-mini, ZeRO-1/2/3, the same global batch).

    Raises:
        ResumeError: another number of ranks, and one of those conditions fails; the message says which.
    """
    saved_ranks = len(list(Path(checkpoint).glob("rng_rank*.pt")))
    if saved_ranks == world_size:
        return None
    record_file = Path(checkpoint) / RANKS_FILE
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else None
    if record is None:
        reason = f"it has no {RANKS_FILE} (written before checkpoints could continue on another number of ranks)"
    elif record["optimizer"] != "Adam_mini" or record["zero_stage"] not in (1, 2, 3):
        reason = (f"it holds {record['optimizer']} state under ZeRO-{record['zero_stage']}; only Adam-mini's under "
                  "ZeRO-1/2/3 is re-cut for another rank count")
    else:
        saved_batch = record["micro_batch_size"] * record["gradient_accumulation_steps"] * record["world_size"]
        if global_batch_size is None or global_batch_size == saved_batch:
            return record
        reason = (f"a run continues on another number of ranks only with the same global batch, so that every "
                  f"step sees the same rows: it trained on {saved_batch} rows per step (micro-batch "
                  f"{record['micro_batch_size']} x accumulation {record['gradient_accumulation_steps']} x "
                  f"{record['world_size']} ranks), this run's is {global_batch_size}; set "
                  f"engine.global_batch_size={saved_batch} (accumulation then follows the rank count)")
    raise ResumeError(f"{checkpoint} was written by {saved_ranks} ranks but this run has {world_size}: {reason}. "
                      f"Resume with {saved_ranks} ranks (NUM_GPUS={saved_ranks}), or start a new run from its "
                      "weights (model.path=<run>/final, or export this checkpoint) without checkpoint.resume")


def load_checkpoint(engine, checkpoint: Path, extra_engines: Optional[dict] = None, verify: bool = True) -> dict:
    """Loads DeepSpeed's state into `engine` (and each of `extra_engines` from `<checkpoint>/<name>/`),
    restores this rank's RNG states and returns the trainer state (with "step"); every rank calls it.

    `verify`: check it first (`verify_checkpoint`); False where the caller has just done so.
    A checkpoint written by another number of ranks (see `_check_rank_count`) is loaded through
    `optimizers.reshard`; the trainer state then also holds "resharded_from" (its ranks.json), from
    which the loop re-derives the data position.

    Raises:
        ResumeError: the checkpoint has no COMPLETE marker, a file differs from its recorded SHA-256, a
            file holds pickled objects beyond tensors and DeepSpeed's records, or it was written by a
            different number of ranks and cannot continue on this many (checked before anything is loaded).
        RuntimeError: DeepSpeed could not load it.
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise ResumeError(f"{checkpoint} is not a complete checkpoint (no {COMPLETE_MARKER} marker: it was cut off "
                          "while being written); use latest_checkpoint() to find one")
    rank = dist.get_rank()
    if verify:
        verify_on_rank_zero(checkpoint)
    record = _check_rank_count(checkpoint, dist.get_world_size(), engine.train_batch_size())
    if record is not None:
        return _load_on_other_rank_count(engine, checkpoint, record, extra_engines or {})
    loads = [(engine, checkpoint.parent, checkpoint.name)]
    loads += [(extra, checkpoint, name) for name, extra in (extra_engines or {}).items()]
    for target, directory, tag in loads:
        _deepspeed_load(target, directory, tag)
    restore_rng_state(_load_rng_state(rng_file(checkpoint, rank)))
    return json.loads((checkpoint / TRAINER_STATE_FILE).read_text(encoding="utf-8"))


def _load_on_other_rank_count(engine, checkpoint: Path, record: dict, extra_engines: dict) -> dict:
    """Weights, Adam-mini state, schedule and DeepSpeed's counters from a checkpoint of another rank
    count, for `engine` and each of `extra_engines` (from `<checkpoint>/<name>/`).

    Rank 0 puts each engine's pieces together once (kept beside that engine's files for a later
    resume); each rank then takes its own pieces. A rank with no saved RNG state (more ranks than
    before) keeps the one its seed gave it.
    """
    from optimizers.reshard import FULL_STATE_FILE, ReshardError, consolidate, load_full_state, restore, save_full_state

    rank = dist.get_rank()
    for target, directory in [(engine, checkpoint)] + [(extra, checkpoint / name) for name, extra in
                                                       extra_engines.items()]:
        full_state_file, problem = directory / FULL_STATE_FILE, [None]
        if rank == 0 and not full_state_file.is_file():
            try:
                save_full_state(consolidate(directory), full_state_file)
            except ReshardError as error:
                problem[0] = str(error)
        dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise ResumeError(f"{checkpoint} cannot continue on {dist.get_world_size()} ranks: {problem[0]}")
        restore(target, target.basic_optimizer, load_full_state(full_state_file))
        _restore_engine_counters(target, directory)
    if rng_file(checkpoint, rank).is_file():
        restore_rng_state(_load_rng_state(rng_file(checkpoint, rank)))
    state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    return {**state, "resharded_from": record}


def _restore_engine_counters(engine, checkpoint: Path) -> None:
    """The learning-rate schedule and DeepSpeed's step counters, as `engine.load_checkpoint` restores them."""
    # ZeRO-1/2 write one model-states file, ZeRO-3 one per rank with the same counters; memory-mapped,
    # so the module weights in it are not read.
    from optimizers.reshard import load_deepspeed_file

    states_file = sorted(checkpoint.glob("*mp_rank_00_model_states.pt"))[0]
    saved = load_deepspeed_file(states_file, mmap=True)
    scheduler = engine.lr_scheduler
    if scheduler is not None and saved.get("lr_scheduler") is not None:
        scheduler.load_state_dict(saved["lr_scheduler"])
        # The optimizer's rates are part of its saved state in a plain resume; here they follow the schedule.
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = saved["global_steps"]
    engine.global_samples = saved.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = saved["skipped_steps"]


def export_final(engine, tokenizer, output_dir) -> list:
    """The run's Hugging Face export in `output_dir/final` (safetensors; LoRA: adapter and merged).

    Collective: every rank must call it. Under ZeRO-3 the weights are gathered for the
    export, so each rank briefly holds the whole model. Returns the paths rank 0 wrote.
    """
    from deepspeed import zero

    from .models import save_model

    directory = Path(output_dir) / "final"
    rank = dist.get_rank() if dist.is_initialized() else 0
    module = engine.module
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    written = []
    with zero.GatheredParameters(partitioned, enabled=bool(partitioned)):
        if rank == 0:
            written = save_model(module, tokenizer, directory)
    if dist.is_initialized():
        dist.barrier()
    return written
