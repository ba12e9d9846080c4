"""The LoRA actor as its own reference, and the chunked log-probabilities, inside real DeepSpeed engines
(ZeRO-2 and ZeRO-3, 2 ranks).

Launched by test_models.py; rank 0 writes, per ZeRO stage, the largest log-probability difference of
the actor with adapters disabled from the base model, and of the actor (adapters on) from it; and, for a
full-parameter model (ZeRO-2 and 3) and one with LoRA on its attention and LM head (ZeRO-3), how far the
chunked loss and every trainable parameter's full gradient after `engine.backward` are from the whole
logits' (relative to the largest entry).
"""
import tempfile

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from pipeline.chunked_logits import IGNORE_INDEX, next_token_targets, output_head, token_logprobs
from pipeline.config import DataConfig, EngineConfig, LoraConfig, ModelConfig, OptimConfig, RunConfig
from pipeline.engine import create_engine, init_distributed
from pipeline.generation import response_logprobs
from pipeline.models import adapters_disabled, apply_lora
from tests.rank_tools import worker_parser, write_results
from tests.tiny_models import lora_with_head, tiny_llama

RESPONSE = 6
CHUNK = 5  # tokens: the 37 scored positions take 8 chunks


def run_config(stage: int) -> RunConfig:
    shared = [tempfile.mkdtemp()]
    dist.broadcast_object_list(shared)
    return RunConfig(output_dir=shared[0], model=ModelConfig(config={"model_type": "llama"}),
                     data=DataConfig(path="unused"), optim=OptimConfig(lr=1e-2, gradient_clipping=1.0),
                     engine=EngineConfig(zero_stage=stage, micro_batch_size=3))


def case(stage: int, sequences, attention_mask, expected) -> dict:
    config = run_config(stage)
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


def chunked_case(stage: int, sequences, attention_mask, lora: bool) -> dict:
    """The chunked loss and full gradients against the whole logits', one engine each from the same weights."""
    passes = []
    targets = next_token_targets(sequences.masked_fill(attention_mask == 0, IGNORE_INDEX))
    for chunk in (0, CHUNK):
        # A vocabulary of 1100 puts the LM head (1100 x 96) over ZeRO-3's persistence threshold (1e5 elements):
        # partitioned, gathered only within the head's call.
        model = tiny_llama(seed=3, vocab_size=1100)
        engine = create_engine(run_config(stage), lora_with_head(model) if lora else model,
                               total_steps=1).engine
        partitioned = sum(param.numel() == 0 for param in output_head(engine).parameters())
        logprobs, _ = token_logprobs(engine, {"input_ids": sequences, "attention_mask": attention_mask}, targets,
                                     chunk)
        loss = -logprobs.sum() / (targets != IGNORE_INDEX).sum()
        engine.backward(loss)
        grads = {name: safe_get_full_grad(param).float().clone() for name, param in engine.module.named_parameters()
                 if param.requires_grad}  # collective at ZeRO-3: every rank asks in the same order
        passes.append((loss.item(), grads))
        engine.destroy()
    (whole_loss, whole), (chunked_loss, chunked) = passes
    errors = {name: ((chunked[name] - whole[name]).abs().max() / whole[name].abs().max()).item() for name in whole}
    head = {name: error for name, error in errors.items() if "lm_head" in name}
    return {"partitioned_head_params": partitioned, "loss": chunked_loss, "whole_loss": whole_loss,
            "loss_error": abs(chunked_loss - whole_loss) / whole_loss, "head_grad_error": max(head.values()), "head_grads": len(head), "grad_error": max(errors.values())}


def main():
    args = worker_parser().parse_args()
    init_distributed()
    generator = torch.Generator().manual_seed(4)
    sequences = torch.randint(0, 203, (3, 14), generator=generator)
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :3] = 0  # a left-padded prompt
    with torch.no_grad():
        expected, _ = response_logprobs(tiny_llama(seed=3).eval(), sequences, attention_mask, RESPONSE)
    results = {f"zero{stage}": case(stage, sequences, attention_mask, expected) for stage in (2, 3)}
    # ZeRO-2 (the shipped configs') and ZeRO-3, whose hooks gather the head's weights, for a plain LM head and
    # for LoRA's wrapper around it.
    for stage, lora in ((2, False), (3, False), (3, True)):
        results[f"chunked zero{stage}{' LoRA' if lora else ''}"] = chunked_case(stage, sequences, attention_mask, lora)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
