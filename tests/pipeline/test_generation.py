"""Generation does what the config says, whatever the model's own generation_config.json says.

The saved model ships Llama-2-7b-hf's sampling defaults (do_sample true, temperature 0.6, top_p 0.9)
plus settings transformers 5 would fill into any field a passed config leaves unset (a repeat ban,
min_p); its twin has the same weights and no generation defaults at all.
"""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.data import collate_prompts
from pipeline.generation import generate_responses, generation_configs
from tests.tiny_models import save_tiny_model_dir, tiny_tokenizer

LLAMA_2_GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096,
                      "no_repeat_ngram_size": 1, "min_p": 0.2}
PROMPTS = ["human what is the big red cat assistant", "what is", "the dog ran to the park", "one two three",
           "yes no good bad", "red blue green", "a cat sat on a mat", "question answer"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(model with Llama-2's generation_config.json, the same weights without one, tokenizer)."""
    directory = save_tiny_model_dir(tmp_path_factory.mktemp("llama2_generation"), seed=5)
    (directory / "generation_config.json").write_text(json.dumps(LLAMA_2_GENERATION))
    opinionated = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert opinionated.generation_config.do_sample and opinionated.generation_config.temperature == 0.6
    (directory / "generation_config.json").unlink()
    plain = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert not plain.generation_config.do_sample
    return opinionated, plain, tiny_tokenizer()


def prompts(tokenizer) -> dict:
    rows = [{"prompt_input_ids": tokenizer(text, add_special_tokens=False)["input_ids"]} for text in PROMPTS]
    return collate_prompts(rows, tokenizer.pad_token_id)


def responses(model, tokenizer, config, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        sequences, _, _ = generate_responses(model, prompts(tokenizer), config, tokenizer)
    return sequences[:, -NEW_TOKENS:]


def argmax_decode(model, tokenizer) -> torch.Tensor:
    """Greedy decoding by hand: the whole sequence through the model at each step, argmax of the last logits."""
    batch = prompts(tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            token = torch.where(finished, tokenizer.pad_token_id, logits.argmax(-1))
            finished |= token == tokenizer.eos_token_id
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
    return ids[:, -NEW_TOKENS:]


def test_greedy_is_argmax_whatever_the_model_generation_config_says(models):
    opinionated, plain, tokenizer = models
    _, greedy = generation_configs(tokenizer, max_new_tokens=NEW_TOKENS)
    expected = argmax_decode(plain, tokenizer)
    assert torch.equal(responses(opinionated, tokenizer, greedy, seed=1), expected)
    assert torch.equal(responses(opinionated, tokenizer, greedy, seed=2), expected)
    # The model's own settings are back in place afterwards.
    assert opinionated.generation_config.do_sample and opinionated.generation_config.top_p == 0.9


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.8, 0.95)])
def test_sampling_uses_the_configured_temperature_and_top_p(models, temperature, top_p):
    """Same seed, same weights: the same samples as the model without generation defaults, so neither
    temperature 0.6 / top_p 0.9 nor the repeat ban or min_p of its generation_config.json applied."""
    opinionated, plain, tokenizer = models
    sample, _ = generation_configs(tokenizer, max_new_tokens=NEW_TOKENS, temperature=temperature, top_p=top_p)
    for seed in range(3):
        assert torch.equal(responses(opinionated, tokenizer, sample, seed), responses(plain, tokenizer, sample, seed))
    # The comparison can fail: Llama-2's own settings sample other tokens from the same seed.
    llama_2, _ = generation_configs(tokenizer, max_new_tokens=NEW_TOKENS, temperature=0.6, top_p=0.9)
    assert not torch.equal(responses(plain, tokenizer, llama_2, 0), responses(plain, tokenizer, sample, 0))
