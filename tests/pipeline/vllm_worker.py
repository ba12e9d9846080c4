"""A vLLM rollout engine per rank fed by a DeepSpeed training engine: greedy responses and sampled
log-probabilities against the trainer's own (HF `generate`, the trainer's forward), before and after
training steps, at ZeRO-2 or 3, with or without LoRA.

Launched by test_vllm_rollouts.py on 2 CPU ranks; rank 0 writes every rank's figures to --out.
"""
import hashlib

import torch
import torch.distributed as dist

from pipeline.config import DataConfig, EngineConfig, LoraConfig, ModelConfig, OptimConfig, RunConfig
from pipeline.data import collate_prompts
from pipeline.engine import create_engine, init_distributed, sharded_creation, training_ds_config
from pipeline.generation import response_logprobs
from pipeline.models import apply_lora, load_causal_lm, load_tokenizer
from pipeline.rl.rollout import HfRollouts, Sampling
from pipeline.rl.sections import RolloutSection
from pipeline.rl.vllm_engine import VllmRollouts, create_llm
from tests.rank_tools import worker_parser, write_results

NEW_TOKENS, MAX_LENGTH = 8, 24
PROMPTS = ["human what is the cat assistant", "human the dog ran to the park assistant", "red blue",
           "human yes or no question assistant the answer is", "big small one two three", "what is good"]


def weights_digest(engine) -> str:
    """SHA-256 of this rank's view of every trainer parameter (its shard under ZeRO-3)."""
    digest = hashlib.sha256()
    for name, param in engine.module.named_parameters():
        held = getattr(param, "ds_tensor", param)
        digest.update(name.encode() + held.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def compare(hf, vllm, engine, batch) -> dict:
    """Greedy token sequences of both engines and the largest gap between the engine's log-probs of
    its sampled tokens and the trainer's."""
    greedy = Sampling(NEW_TOKENS, greedy=True)
    [ours], [theirs] = hf.generate(batch, [greedy]), vllm.generate(batch, [greedy], key=("greedy",))
    [sampled] = vllm.generate(batch, [Sampling(NEW_TOKENS, temperature=1.0)], key=("sampled",))
    with torch.no_grad():
        trainer, _ = response_logprobs(engine, sampled.sequences, sampled.attention_mask, sampled.mask.shape[1])
    mask = sampled.mask.bool()
    return {"hf_greedy": ours.sequences.tolist(), "vllm_greedy": theirs.sequences.tolist(),
            "hf_response_mask": ours.mask.tolist(), "vllm_response_mask": theirs.mask.tolist(),
            "logprob_gap": (trainer - sampled.sampler_logprobs)[mask].abs().max().item(),
            "sampled_tokens": int(mask.sum())}


def trained_case(args, zero_stage: int, lora_enabled: bool, llm, tokenizer, batch) -> dict:
    """A fresh training engine followed by the shared vLLM engine: compared at the start and after
    `args.steps` optimizer steps, and whether following it changed the trainer's weights."""
    lora = LoraConfig(enabled=lora_enabled, r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    config = RunConfig(output_dir="unused", model=ModelConfig(path=args.model, lora=lora),
                       data=DataConfig(path="unused", max_length=MAX_LENGTH),
                       optim=OptimConfig(name="adamw", lr=3e-2, warmup_steps=0, gradient_clipping=1.0),
                       engine=EngineConfig(zero_stage=zero_stage, micro_batch_size=2))
    with sharded_creation(training_ds_config(config)):
        model = load_causal_lm(config.model)
    if lora_enabled:
        model = apply_lora(model, lora)
        with torch.no_grad():  # peft starts lora_B at zero: move it, so the merge has something to add
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    engine = create_engine(config, model, args.steps).engine
    hf, vllm = HfRollouts(engine, tokenizer), VllmRollouts(engine, tokenizer, llm, RolloutSection(engine="vllm"), 0)
    before = weights_digest(engine)
    result = {"start": compare(hf, vllm, engine, batch)}
    result["trainer_unchanged_by_sync"] = weights_digest(engine) == before
    generator = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(args.steps):  # the trainer moves on: plain next-token loss on random token rows
        tokens = torch.randint(4, len(tokenizer), (2, 12), generator=generator)
        engine.backward(engine(input_ids=tokens, labels=tokens).loss)
        engine.step()
    trained = weights_digest(engine)
    result["trained"] = compare(hf, vllm, engine, batch)
    result["trainer_unchanged_by_sync_after_training"] = weights_digest(engine) == trained
    result["synced_step"] = vllm.synced_step
    return result


def main():
    parser = worker_parser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    init_distributed()
    tokenizer = load_tokenizer(ModelConfig(path=args.model))
    rows = [tokenizer(text)["input_ids"] for text in PROMPTS[dist.get_rank()::2]]
    batch = collate_prompts([{"prompt_input_ids": ids} for ids in rows], tokenizer.pad_token_id)
    # One vLLM engine per rank for every case (starting one costs most of the launch).
    llm = create_llm(args.model, RolloutSection(engine="vllm"), torch.float32, MAX_LENGTH, seed=0)
    result = {name: trained_case(args, zero_stage, lora, llm, tokenizer, batch)
              for name, zero_stage, lora in (("zero2", 2, False), ("zero3", 3, False), ("zero3_lora", 3, True))}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    write_results(args.out, {"ranks": everyone})


if __name__ == "__main__":
    main()
