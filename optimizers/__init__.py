"""Adam-mini for DeepSpeed ZeRO 0-3, LoRA and plain PyTorch; a library of its own.

    from optimizers import Adam_mini
    optimizer = Adam_mini.from_model(model, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

`shared_groups=True` puts every parameter in one param group, so DeepSpeed runs its per-group
collectives once (as for AdamW); `implementation="compiled"` runs the update as one
`torch.compile`d function on any device. `optimizers.reshard` continues a ZeRO-1/2/3 checkpoint
on another number of ranks.
"""
from .adam_mini import Adam_mini, ShardMismatchError, shard_bounds
from .partition import (BlockLayout, Geometry, PartitionReport, applies_weight_decay, classify,
                        geometry_from_model)

__all__ = ["Adam_mini", "BlockLayout", "Geometry", "PartitionReport", "ShardMismatchError", "applies_weight_decay",
           "classify", "geometry_from_model", "shard_bounds"]
