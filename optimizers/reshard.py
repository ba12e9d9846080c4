"""Adam-mini state in a form that does not depend on the number of ranks, to resume on another count.

DeepSpeed's ZeRO-1/2/3 checkpoints hold, per rank, that rank's pieces of the fp32 master
weights and of the optimizer state. Its universal checkpoint (`deepspeed.checkpoint`) re-cuts
these for another world size, but it slices every state tensor like the parameter
(`ds_to_universal` merges each state key as if it held one value per element) and so cannot
carry Adam-mini's `block_sq_avg`, one value per block. Here instead:

    full = consolidate(checkpoint_dir)   # every rank's pieces put back together, per parameter name
    restore(engine, optimizer, full)     # on a freshly built engine at any world size

The full state maps each parameter name to its whole fp32 master weights (`fp32`), `exp_avg`
(numel), `block_sq_avg` (one value per block; a block cut by a shard boundary was held, with
the same value, by both ranks and appears once) and `step`. Each piece is placed by what the
optimizer records with it (`shard_start` and `block_start`, or a shared group's `fragments`
and `pieces`). From the command line (writes `<checkpoint>/adam_mini_full_state.pt`):

    python -m optimizers.reshard output/checkpoints/step_100
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

FULL_STATE_FILE = "adam_mini_full_state.pt"
FORMAT = "adam-mini-full-state"
_OPTIM_FILE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


class ReshardError(ValueError):
    """A checkpoint whose Adam-mini state cannot be put back together; the message names the file."""


def load_deepspeed_file(path, map_location="cpu", **kwargs):
    """A file of a DeepSpeed checkpoint, unpickled with only the classes DeepSpeed 0.19 writes into it
    allowed (its loss scalers, ZeRO stage enum and fragment addresses): nothing else can run on load.

    Raises:
        pickle.UnpicklingError: the file holds any other object (torch names the global it refused).
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


def _rank_files(checkpoint: Path) -> list:
    """The per-rank ZeRO optimizer files of `checkpoint`, in rank order."""
    found = {}
    for path in checkpoint.iterdir():
        match = _OPTIM_FILE.fullmatch(path.name)
        if match:
            if int(match.group(3)) != 0:
                raise ReshardError(f"{path}: model-parallel checkpoints (mp_rank > 0) are not supported")
            found[int(match.group(2))] = path
    if not found:
        raise ReshardError(f"{checkpoint} holds no ZeRO optimizer files (*zero_pp_rank_<r>_mp_rank_00_optim_states"
                           ".pt); only ZeRO-1/2/3 checkpoints are sharded by rank")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ReshardError(f"{checkpoint} lacks the optimizer files of ranks {missing}")
    return [found[rank] for rank in sorted(found)]


def _rank_pieces(path: Path) -> tuple:
    """(zero stage, [(name, start, exp_avg, fp32 master, first block, block_sq_avg, step)]) of one rank's file."""
    saved = load_deepspeed_file(path)
    zero = saved.get("optimizer_state_dict", {})
    # DeepSpeed's bf16 optimizer (its ZeRO-1, files named bf16_zero_pp_rank_*) records no stage.
    stage = int(zero.get("zero_stage", 1 if path.name.startswith("bf16_") else 0))
    if stage == 3:
        base, masters = zero.get("optimizer_state_dict"), zero.get("fp32_flat_groups")
    else:
        base, masters = zero.get("base_optimizer_state"), zero.get("single_partition_of_fp32_groups")
    if not isinstance(base, dict) or masters is None:
        raise ReshardError(f"{path}: not a ZeRO-1/2/3 optimizer file this version reads (elastic checkpoints, "
                           "whose base optimizer state is a list, are not supported)")
    entries = [(group, index) for group in base["param_groups"] for index in group["params"]]
    if len(entries) != len(masters):
        raise ReshardError(f"{path}: {len(entries)} optimizer tensors but {len(masters)} fp32 partitions")
    pieces = []
    for (group, index), master in zip(entries, masters):
        state, master = base["state"].get(index), master.view(-1)
        if not state:
            continue  # never stepped (no gradient yet): the resumed run starts it afresh too
        exp_avg, block_sq_avg = state["exp_avg"].view(-1), state["block_sq_avg"].view(-1)
        if "names" in group:
            if "pieces" not in state:
                raise ReshardError(f"{path}: a shared param group's state does not record where its pieces lie "
                                   "(`pieces`); it was written before this format: resume on its own rank count")
            v_offset = 0
            for (param, start, numel), (offset, first, last) in zip(state["fragments"].tolist(),
                                                                     state["pieces"].tolist()):
                pieces.append((group["names"][param], start, exp_avg[offset:offset + numel],
                               master[offset:offset + numel], first, block_sq_avg[v_offset:v_offset + last - first],
                               int(state["step"])))
                v_offset += last - first
            continue
        start, numel = int(state.get("shard_start", 0)), exp_avg.numel()
        first = state.get("block_start")
        if first is None:  # written before block_start was recorded: equal blocks make it plain arithmetic
            if group.get("rule") == "qkv":
                raise ReshardError(f"{path}: state of fused projection {group['name']!r} does not record its first "
                                   "block (`block_start`); resume on its own rank count")
            first = start // group["block_numel"]
        pieces.append((group["name"], start, exp_avg, master[:numel], int(first), block_sq_avg, int(state["step"])))
    return stage, pieces


