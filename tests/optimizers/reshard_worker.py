"""Adam-mini saved on one number of DeepSpeed ranks, resumed on another (optimizers.reshard).

Launched by test_reshard.py as `deepspeed --num_gpus W tests/optimizers/reshard_worker.py --out F
[--save-dir D] [--resume-dir D']`. Every step takes the same 6 rows whatever the world size (2 ranks
x 3 rows, 3 ranks x 2 rows), so the run that never stopped is one trajectory: unsharded Adam-mini
in this process on all 6 rows. With --save-dir each case trains SAVE_AT steps and saves; with
--resume-dir each case consolidates the checkpoint another world size wrote, restores it into a
fresh engine (other initial weights) and trains the remaining steps. Rank 0 writes the figures.
"""
import time
import traceback
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from optimizers import Adam_mini
from optimizers.reshard import FULL_STATE_FILE, consolidate, load_full_state, restore, save_full_state
from tests.optimizers.zero_worker import BETAS, LR, WEIGHT_DECAY
from tests.rank_tools import full_fp32_params, max_delta, worker_parser, write_results
from tests.tiny_models import tiny_llama, token_batches

GLOBAL_BATCH, SAVE_AT, STEPS = 6, 5, 15  # 10 steps after the resume
CASES = {"zero1": (1, False), "zero2": (2, False), "zero3": (3, False), "zero2_shared": (2, True),
         "zero3_shared": (3, True)}


def make_optimizer(model, shared_groups=False):
    return Adam_mini(model.named_parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, dim=96, n_heads=3,
                     n_kv_heads=1, shared_groups=shared_groups)


def ds_config(stage, micro_batch):
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
            "zero_optimization": {"stage": stage}}


def reference_trajectory(batches):
    """Weights after each step, and the optimizer state (per name) after SAVE_AT steps."""
    model = tiny_llama()
    optimizer = make_optimizer(model)
    snapshots, saved_state = [], None
    for step, batch in enumerate(batches):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        if step + 1 == SAVE_AT:
            saved_state = {group["name"]: {key: value.detach().clone().view(-1) for key, value in
                                           optimizer.state[group["params"][0]].items() if torch.is_tensor(value)}
                           for group in optimizer.param_groups}
    return snapshots, saved_state


def build(stage, shared, seed, world_size):
    model = tiny_llama(seed=seed)
    optimizer = make_optimizer(model, shared)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=ds_config(stage, GLOBAL_BATCH // world_size))
    return engine, optimizer


def train(engine, batches, steps, rank, world_size, reference):
    micro_batch = GLOBAL_BATCH // world_size
    deltas = []
    for step in steps:
        micro = batches[step][rank * micro_batch:(rank + 1) * micro_batch]
        engine.backward(engine(input_ids=micro, labels=micro).loss)
        engine.step()
        deltas.append(max_delta(full_fp32_params(engine), reference[step]))
    return deltas


def save_case(name, save_dir, batches, reference, rank, world_size):
    stage, shared = CASES[name]
    engine, _ = build(stage, shared, 0, world_size)
    deltas = train(engine, batches, range(SAVE_AT), rank, world_size, reference)
    engine.save_checkpoint(str(save_dir), tag=name)
    return {"max_delta_per_step": deltas}


def resume_case(name, resume_dir, batches, reference, saved_state, rank, world_size):
    stage, shared = CASES[name]
    checkpoint = Path(resume_dir) / name
    if rank == 0:
        save_full_state(consolidate(checkpoint), checkpoint / FULL_STATE_FILE)
    dist.barrier()
    full_state = load_full_state(checkpoint / FULL_STATE_FILE)
    # The consolidated state against the unsharded optimizer's after the same steps.
    state_delta = max((full_state["params"][param][key] - saved[key]).abs().max().item()
                      for param, saved in saved_state.items() for key in ("exp_avg", "block_sq_avg"))
    engine, optimizer = build(stage, shared, 123, world_size)  # other weights: all must come from the checkpoint
    restore(engine, optimizer, full_state)
    deltas = train(engine, batches, range(SAVE_AT, STEPS), rank, world_size, reference)
    steps = sorted({state["step"] for state in optimizer.state.values()})
    return {"saved_world_size": full_state["world_size"], "zero_stage": full_state["zero_stage"],
            "consolidated_state_max_delta": state_delta, "max_delta_per_step": deltas, "optimizer_steps": steps}


def main():
    parser = worker_parser()
    parser.add_argument("--save-dir", default=None)
    parser.add_argument("--resume-dir", default=None)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches = token_batches(STEPS, 1, GLOBAL_BATCH)
    reference, saved_state = reference_trajectory(batches)
    results = {}
    for name in CASES:
        for phase, directory in (("save", args.save_dir), ("resume", args.resume_dir)):
            if directory is None:
                continue
            started = time.perf_counter()
            try:
                if phase == "save":
                    results[f"save_{name}"] = save_case(name, directory, batches, reference, rank, world_size)
                else:
                    results[f"resume_{name}"] = resume_case(name, directory, batches, reference, saved_state, rank,
                                                            world_size)
            except Exception:  # noqa: BLE001 - recorded so one broken case does not hide the others
                results[f"{phase}_{name}"] = {"error": traceback.format_exc()}
            results[f"{phase}_{name}"]["seconds"] = time.perf_counter() - started
    write_results(args.out, results)


if __name__ == "__main__":
    main()
