"""Adam-mini handed straight to deepspeed.initialize: a tiny Llama trained under ZeRO.

    deepspeed --num_gpus 2 examples/deepspeed_zero.py --zero-stage 2

Prints the partition, the loss as it falls, and each rank's optimizer state next to what
AdamW would hold for the same shard.
"""
import argparse

import deepspeed
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from optimizers import Adam_mini


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    optimizer = Adam_mini.from_model(model, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    if rank == 0:
        print(optimizer.partition_report)
    ds_config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
                 "zero_optimization": {"stage": args.zero_stage}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    # A learnable toy language: each sequence counts upward from a random start.
    generator = torch.Generator().manual_seed(rank)
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, 200, (8, 1), generator=generator)
        ids = starts + torch.arange(32)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if rank == 0 and (step == 1 or step % 5 == 0):
            print(f"step {step:3d}  loss {loss.item():.3f}")

    held = optimizer.state_bytes()
    m_numel, _ = optimizer.planned_state_numel(world_size, rank, args.zero_stage)
    adamw_bytes = 2 * m_numel * 4  # AdamW keeps exp_avg and exp_avg_sq for the same slice
    report = [None] * world_size
    dist.all_gather_object(report, (rank, held, adamw_bytes))
    if rank == 0:
        print(f"ZeRO-{args.zero_stage} on {world_size} ranks: optimizer state per rank")
        for r, held_bytes, adamw in report:
            print(f"  rank {r}: Adam-mini {held_bytes / 1024:.1f} KiB, AdamW would hold {adamw / 1024:.1f} KiB "
                  f"({held_bytes / adamw:.1%})")


if __name__ == "__main__":
    main()
