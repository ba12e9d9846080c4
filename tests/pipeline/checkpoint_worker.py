"""Trains, checkpoints and resumes under real DeepSpeed ranks; the resumed run must end exactly where
the uninterrupted one did.

Launched by test_checkpoint.py as
`deepspeed --num_gpus 2 tests/pipeline/checkpoint_worker.py --out F --output-dir D`.
For ZeRO-2, then ZeRO-3: train 6 steps saving at steps 1-3 (keep_last 2), record the final fp32
parameters, the learning rate and a few draws from each RNG. Then plant an incomplete step_5
directory, build a fresh engine from other initial weights and other seeds, load the newest
complete checkpoint, run steps 4-6, record the same, and save step 6 (which prunes). Then load
tampered copies of step 6: every `.pt` file replaced by a pickle whose unpickling creates a marker
file (COMPLETE as written, and COMPLETE rewritten with the new files' SHA-256), and one byte flipped.
Rank 0 writes the figures to --out.
"""
import gc
import random
import shutil
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from optimizers import Adam_mini
from pipeline.checkpoint import (COMPLETE_MARKER, ResumeError, file_digests, latest_checkpoint, load_checkpoint,
                                 save_checkpoint)
from tests.rank_tools import full_fp32_params, max_delta, worker_parser, write_results
from tests.tiny_models import tiny_llama

STEPS, MICRO_BATCH, LR, VOCAB, KEEP_LAST = 6, 2, 1e-3, 203, 2
SAVE_AT = (1, 2, 3)


def ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
            "zero_optimization": {"stage": stage}}


def warmup(step: int) -> float:
    return (step + 1) / (2 * STEPS)  # still rising at the last step


def make_engine(stage: int, init_seed: int):
    model = tiny_llama(seed=init_seed)
    optimizer = Adam_mini.from_model(model, lr=LR)
    # A different lr every step: a scheduler that was not restored would show in the weights.
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage),
                                      lr_scheduler=lambda opt: LambdaLR(opt, warmup))
    return engine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def next_batch():
    """Drawn from this rank's global RNGs, so the data after a resume is right only if they were
    restored: python picks the length, torch the tokens, numpy how many leading labels are masked."""
    length = random.randint(8, 12)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, length))  # (micro_batch, length)
    labels = tokens.clone()
    labels[:, :np.random.randint(1, 4)] = -100
    return tokens, labels


def train(engine, steps, output_dir: Path, save_at=()):
    for step in steps:
        tokens, labels = next_batch()
        engine.backward(engine(input_ids=tokens, labels=labels).loss)
        engine.step()
        if step in save_at:
            save_checkpoint(engine, output_dir, step, {"epoch": 0, "batch_index": step}, keep_last=KEEP_LAST)


def rng_draws() -> dict:
    return {"python": [random.random() for _ in range(3)], "numpy": np.random.rand(3).tolist(),
            "torch": torch.rand(3).tolist()}


def checkpoint_names(output_dir: Path) -> list:
    return sorted(path.name for path in (output_dir / "checkpoints").iterdir() if path.is_dir())


class Payload:
    """Unpickling it opens (creates) the marker file: code run by loading a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def tampered_copy(checkpoint: Path, root: Path, how: str, marker: Path) -> Path:
    """A copy of `checkpoint` under `root`, tampered `how`: "payload" (every .pt a Payload pickle),
    "payload_rehashed" (the same, COMPLETE rewritten with the new SHA-256s) or "flipped" (one byte of
    rank 1's optimizer file inverted)."""
    copy = root / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    if how == "flipped":
        target = copy / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        return copy
    for path in copy.rglob("*.pt"):
        torch.save({"state": Payload(marker)}, path)
    if how == "payload_rehashed":
        step = (copy / COMPLETE_MARKER).read_text().splitlines()[0]
        digests = "".join(f"{digest}  {name}\n" for name, digest in file_digests(copy).items())
        (copy / COMPLETE_MARKER).write_text(f"{step}\n{digests}")
    return copy


def load_tampered(stage: int, checkpoint: Path, output_dir: Path, rank: int) -> dict:
    """{how: the ResumeError's message, or "loaded"}, and whether any payload ran."""
    marker = output_dir / "payload_ran"
    engine = make_engine(stage, init_seed=7)
    outcomes = {}
    for how in ("payload", "payload_rehashed", "flipped"):
        root = output_dir / f"tampered_{how}"
        if rank == 0:
            tampered_copy(checkpoint, root, how, marker)
        dist.barrier()
        try:
            load_checkpoint(engine, root / "checkpoints" / checkpoint.name)
            outcomes[how] = "loaded"
        except ResumeError as error:
            outcomes[how] = str(error)
        dist.barrier()
    outcomes["payload_ran"] = marker.exists()
    return outcomes


def run_stage(stage: int, output_dir: Path, rank: int) -> dict:
    engine = make_engine(stage, init_seed=0)
    seed_everything(1000 + rank)  # each rank its own streams, so RNG files mixed up between ranks would show
    train(engine, range(1, STEPS + 1), output_dir, save_at=SAVE_AT)
    uninterrupted, uninterrupted_lr, uninterrupted_draws = full_fp32_params(engine), engine.get_lr()[0], rng_draws()
    after_first_run = checkpoint_names(output_dir)
    saved_files = sorted(path.name for path in (output_dir / "checkpoints" / "step_3").iterdir())
    del engine
    gc.collect()

    if rank == 0:  # a save of step 5 cut off mid-write: DeepSpeed's file is there, COMPLETE is not
        incomplete = output_dir / "checkpoints" / "step_5"
        incomplete.mkdir()
        (incomplete / "mp_rank_00_model_states.pt").write_bytes(b"cut off")
    dist.barrier()

    engine = make_engine(stage, init_seed=123)  # other weights: everything must come from the checkpoint
    fresh_delta = max_delta(full_fp32_params(engine), uninterrupted)
    seed_everything(2000 + rank)
    checkpoint = latest_checkpoint(output_dir)
    trainer_state = load_checkpoint(engine, checkpoint)
    train(engine, range(trainer_state["step"] + 1, STEPS + 1), output_dir)
    resumed, resumed_lr, resumed_draws = full_fp32_params(engine), engine.get_lr()[0], rng_draws()
    save_checkpoint(engine, output_dir, STEPS, {"epoch": 0, "batch_index": STEPS}, keep_last=KEEP_LAST)
    after_resumed_save = checkpoint_names(output_dir)
    del engine
    gc.collect()
    tampered = load_tampered(stage, output_dir / "checkpoints" / f"step_{STEPS}", output_dir, rank)

    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"uninterrupted_draws": uninterrupted_draws, "resumed_draws": resumed_draws,
                                      "resume_max_delta": max_delta(resumed, uninterrupted)})
    return {"loaded": checkpoint.name, "trainer_state": trainer_state, "fresh_max_delta": fresh_delta,
            "uninterrupted_lr": uninterrupted_lr, "resumed_lr": resumed_lr, "ranks": per_rank,
            "saved_files": saved_files, "after_first_run": after_first_run,
            "after_resumed_save": after_resumed_save, "tampered": tampered}


def main():
    parser = worker_parser()
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    results = {f"zero{stage}": run_stage(stage, Path(args.output_dir) / f"zero{stage}", rank) for stage in (2, 3)}
    write_results(args.out, results)


if __name__ == "__main__":
    main()
