"""The engine factory under real DeepSpeed ranks: training engines at ZeRO-2 and 3, frozen ZeRO-3.

Launched by test_engine.py; rank 0 writes the figures to --out.
"""
import json
import os
import tempfile

import torch
import torch.distributed as dist

from transformers import AutoModelForCausalLM

from pipeline.checkpoint import export_final
from pipeline.config import DataConfig, EngineConfig, ModelConfig, OptimConfig, RunConfig
from pipeline.engine import build_scheduler, create_engine, create_frozen_engine, init_distributed
from pipeline.optim import build_optimizer
from pipeline.ports import shared_memory_names
from pipeline.rundir import RunDirectory
from tests.rank_tools import full_fp32_params, worker_parser, write_results
from tests.tiny_models import tiny_llama, tiny_tokenizer, token_batches

STEPS, MICRO, ACCUMULATION = 6, 2, 2


def run_config(stage: int) -> RunConfig:
    return RunConfig(output_dir="unused", model=ModelConfig(config={"model_type": "llama"}),
                     data=DataConfig(path="unused"),
                     optim=OptimConfig(lr=1e-3, warmup_steps=2, scheduler="cosine", weight_decay=0.1,
                                       gradient_clipping=1.0, min_lr_ratio=0.1),
                     engine=EngineConfig(zero_stage=stage, micro_batch_size=MICRO,
                                         gradient_accumulation_steps=ACCUMULATION))


def micro_batches(batches, step, world_size):
    """(accumulation, world_size) grid of micro-batches for one optimizer step."""
    rows = batches[step].split(MICRO)
    return [rows[a * world_size:(a + 1) * world_size] for a in range(ACCUMULATION)]


def reference(config, batches, world_size):
    model = tiny_llama()
    optimizer = build_optimizer(config.optim, model)
    scheduler = build_scheduler(optimizer, config, STEPS)
    snapshots = []
    for step in range(STEPS):
        for per_rank in micro_batches(batches, step, world_size):
            loss = sum(model(input_ids=b, labels=b).loss for b in per_rank) / (world_size * ACCUMULATION)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.gradient_clipping)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return snapshots


def train_case(stage, batches, rank, world_size):
    config = run_config(stage)
    shared = [tempfile.mkdtemp()]
    dist.broadcast_object_list(shared)  # one run directory for all ranks
    config.output_dir = shared[0]
    expected = reference(config, batches, world_size)
    built = create_engine(config, tiny_llama(), total_steps=STEPS)
    RunDirectory(config).claim(built.ds_config)
    engine = built.engine
    deltas, lrs, losses = [], [], []
    for step in range(STEPS):
        lrs.append(engine.get_lr()[0])
        for per_rank in micro_batches(batches, step, world_size):
            loss = engine(input_ids=per_rank[rank], labels=per_rank[rank]).loss
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
        params = full_fp32_params(engine)
        deltas.append(max((params[n] - expected[step][n]).abs().max().item() for n in params))
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    export = export_case(engine, built.optimizer, params) if stage == 3 else {}
    return {"max_delta_per_step": deltas, "lrs": lrs, "losses": losses,
            "optimizer_is_ours": inner is built.optimizer, "optimizer_type": type(inner).__name__,
            "rule_counts": built.optimizer.partition_report.as_dict()["rule_counts"],
            "global_batch_size": built.plan.global_batch_size, "ds_config": built.ds_config,
            "recorded_ds_config": json.loads(open(os.path.join(config.output_dir, "ds_config.json")).read()),
            **export}


def export_case(engine, optimizer, params):
    """The ZeRO-3 final export reloads as a plain Hugging Face model with the trained weights."""
    directory = tempfile.mkdtemp() if dist.get_rank() == 0 else None
    shared = [directory]
    dist.broadcast_object_list(shared)
    export_final(engine, tiny_tokenizer(), shared[0])
    if dist.get_rank() != 0:
        return {}
    reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(shared[0], "final"))
    files = sorted(os.listdir(os.path.join(shared[0], "final")))
    delta = max((p - params[n]).abs().max().item() for n, p in reloaded.named_parameters())
    return {"export_max_delta": delta, "export_files": files}


def frozen_case(batches, offload):
    config = run_config(3)
    plain = tiny_llama(seed=5)
    ids = batches[0][:MICRO]
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    engine = create_frozen_engine(config, tiny_llama(seed=5), zero_stage=3, offload=offload)
    with torch.no_grad():
        logits = engine(input_ids=ids).logits
    trainable = sum(p.requires_grad for p in engine.module.parameters())
    local_numel = sum(p.ds_tensor.numel() for p in engine.module.parameters())
    return {"max_delta": (logits - expected).abs().max().item(), "trainable": trainable,
            "local_numel": local_numel, "full_numel": sum(p.numel() for p in plain.parameters())}


def main():
    args = worker_parser().parse_args()
    world_size = init_distributed()
    rank = dist.get_rank()
    # DeepSpeed's CPU all-reduce buffers exist (all-reduce works below) but their names are gone.
    shm_names_left = shared_memory_names(os.environ["MASTER_PORT"])
    batches = token_batches(STEPS, world_size * ACCUMULATION, MICRO)
    results = {f"zero{stage}": train_case(stage, batches, rank, world_size) for stage in (2, 3)}
    results["frozen_zero3"] = frozen_case(batches, offload=False)
    results["frozen_zero3_offload"] = frozen_case(batches, offload=True)
    results["shm_names_left"] = shm_names_left
    write_results(args.out, results)


if __name__ == "__main__":
    main()
