"""vLLM as the rollout engine: one in-process engine per rank (`distributed_executor_backend=
"external_launcher"` over the trainer's process group, as TRL's colocate mode), fed the trainer's
weights after every optimizer step that changed them.

- **Weights.** Before a rollout, if the actor has stepped since the last update, its weights stream
  into the engine through vLLM's in-place reload (`reload_weights`, layer by layer, re-running the
  backend's kernel repacking): under ZeRO-3 one decoder layer is gathered at a time, never the whole
  model; LoRA adapters are merged on the fly (base weight + the adapter's delta, computed from the
  trainer's tensors into new ones), so the trainer's copy is never touched.
- **Sampling.** Prompts go in as token ids (no tokenizer in the engine); every decoding setting is
  explicit (temperature, top-p, no top-k, no penalties, the tokenizer's eos as the only stop token,
  the model's generation_config.json ignored), and each request has its own seed, derived from the
  run's seed, the rollout's key (which rollout of which step) and the prompt's row in the dataset
  (and which of its k samples), so a resumed run samples exactly what the uninterrupted one did, on
  the same number of ranks or on another. The sampled tokens' log-probabilities come back
  with them (the model's own, before temperature), for the sampler-trainer gap.
- **Memory.** The KV cache is `rollout.kv_cache_gib` or `gpu_memory_utilization` of the GPU;
  `rollout.sleep` frees it while the trainer steps (and the engine wakes for the next rollout).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from pipeline.generation import Generated, response_mask

GIB = 2**30
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def trainer_weights(engine) -> Iterator[tuple]:
    """(Hugging Face name, tensor) of every weight of the training engine's model, as a plain causal LM
    holds them: LoRA merged into its base weights, peft's name prefixes gone. Under ZeRO-3 a decoder
    layer's parameters are gathered together and released before the next layer's (collective: every
    rank iterates to the end)."""
    model = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    for group in layer_groups(model):
        if zero3:
            from deepspeed import zero  # imported here, after pipeline.engine has picked the accelerator

            gathered = zero.GatheredParameters([param for _, param in group])
        else:
            gathered = contextlib.nullcontext()
        with gathered, torch.no_grad():
            yield from plain_weights(model, group)


def layer_groups(model) -> Iterator[list]:
    """The model's named parameters in order, grouped by decoder layer (the name up to its first index,
    `model.layers.3`); a parameter outside the layers is a group of its own."""
    group, key = [], None
    for name, param in model.named_parameters():
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        name_key = ".".join(parts[:index + 1]) if index is not None else name
        if group and name_key != key:
            yield group
            group = []
        key = name_key
        group.append((name, param))
    if group:
        yield group


def plain_weights(model, group: list) -> Iterator[tuple]:
    """A group's weights under their plain causal-LM names, LoRA deltas merged (no grad, new tensors
    for merged weights; the trainer's parameters as they are otherwise)."""
    peft_prefix = "base_model.model."
    for name, param in group:
        if ".lora_" in name:  # adapters: merged into their base weight below
            continue
        plain = name.removeprefix(peft_prefix) if name.startswith(peft_prefix) else name
        if ".base_layer." in name:
            owner_name, _, leaf = name.rpartition(".base_layer.")
            owner = model.get_submodule(owner_name)
            tensor = param.detach()
            if leaf == "weight" and not getattr(owner, "merged", False):
                tensor = tensor.clone()
                for adapter in owner.active_adapters:
                    if adapter in getattr(owner, "lora_A", {}):
                        tensor += owner.get_delta_weight(adapter).to(tensor.dtype)
            yield plain.replace(".base_layer.", "."), tensor
        else:
            yield plain, param.detach()


def request_seed(base: int, key: tuple, request: tuple) -> int:
    """A request's sampling seed from the run's seed, the rollout's key and the request's identity
    (`request_identities`): the same on a resumed run, different for every request."""
    text = repr((base, key, request)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


def request_identities(batch: dict, rank: int) -> list:
    """Each row's identity for its seed. Where the batch carries `row_id` (the prompt's row in its
    dataset, as the stages' prompt data does): that row and which repeat of it this is, so a prompt is
    sampled alike whichever rank and micro-batch it falls in. Otherwise the rank and the row."""
    rows = len(batch["input_ids"])
    if "row_id" not in batch:
        return [("rank", rank, row) for row in range(rows)]
    seen: dict = {}
    identities = []
    for row_id in (int(value) for value in batch["row_id"]):
        seen[row_id] = seen.get(row_id, -1) + 1
        identities.append(("row", row_id, seen[row_id]))
    return identities


def create_llm(model_path: str, rollout, dtype: torch.dtype, max_model_len: int, seed: int):
    """This rank's vLLM engine on the model at `model_path`, in this process (external launcher over
    the trainer's process group when there are several ranks), sized by the `rollout` section; the one
    already made with the same settings, if any."""
    # The engine core in this process, so the trainer's weights can be handed to it directly.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    kwargs = dict(model=model_path, dtype=DTYPE_NAMES[dtype], max_model_len=rollout.max_model_len or max_model_len,
                  enforce_eager=rollout.enforce_eager, tensor_parallel_size=rollout.tensor_parallel_size,
                  skip_tokenizer_init=True, generation_config="vllm", seed=seed, enable_sleep_mode=rollout.sleep,
                  enable_prefix_caching=False)
    if dist.is_initialized() and dist.get_world_size() > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    kv_cache_gib = rollout.kv_cache_gib
    if kv_cache_gib is None and not torch.cuda.is_available():
        kv_cache_gib = 1.0  # vLLM's CPU default would take a share of host memory
    if kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
    else:
        kwargs["gpu_memory_utilization"] = rollout.gpu_memory_utilization
    key = repr(sorted(kwargs.items()))
    if key not in _ENGINES:
        _ENGINES[key] = LLM(**kwargs)
    return _ENGINES[key]


