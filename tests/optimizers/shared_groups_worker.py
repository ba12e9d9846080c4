"""Adam-mini with one shared param group under real DeepSpeed ranks, against the unsharded
optimizer with one group per parameter.

Launched by test_shared_groups.py as `deepspeed --num_gpus W tests/optimizers/shared_groups_worker.py
--out F --checkpoint-dir D`. Rank 0 writes the figures to --out.
"""
import os
import traceback

import deepspeed
import torch
import torch.distributed as dist

from benchmarks.optimizer_collectives import CollectiveCounter
from optimizers import Adam_mini, applies_weight_decay
from tests.optimizers.zero_worker import (BETAS, LR, MICRO_BATCH, STEPS, WEIGHT_DECAY, ds_config,
                                          reference_trajectory, train)
from tests.rank_tools import full_fp32_params, max_delta, worker_parser, write_results
from tests.tiny_models import tiny_llama, token_batches

COUNTER = CollectiveCounter()


def shared_optimizer(model, implementation="auto"):
    return Adam_mini(model.named_parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, dim=96, n_heads=3,
                     n_kv_heads=1, implementation=implementation, shared_groups=True)


def adamw(model):
    decay = [p for n, p in model.named_parameters() if applies_weight_decay(n)]
    no_decay = [p for n, p in model.named_parameters() if not applies_weight_decay(n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=LR, betas=BETAS)


def collectives_per_step(engine, batches, rank):
    """Collectives inside engine.step() on the last of STEPS steps (after the one-time table gather)."""
    for step in range(STEPS):
        micro = batches[step][rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
        engine.backward(engine(input_ids=micro, labels=micro).loss)
        COUNTER.counts.clear()
        COUNTER.active = True
        engine.step()
        COUNTER.active = False
    return COUNTER.total()


def run_case(config, batches, reference, rank, implementation="auto"):
    model = tiny_llama()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = shared_optimizer(model, implementation)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    deltas = []
    for step in range(STEPS):
        train(engine, batches, rank, slice(step, step + 1))
        deltas.append(max_delta(full_fp32_params(engine), reference[step]))
    final = full_fp32_params(engine)
    travelled = torch.cat([(reference[-1][n] - initial[n]).flatten() for n in initial])
    off = torch.cat([(final[n] - reference[-1][n]).flatten() for n in initial])
    cut_blocks = sum(len(table["slots"]) for table in optimizer._cut_tables.values())
    return {"max_delta_per_step": deltas, "relative_error": (off.norm() / travelled.norm()).item(),
            "param_groups": len(optimizer.param_groups), "cut_blocks": cut_blocks,
            "flat_partitions": len(optimizer._cut_tables)}


def run_resume(stage, batches, rank, checkpoint_dir):
    """Save after 5 steps, keep going to 10; a fresh engine loading the checkpoint must end identically."""
    config = ds_config(stage)
    model = tiny_llama()
    engine, *_ = deepspeed.initialize(model=model, optimizer=shared_optimizer(model), config=config)
    train(engine, batches, rank, slice(0, 5))
    engine.save_checkpoint(checkpoint_dir, tag="step5")
    train(engine, batches, rank, slice(5, STEPS))
    uninterrupted = full_fp32_params(engine)
    model = tiny_llama(seed=123)
    engine, *_ = deepspeed.initialize(model=model, optimizer=shared_optimizer(model), config=config)
    engine.load_checkpoint(checkpoint_dir, tag="step5")
    train(engine, batches, rank, slice(5, STEPS))
    return {"resume_max_delta": max_delta(full_fp32_params(engine), uninterrupted)}


def run_collectives(batches, rank):
    counts = {}
    for stage in (2, 3):
        for name, factory in (("adamw", adamw), ("shared", shared_optimizer)):
            model = tiny_llama()
            engine, *_ = deepspeed.initialize(model=model, optimizer=factory(model), config=ds_config(stage))
            counts[f"{name}_zero{stage}"] = collectives_per_step(engine, batches, rank)
    return counts


def main():
    parser = worker_parser()
    parser.add_argument("--checkpoint-dir", required=True)
    args = parser.parse_args()
    COUNTER.install()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches = token_batches(STEPS, world_size, MICRO_BATCH)
    reference = reference_trajectory(batches, world_size)

    cases = {f"zero{stage}": (ds_config(stage), "fused") for stage in (0, 1, 2, 3)}
    cases["zero3_offload"] = (ds_config(3, offload=True), "fused")
    cases["zero3_foreach"] = (ds_config(3), "foreach")
    sub_groups = ds_config(3)
    sub_groups["zero_optimization"]["sub_group_size"] = 20000  # several sub-groups, one step() call each
    cases["zero3_sub_groups"] = (sub_groups, "fused")
    cases["zero2_offload"] = (ds_config(2, offload=True), "fused")
    cases["zero2_foreach"] = (ds_config(2), "foreach")
    cases["zero1_reference"] = (ds_config(1), "reference")
    round_robin = ds_config(2)
    round_robin["zero_optimization"]["round_robin_gradients"] = True
    cases["zero2_round_robin"] = (round_robin, "fused")
    cases["zero2_bf16"] = (ds_config(2, bf16=True), "auto")
    results = {}
    for name, (config, implementation) in cases.items():
        try:
            results[name] = run_case(config, batches, reference, rank, implementation)
        except Exception:  # noqa: BLE001 - recorded so one broken case does not hide the others
            results[name] = {"error": traceback.format_exc()}
    for stage in (2, 3):
        results[f"resume_zero{stage}"] = run_resume(stage, batches, rank,
                                                    os.path.join(args.checkpoint_dir, f"zero{stage}"))
    results["collectives"] = run_collectives(batches, rank)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
