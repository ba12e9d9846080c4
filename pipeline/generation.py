"""Generating responses to prompt batches and scoring them: what ReMax's rollouts and the policy
evaluation (`python -m pipeline.evaluate policy`) share.

    sample_config, greedy_config = generation_configs(tokenizer, max_new_tokens=12)
    sequences, attention_mask, mask = generate_responses(policy, batch, greedy_config, tokenizer)
    greedy = scored(reward_model, sequences, attention_mask, mask, tokenizer.eos_token_id)
    logprobs, _ = response_logprobs(policy, greedy.sequences, greedy.attention_mask, greedy.mask.shape[1])

Prompts are left-padded to P (`collate_prompts`); `generate` appends up to T tokens. A response runs
up to and including its first eos (an immediate eos is a one-token response) or to the length
limit; tokens generated after the eos are padding everywhere.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import Callable, Optional

import torch
from transformers import GenerationConfig, GenerationMixin

from pipeline.chunked_logits import LOGITS_CHUNK, next_token_targets, token_logprobs
from pipeline.data import collate_prompts
from pipeline.gold_rewards import GOLD_REWARD_MODULES, gold_reward_batch

logger = logging.getLogger(__name__)


# Every setting that changes which token is picked, at its neutral value: together with
# `model_generation_config` nothing of a model's own generation_config.json reaches `generate`.
NEUTRAL_DECODING = dict(num_beams=1, num_return_sequences=1, min_p=None, typical_p=1.0, epsilon_cutoff=0.0,
                        eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0, length_penalty=1.0,
                        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, bad_words_ids=None,
                        suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
                        forced_eos_token_id=None, exponential_decay_length_penalty=None, renormalize_logits=False,
                        remove_invalid_values=False, min_new_tokens=0)


def generation_configs(tokenizer, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0) -> tuple:
    """(sampling, greedy) GenerationConfigs with every decoding setting explicit: sampling is at
    `temperature` and `top_p` with nothing else (no top-k, no penalties), greedy is plain argmax.
    `generate_responses` makes the config the model's own for the call, so the model's
    generation_config.json (Llama-2: do_sample true, temperature 0.6, top_p 0.9) cannot override it."""
    common = dict(NEUTRAL_DECODING, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, use_cache=True)
    sample = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)
    greedy = GenerationConfig(do_sample=False, **common)
    return sample, greedy


@contextlib.contextmanager
def model_generation_config(module, generation_config: GenerationConfig):
    """Makes `generation_config` the `generation_config` of every generating model inside `module` (a
    model, a peft wrapper or a DeepSpeed engine) for the duration.

    `generate` fills settings from the model's own generation_config: transformers 4.50-4.57 replace
    every passed value that equals the library default (do_sample False, temperature 1.0, top_p 1.0),
    5.x every value left None. With the passed config as the model's own, both fill from it alone.
    """
    models = [m for m in module.modules() if isinstance(m, GenerationMixin) and hasattr(m, "generation_config")]
    saved = [m.generation_config for m in models]
    try:
        for model in models:
            model.generation_config = generation_config
        yield
    finally:
        for model, config in zip(models, saved):
            model.generation_config = config


def load_gold_reward(name: Optional[str], field: str = "gold_reward") -> Optional[Callable]:
    """The programmatic reward `name` (one of GOLD_REWARDS), or None (also when its module is absent);
    `field` names the config field in the warning."""
    if name is None:
        return None
    try:
        return gold_reward_batch(name)
    except ImportError as error:
        logger.warning("`%s` is %r but %s cannot be imported (%s); "
                       "gold_reward is not logged", field, name, GOLD_REWARD_MODULES[name], error)
        return None


def collate_with_prompts(rows: list, pad_token_id: int) -> dict:
    """`collate_prompts` (left-padded ids and mask) plus the prompt texts, for the gold reward and the
    reward functions, with each row's other fields (`columns`, dicts), where it came from (`source`) and
    its row in its set (`row_id`) where the rows carry it."""
    batch = collate_prompts(rows, pad_token_id)
    batch["prompt"] = [row["prompt"] for row in rows]
    batch["columns"] = [json.loads(row["columns"]) if row.get("columns") else {} for row in rows]
    batch["source"] = [row.get("source") or "a prompt row" for row in rows]
    if rows and "row_id" in rows[0]:
        batch["row_id"] = [row["row_id"] for row in rows]
    return batch


def response_mask(sequences: torch.Tensor, prompt_length: int, eos_token_id: Optional[int],
                  pad_token_id: Optional[int]) -> torch.Tensor:
    """Which generated tokens belong to each response: all of them up to and including the first eos.

    sequences: (B, P + T) prompts left-padded to P, then the generated tokens, as `generate` returns them.
    Returns (B, T) long 0/1. A row that stops at eos at once keeps that eos (one token); a row that
    reaches the length limit keeps all T. Without an eos id a response ends before its first pad token
    (generate pads finished rows with it); the pad id is not used otherwise, since a model may well
    sample the pad token (often the eos token) as a real token.

    Raises:
        ValueError: when both ids are None.
    """
    if eos_token_id is None and pad_token_id is None:
        raise ValueError("response_mask needs an eos or a pad token id to find where responses end")
    responses = sequences[:, prompt_length:]  # (B, T)
    is_stop = (responses == (eos_token_id if eos_token_id is not None else pad_token_id)).long()
    stops_before = is_stop.cumsum(-1) - is_stop  # stop tokens strictly before each position
    mask = stops_before == 0
    if eos_token_id is None:
        mask &= is_stop == 0
    return mask.long()


def with_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Model inputs with positions counted over real tokens, as `generate` counts them under left padding."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def response_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                      with_entropy: bool = False, chunk: int = LOGITS_CHUNK) -> tuple:
    """Log-probabilities (and entropies, without gradient) of the last `response_length` tokens of
    `sequences`, the LM head applied `chunk` tokens at a time (0: all at once).

    sequences, attention_mask: (B, P + T). Returns ((B, T) log-probs, (B, T) entropies or None).
    """
    # Only the positions that predict response tokens go through the LM head.
    targets = next_token_targets(sequences[:, -response_length - 1:])  # (B, T + 1): the last predicts nothing
    logprobs, entropy = token_logprobs(model, with_positions(sequences, attention_mask), targets, chunk, with_entropy)
    return logprobs[:, :-1], entropy[:, :-1] if with_entropy else None


@dataclasses.dataclass
class Generated:
    """Responses to B prompts left-padded to P, as `generate` lays them out."""
    sequences: torch.Tensor        # (B, P + T) prompt then response, right-padded with the pad token
    attention_mask: torch.Tensor   # (B, P + T)
    mask: torch.Tensor             # (B, T) response tokens (up to and including the first eos)
    sampler_logprobs: Optional[torch.Tensor] = None  # (B, T) the engine's log-probs of its tokens, if it gives them


@dataclasses.dataclass
class Responses:
    """Responses to B prompts left-padded to P, generated up to T tokens."""

    sequences: torch.Tensor       # (B, P + T) prompt then response
    attention_mask: torch.Tensor  # (B, P + T) 1 on the real prompt and response tokens
    mask: torch.Tensor            # (B, T) response tokens (up to and including the first eos)
    reward: torch.Tensor          # (B,) reward model score, plus the reward functions' where there are any
    sampler_logprobs: Optional[torch.Tensor] = None  # (B, T) the rollout engine's, where it gives them (vLLM)
    # Each reward function's own values, name -> (B,), NaN where it left a response unscored.
    function_rewards: dict = dataclasses.field(default_factory=dict)
    decoded: Optional[list] = dataclasses.field(default=None, repr=False)  # `texts`, once decoded

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def texts(self, tokenizer) -> list:
        """The responses' text (special tokens dropped), decoded on the first call only."""
        if self.decoded is None:
            responses = self.sequences[:, -self.mask.shape[1]:]  # (B, T)
            self.decoded = [tokenizer.decode(row[keep.bool()], skip_special_tokens=True)
                            for row, keep in zip(responses, self.mask)]
        return self.decoded