# Engines live until the process ends: vLLM's shutdown of an engine destroys torch's default process
# group, which under the external launcher is the trainer's. A later run in the same process (the test
# workers run several) with the same settings takes the same engine; its weights follow the new trainer.
_ENGINES: dict = {}


def shut_down_engines() -> None:
    """Shuts down every engine this process made (at its end: see pipeline.run.leave_process_group)."""
    for llm in _ENGINES.values():
        llm.llm_engine.engine_core.shutdown()
    _ENGINES.clear()


class VllmRollouts:
    """The rollout engine interface (pipeline.rl.rollout.RolloutEngine) on a vLLM engine (`create_llm`)
    that follows the training engine `actor`."""

    def __init__(self, actor, tokenizer, llm, rollout, seed: int):
        self.actor, self.tokenizer, self.llm, self.settings, self.seed = actor, tokenizer, llm, rollout, seed
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.synced_step = None  # the actor's global step whose weights the engine holds (None: not yet)
        self.asleep = False
        if rollout.sleep:
            self.sleep()

    def update_weights(self) -> None:
        """Streams the trainer's current weights into the engine (collective under ZeRO-3)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": trainer_weights(self.actor)})
        self.synced_step = self.actor.global_steps

    def sleep(self) -> None:
        self.llm.sleep(level=1)
        self.asleep = True

    @torch.no_grad()
    def generate(self, batch: dict, samplings: Sequence, key: tuple = ()) -> list:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        if self.synced_step != self.actor.global_steps:
            self.update_weights()
        generated = generate(self.llm, self.tokenizer, batch, samplings, self.seed, key, self.rank)
        if self.settings.sleep:
            self.sleep()
        return generated


def sampling_params(sampling, eos_token_id: int, seed: int):
    """vLLM's sampling parameters for `sampling` (pipeline.rl.rollout.Sampling), every setting explicit."""
    from vllm import SamplingParams

    greedy = sampling.greedy
    return SamplingParams(n=1, temperature=0.0 if greedy else sampling.temperature,
                          top_p=1.0 if greedy else sampling.top_p, top_k=0, min_p=0.0, presence_penalty=0.0,
                          frequency_penalty=0.0, repetition_penalty=1.0, max_tokens=sampling.max_new_tokens,
                          min_tokens=sampling.min_new_tokens, seed=seed, stop_token_ids=[eos_token_id], ignore_eos=False, logprobs=0,
                          detokenize=False)


def generate(llm, tokenizer, batch: dict, samplings: Sequence, seed: int, key: tuple, rank: int = 0) -> list:
    """A `Generated` per sampling for the left-padded prompt batch, from one engine call; each request
    seeded by `request_seed(seed, (*key, sampling index), its identity)`."""
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    prompts = [{"prompt_token_ids": ids[keep.bool()].tolist()} for ids, keep in zip(prompt_ids, prompt_mask)]
    identities = request_identities(batch, rank)
    requests, params = [], []
    for which, sampling in enumerate(samplings):
        for row, prompt in enumerate(prompts):
            requests.append(prompt)
            params.append(sampling_params(sampling, tokenizer.eos_token_id,
                                          request_seed(seed, (*key, which), identities[row])))
    outputs = llm.generate(requests, params, use_tqdm=False)
    rows = len(prompts)
    return [assemble(tokenizer, prompt_ids, prompt_mask, outputs[which * rows:(which + 1) * rows])
            for which in range(len(samplings))]


def assemble(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, outputs: list):
    """Generated responses as `generate` lays them out: (B, P + T) sequences right-padded with the pad
    token to the longest response, the attention and response masks, and the sampler's log-probs."""
    completions = [output.outputs[0] for output in outputs]
    length = max(len(completion.token_ids) for completion in completions)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    responses = torch.full((len(outputs), length), pad, dtype=prompt_ids.dtype)
    logprobs = torch.zeros(len(outputs), length)
    for row, completion in enumerate(completions):
        tokens = list(completion.token_ids)
        responses[row, :len(tokens)] = torch.tensor(tokens, dtype=prompt_ids.dtype)
        logprobs[row, :len(tokens)] = torch.tensor([step[token].logprob for step, token
                                                    in zip(completion.logprobs, tokens)])
    sequences = torch.cat([prompt_ids, responses.to(prompt_ids.device)], dim=1)
    mask = response_mask(sequences, prompt_ids.shape[1], tokenizer.eos_token_id, tokenizer.pad_token_id)
    attention_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    return Generated(sequences, attention_mask, mask, (logprobs.to(prompt_ids.device) * mask).float())
