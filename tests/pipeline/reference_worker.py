"""The LoRA actor as its own reference inside real DeepSpeed engines (ZeRO-2 and ZeRO-3, 2 ranks).

Launched by test_models.py; rank 0 writes, per ZeRO stage, the largest log-probability difference of
the actor with adapters disabled from the base model, and of the actor (adapters on) from it.
"""
import tempfile

import torch
import torch.distributed as dist

from pipeline.config import DataConfig, EngineConfig, LoraConfig, ModelConfig, OptimConfig, RunConfig
from pipeline.engine import create_engine, init_distributed
from pipeline.generation import response_logprobs
from pipeline.models import adapters_disabled, apply_lora
from tests.rank_tools import worker_parser, write_results
from tests.tiny_models import tiny_llama

RESPONSE = 6


def case(stage: int, sequences, attention_mask, expected) -> dict:
    shared = [tempfile.mkdtemp()]
    dist.broadcast_object_list(shared)
    config = RunConfig(output_dir=shared[0], model=ModelConfig(config={"model_type": "llama"}),
                       data=DataConfig(path="unused"), optim=OptimConfig(lr=1e-2, gradient_clipping=1.0),
                       engine=EngineConfig(zero_stage=stage, micro_batch_size=3))
    actor = apply_lora(tiny_llama(seed=3), LoraConfig(enabled=True, r=4, alpha=8))
    engine = create_engine(config, actor, total_steps=1).engine
    # One real update: lora_B leaves zero, so the adapters change the outputs.
    engine.backward(engine(input_ids=sequences, attention_mask=attention_mask, labels=sequences).loss)
    engine.step()
    engine.eval()
    with torch.no_grad():
        with adapters_disabled(engine) as reference:
            as_reference, _ = response_logprobs(reference, sequences, attention_mask, RESPONSE)
        as_actor, _ = response_logprobs(engine, sequences, attention_mask, RESPONSE)
    return {"reference_vs_base": (as_reference - expected).abs().max().item(),
            "actor_vs_base": (as_actor - expected).abs().max().item()}


def main():
    args = worker_parser().parse_args()
    init_distributed()
    generator = torch.Generator().manual_seed(4)
    sequences = torch.randint(0, 203, (3, 14), generator=generator)
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :3] = 0  # a left-padded prompt
    with torch.no_grad():
        expected, _ = response_logprobs(tiny_llama(seed=3).eval(), sequences, attention_mask, RESPONSE)
    write_results(args.out, {f"zero{stage}": case(stage, sequences, attention_mask, expected) for stage in (2, 3)})


if __name__ == "__main__":
    main()
