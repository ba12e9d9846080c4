"""Runs Adam-mini under real DeepSpeed ranks and records how far it is from the unsharded run.

Launched by test_zero.py as `deepspeed --num_gpus W tests/optimizers/zero_worker.py --out F ...`.
Every configuration trains the same tiny model on the same batches; each rank also runs
the unsharded optimizer in-process as the reference. Rank 0 writes the figures to --out.
"""
import os
import traceback

import deepspeed
import torch
import torch.distributed as dist

from optimizers import Adam_mini
from tests.rank_tools import full_fp32_params, max_delta, worker_parser, write_results
from tests.tiny_models import tiny_llama, token_batches

LR, BETAS, WEIGHT_DECAY, STEPS, MICRO_BATCH = 1e-3, (0.9, 0.95), 0.1, 10, 2


def ds_config(stage, bf16=False, offload=False):
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "zero_optimization": {"stage": stage}}
    if bf16:
        config["bf16"] = {"enabled": True}
    if offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def make_optimizer(model, implementation="auto"):
    return Adam_mini(model.named_parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                     dim=96, n_heads=3, n_kv_heads=1, implementation=implementation)


def reference_trajectory(batches, world_size):
    """Unsharded Adam-mini in this process; the loss averages the ranks' micro-batch losses
    exactly as DeepSpeed averages their gradients."""
    model = tiny_llama()
    optimizer = make_optimizer(model)
    snapshots = []
    for batch in batches:
        loss = sum(model(input_ids=mb, labels=mb).loss for mb in batch.split(MICRO_BATCH)) / world_size
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return snapshots


def train(engine, batches, rank, steps):
    for batch in batches[steps]:
        micro = batch[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
        engine.backward(engine(input_ids=micro, labels=micro).loss)
        engine.step()


def run_case(config, batches, reference, rank, world_size, implementation="auto"):
    model = tiny_llama()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, implementation)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    deltas = []
    for step in range(STEPS):
        train(engine, batches, rank, slice(step, step + 1))
        deltas.append(max_delta(full_fp32_params(engine), reference[step]))
    final = full_fp32_params(engine)
    # How far the run travelled from the initial weights, and how far it is from the reference
    # relative to that distance (used to judge bf16).
    travelled = torch.cat([(reference[-1][n] - initial[n]).flatten() for n in initial])
    off = torch.cat([(final[n] - reference[-1][n]).flatten() for n in initial])
    stage = config["zero_optimization"]["stage"]
    state = optimizer.state_bytes()
    planned = optimizer.planned_state_bytes(world_size, rank, stage) if stage else None
    states = [None] * world_size
    dist.all_gather_object(states, {"state_bytes": state, "planned_state_bytes": planned})
    return {"max_delta_per_step": deltas, "relative_error": (off.norm() / travelled.norm()).item(),
            "ranks": states}


def run_resume(stage, batches, reference, rank, checkpoint_dir):
    """Save after 5 steps, keep going to 10; a fresh engine loading the checkpoint must end identically."""
    config = ds_config(stage)
    model = tiny_llama()
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=config)
    train(engine, batches, rank, slice(0, 5))
    engine.save_checkpoint(checkpoint_dir, tag="step5")
    train(engine, batches, rank, slice(5, STEPS))
    uninterrupted = full_fp32_params(engine)

    model = tiny_llama(seed=123)  # different weights: everything must come from the checkpoint
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=config)
    engine.load_checkpoint(checkpoint_dir, tag="step5")
    train(engine, batches, rank, slice(5, STEPS))
    resumed = full_fp32_params(engine)
    return {"resume_max_delta": max_delta(resumed, uninterrupted),
            "reference_max_delta": max_delta(resumed, reference[-1])}


def run_load_other_world_size(checkpoint_dir, batches, rank):
    """Load a ZeRO-2 checkpoint written at another world size: must refuse before any step."""
    model = tiny_llama(seed=123)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=ds_config(2))
    try:
        engine.load_checkpoint(checkpoint_dir, tag="step5")
        train(engine, batches, rank, slice(5, 6))
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return {"raised": type(error).__name__, "message": str(error)}
    return {"raised": None, "changed": max_delta(full_fp32_params(engine), before)}


def run_load_state_dict_other_world_size(checkpoint_dir, batches, rank):
    """Bypass DeepSpeed's own world-size check: the optimizer itself must refuse foreign shards."""
    model = tiny_llama(seed=123)
    optimizer = make_optimizer(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(2))
    saved = torch.load(os.path.join(checkpoint_dir, "step5", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"),
                       weights_only=False)  # DeepSpeed pickles its own objects; a checkpoint this test wrote
    optimizer.load_state_dict(saved["optimizer_state_dict"]["base_optimizer_state"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        train(engine, batches, rank, slice(5, 6))
    except RuntimeError as error:
        return {"raised": type(error).__name__, "message": str(error),
                "changed": max_delta({n: p.detach() for n, p in model.named_parameters()}, before)}
    return {"raised": None}


def main():
    parser = worker_parser()
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--foreign-checkpoint", default=None)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches = token_batches(STEPS, world_size, MICRO_BATCH)
    reference = reference_trajectory(batches, world_size)

    cases = {f"zero{stage}": ds_config(stage) for stage in (0, 1, 2, 3)}
    cases["zero2_bf16"] = ds_config(2, bf16=True)
    cases["zero2_offload"] = ds_config(2, offload=True)
    cases["zero3_offload"] = ds_config(3, offload=True)
    # The fused CPU kernel serves the cases above; GPU runs take the foreach path.
    implementations = {name: "fused" for name in cases}
    for stage in (2, 3):
        cases[f"zero{stage}_foreach"] = ds_config(stage)
        implementations[f"zero{stage}_foreach"] = "foreach"
    cases["zero3_reference"] = ds_config(3)
    implementations["zero3_reference"] = "reference"
    results = {}
    for name, config in cases.items():
        try:
            results[name] = run_case(config, batches, reference, rank, world_size, implementations[name])
        except Exception:  # noqa: BLE001 - recorded so one broken case does not hide the others
            results[name] = {"error": traceback.format_exc()}
    for stage in (2, 3):
        results[f"resume_zero{stage}"] = run_resume(
            stage, batches, reference, rank, os.path.join(args.checkpoint_dir, f"zero{stage}"))
    if args.foreign_checkpoint:
        results["load_other_world_size"] = run_load_other_world_size(args.foreign_checkpoint, batches, rank)
        results["load_state_dict_other_world_size"] = run_load_state_dict_other_world_size(
            args.foreign_checkpoint, batches, rank)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
