"""Tiny models built in code for the tests; nothing is downloaded."""
import json
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def straddling_llama_config(**overrides) -> LlamaConfig:
    """Hidden 96, 3 heads, 1 KV head, vocab 203: heads, rows and embedding rows all straddle
    ZeRO shard boundaries at 2 and 3 ranks; MLP biases cover the per-element rule (not attention biases:
    a key bias has zero true gradient, so per-element Adam would normalise rounding noise)."""
    values = dict(vocab_size=203, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64,
                  attention_bias=False, mlp_bias=True, tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(straddling_llama_config(**overrides)).to(dtype)
    # Random (not zero) biases so the bias path sees real values from the first step.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    return model


def lora_with_head(model, seed: int = 0):
    """`model` with LoRA adapters on its query projections and its LM head, lora_B drawn at random (peft starts
    it at zero, so the adapters would change nothing and lora_A would get no gradient)."""
    from pipeline.config import LoraConfig
    from pipeline.models import apply_lora

    model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "lm_head"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def token_batches(steps: int, world_size: int, micro_batch: int, seq_len: int = 12, vocab: int = 203, seed: int = 1):
    """Per step, one (world_size * micro_batch, seq_len) batch; rank r takes rows r*mb:(r+1)*mb."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (world_size * micro_batch, seq_len), generator=generator) for _ in range(steps)]


TINY_WORDS = ("the cat sat on a mat dog ran to park red blue green big small one two three four five "
              "yes no good bad human assistant answer question what is").split()


def tiny_tokenizer(pad: bool = True):
    """A word-level fast tokenizer over TINY_WORDS plus <pad>/<unk>/<bos>/<eos>, built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"] if pad else ["<unk>", "<bos>", "<eos>"]
    vocab = {token: index for index, token in enumerate(specials + list(TINY_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = dict(unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def save_tiny_model_dir(directory, seed: int = 0, **overrides):
    """A tiny Llama and its tokenizer saved as a local Hugging Face directory."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **overrides)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_reward_dir(directory, policy_dir, seed: int = 0):
    """A RewardModel started from the policy saved at `policy_dir` (its head seeded), saved as a directory."""
    from pipeline.config import ModelConfig
    from pipeline.models import RewardModel

    torch.manual_seed(seed)
    RewardModel.from_causal_lm(ModelConfig(path=str(policy_dir))).save_pretrained(directory)
    return directory


def write_separable_pairs(path, count: int, seed: int = 0):
    """`count` preference pairs an easy rule separates (chosen "... is good", rejected "... is bad"), as JSONL."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        topic = rng.choice(["cat", "dog", "park", "mat"])
        filler = rng.choice(["the", "a", "big", "small"])
        rows.append({"prompt": f"human what is the {topic} assistant",
                     "chosen": f" {filler} {topic} is good", "rejected": f" {filler} {topic} is bad"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_stage_inputs(root) -> None:
    """What every stage needs, in `root`: a tiny Llama (`model`), a reward model started from it
    (`reward`), 64 pairs (`pairs.jsonl`: SFT, reward and DPO data) and their prompts (`prompts.jsonl`)."""
    from pathlib import Path

    root = Path(root)
    save_tiny_reward_dir(root / "reward", save_tiny_model_dir(root / "model"))
    rng = random.Random(0)
    words = "the cat sat on a mat dog ran to park red blue big small".split()
    pairs, prompts = [], []
    for _ in range(64):
        topic = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        pairs.append({"prompt": f"human what is {topic} assistant", "chosen": f" the {topic} is good",
                      "rejected": f" the {topic} is bad"})
        prompts.append({"prompt": f"human what is {topic} assistant"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
    (root / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