def generate_responses(module, batch: dict, generation_config, tokenizer) -> tuple:
    """(sequences (B, P + T), attention mask (B, P + T), response mask (B, T)) for one prompt batch."""
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    with model_generation_config(module, generation_config):
        sequences = module.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                    generation_config=generation_config, synced_gpus=False)
    mask = response_mask(sequences, prompt_ids.shape[1], tokenizer.eos_token_id, tokenizer.pad_token_id)
    return sequences, torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1), mask


def missing_eos(responses: torch.Tensor, mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) bool: the response (B, T) under `mask` (B, T) holds no eos, i.e. the length limit cut it."""
    return ~((responses == eos_token_id) & mask.bool()).any(dim=-1)


def missing_eos_penalized(reward: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor, eos_token_id: int,
                          penalty: Optional[float]) -> torch.Tensor:
    """`reward` (B,) minus `penalty` where the response (B, T) under `mask` (B, T) holds no eos."""
    if not penalty:
        return reward
    return reward - penalty * missing_eos(responses, mask, eos_token_id).to(reward.dtype)


def scored(reward_model, sequences: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
           eos_token_id: int, missing_eos_penalty: Optional[float] = None,
           sampler_logprobs: Optional[torch.Tensor] = None) -> Responses:
    """Responses with their reward. Tokens after the first eos are masked out, so the score is read
    at the eos (or at the last token of a response cut by the length limit, then penalised). Without a
    reward model (reward functions alone) the score is 0, less the penalty."""
    if reward_model is None:
        reward = torch.zeros(sequences.shape[0], device=sequences.device)
    else:
        reward = reward_model(input_ids=sequences, attention_mask=attention_mask).float()
    reward = missing_eos_penalized(reward, sequences[:, -mask.shape[1]:], mask, eos_token_id, missing_eos_penalty)
    return Responses(sequences, attention_mask, mask, reward=reward, sampler_logprobs=sampler_logprobs)