def _assemble(name: str, pieces: list) -> dict:
    """One parameter's full state from its pieces (any order), checking they tile it exactly."""
    pieces = sorted(pieces, key=lambda piece: piece[0])
    numel = sum(piece[1].numel() for piece in pieces)
    num_blocks = max(first + len(block_sq) for _, _, _, first, block_sq, _ in pieces)
    full = {"exp_avg": torch.empty(numel), "fp32": torch.empty(numel), "block_sq_avg": torch.full((num_blocks,), -1.0)}
    expected_start, steps = 0, set()
    for start, exp_avg, master, first, block_sq, step in pieces:
        if start != expected_start:
            raise ReshardError(f"{name!r}: the ranks' pieces do not tile the parameter (a piece starts at element "
                               f"{start}, expected {expected_start})")
        full["exp_avg"][start:start + exp_avg.numel()] = exp_avg
        full["fp32"][start:start + master.numel()] = master
        held = full["block_sq_avg"][first:first + len(block_sq)]
        shared = held >= 0  # a block cut by a shard boundary: both ranks hold the same value
        if not torch.allclose(held[shared], block_sq[shared].float(), rtol=1e-6, atol=0.0):
            raise ReshardError(f"{name!r}: two ranks hold different second moments for a block cut by a shard boundary")
        held.copy_(block_sq)
        expected_start += exp_avg.numel()
        steps.add(step)
    if (full["block_sq_avg"] < 0).any():
        raise ReshardError(f"{name!r}: some blocks' second moments are in no rank's file")
    if len(steps) != 1:
        raise ReshardError(f"{name!r}: the ranks' pieces have different step counts {sorted(steps)}")
    full["step"] = steps.pop()
    return full


def consolidate(checkpoint) -> dict:
    """The Adam-mini state of a ZeRO-1/2/3 checkpoint written by any number of ranks, per parameter name.

    Returns {"format", "world_size", "zero_stage", "params": {name: {"step", "exp_avg", "block_sq_avg",
    "fp32"}}} (fp32 tensors, on the CPU).

    Raises:
        ReshardError: missing or foreign files, or pieces that do not fit together.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ReshardError(f"{checkpoint} is not a checkpoint directory")
    by_name, stages = {}, set()
    files = _rank_files(checkpoint)
    for path in files:
        stage, pieces = _rank_pieces(path)
        stages.add(stage)
        for name, *piece in pieces:
            by_name.setdefault(name, []).append(piece)
    if stages - {1, 2, 3}:
        raise ReshardError(f"{checkpoint}: ZeRO stage {sorted(stages)}; only ZeRO-1/2/3 checkpoints are sharded")
    return {"format": FORMAT, "world_size": len(files), "zero_stage": stages.pop(),
            "params": {name: _assemble(name, pieces) for name, pieces in by_name.items()}}


def save_full_state(full_state: dict, path) -> Path:
    """Writes `full_state` (beside, then renamed, so a reader never sees half a file)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save(full_state, partial)
    partial.replace(path)
    return path


def load_full_state(path) -> dict:
    """Reads what `save_full_state` wrote; memory-mapped, so each rank reads only the pieces it takes."""
    full_state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if full_state.get("format") != FORMAT:
        raise ReshardError(f"{path} is not an Adam-mini full state (format {full_state.get('format')!r})")
    return full_state


def restore(engine, optimizer, full_state: dict) -> None:
    """Puts `full_state` into a freshly built DeepSpeed `engine` (any world size, ZeRO-1/2/3) whose
    client optimizer is the Adam-mini `optimizer`; every rank calls it, before the first step.

    The module's weights (each rank's ZeRO-3 partition) are set from the fp32 masters and
    DeepSpeed's fp32 partitions refreshed from them; on the first step the optimizer takes its
    pieces of `exp_avg`, `block_sq_avg` and the exact fp32 masters (for bf16 runs) itself
    (`Adam_mini.load_full_state`). Frozen parameters and buffers are left as built.
    """
    optimizer.load_full_state(full_state)
    params = full_state["params"]
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            entry = params.get(name)
            if entry is None or "fp32" not in entry:
                continue
            value = entry["fp32"].view(-1)
            if hasattr(param, "ds_id"):  # ZeRO-3: this rank's end-padded slice of the flat parameter
                partition = param.ds_tensor.view(-1)
                rank = dist.get_rank(param.ds_process_group)
                start = min(rank * partition.numel(), value.numel())
                valid = min(partition.numel(), value.numel() - start)
                partition[:valid].copy_(value[start:start + valid])
            else:
                param.data.copy_(value.view_as(param))
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimizers.reshard", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a DeepSpeed checkpoint directory (holding *_optim_states.pt)")
    parser.add_argument("--out", default=None, help=f"where to write (default: <checkpoint>/{FULL_STATE_FILE})")
    args = parser.parse_args(argv)
    try:
        full_state = consolidate(args.checkpoint)
    except ReshardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = save_full_state(full_state, args.out or Path(args.checkpoint) / FULL_STATE_FILE)
    params = full_state["params"]
    print(f"{out}: {len(params)} parameters, {sum(p['exp_avg'].numel() for p in params.values())} elements, "
          f"{sum(p['block_sq_avg'].numel() for p in params.values())} second-moment blocks, from "
          f"{full_state['world_size']} ranks at ZeRO-{full_state['zero_stage']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
