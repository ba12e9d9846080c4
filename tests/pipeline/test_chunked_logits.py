"""Chunked log-probabilities (pipeline.chunked_logits) against the whole logits, in one process on tiny
Llamas: SFT's loss against the model's own `labels=` loss, DPO's answer log-probs against a per-row
log-softmax, the policy's log-probs and entropies against the whole-logits path (itself held to a
per-position computation in test_logprobs.py), values and gradients (every trainable parameter and the LM
head's input) with a plain, a tied and a LoRA-adapted LM head; the memory a forward and backward
allocates, counted op by op. tests/pipeline/reference_worker.py checks the same inside ZeRO-2 and ZeRO-3
engines."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.chunked_logits import (IGNORE_INDEX, next_token_targets, output_head, token_logprobs,
                                     whole_logits_scores)
from pipeline.data import collate_pairwise, collate_sft
from pipeline.generation import Responses, response_mask
from pipeline.rl.rollout import policy_logprobs
from stages.dpo import answer_logprobs
from stages.sft import sft_step
from tests.tiny_models import lora_with_head, tiny_llama

PAD, EOS = 0, 2
CHUNK = 4  # tokens: every batch below takes several chunks, the last one short


def sft_batch() -> dict:
    rows = [([5, 17, 33], [41, 8, 9, EOS]), ([9, 12, 60, 61, 62, 70], [21, EOS]), ([3], [44, 45, 46, 47, 48, EOS])]
    return collate_sft([{"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
                        for prompt, answer in rows], PAD)


def pair_batch() -> dict:
    rows = [([5, 17, 33], [41, 8, EOS], [40, 7, 6, 5, EOS]), ([9, 12], [21, 22, 23, 24, EOS], [30, EOS])]
    return collate_pairwise([{"chosen_input_ids": p + c, "rejected_input_ids": p + r, "prompt_length": len(p)}
                             for p, c, r in rows], PAD)


def responses() -> Responses:
    """Left-padded prompts of different lengths; a response that stops at eos, one cut by the length limit,
    one that stops at once."""
    prompts, answers = [[5, 17, 33, 41], [9, 12], [60, 61, 62]], [[7, 8, EOS, PAD], [21, 22, 23, 24], [EOS] + [PAD] * 3]
    sequences = torch.tensor([[PAD] * (4 - len(p)) + p + a for p, a in zip(prompts, answers)])
    mask = response_mask(sequences, 4, EOS, PAD)
    prompt_mask = torch.tensor([[0] * (4 - len(p)) + [1] * len(p) for p in prompts])
    return Responses(sequences, torch.cat([prompt_mask, mask], dim=1), mask, reward=None)


def naive_answer_logprobs(model, batch: dict) -> torch.Tensor:
    """(2B,) summed answer log-probs from the model's whole logits, a float64 log-softmax per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    logprobs = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logprobs * (labels != IGNORE_INDEX)).sum(-1)


def losses(model, chunk: int) -> dict:
    """Per pass, a function giving (scalar loss with grad, values to compare) with the chunked scores, or
    with an independent reference (`chunk` None)."""
    sft, pairs, sampled = sft_batch(), pair_batch(), responses()
    weights = torch.linspace(0.5, 2.0, sampled.mask.shape[1])  # a different gradient at every position

    def sft_loss():
        loss = model(**sft).loss if chunk is None else sft_step(model, sft, chunk)[0]
        return loss, loss.detach()

    def dpo_loss():
        chosen, rejected = (naive_answer_logprobs(model, pairs).chunk(2) if chunk is None
                            else answer_logprobs(model, pairs, chunk))
        return (chosen - 0.5 * rejected).sum(), torch.cat([chosen, rejected]).detach().float()

    def policy_loss():
        logprobs, entropy = policy_logprobs(model, sampled, chunk or 0)
        values = torch.cat([logprobs.detach(), entropy], dim=1) * sampled.mask.repeat(1, 2)
        return (logprobs * weights * sampled.mask).sum(), values

    return {"sft": sft_loss, "dpo": dpo_loss, "policy": policy_loss}


def run(model, loss_fn) -> tuple:
    """(values, {name: gradient} of every trainable parameter and of the LM head's input) of one pass."""
    model.zero_grad(set_to_none=True)
    head_inputs = []

    def keep_input(module, args):
        args[0].retain_grad()
        head_inputs.append(args[0])

    handle = output_head(model).register_forward_pre_hook(keep_input)
    try:
        loss, values = loss_fn()
        loss.backward()
    finally:
        handle.remove()
    grads = {name: param.grad.float() for name, param in model.named_parameters() if param.requires_grad}
    return values, {**grads, "LM head input": head_inputs[0].grad.float()}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference relative to the reference's largest magnitude."""
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


HEADS = {"plain": lambda dtype: tiny_llama(seed=1, dtype=dtype),
         "tied": lambda dtype: tiny_llama(seed=1, dtype=dtype, tie_word_embeddings=True),
         "LoRA": lambda dtype: lora_with_head(tiny_llama(seed=1, dtype=dtype))}


@pytest.mark.parametrize("head", HEADS)
def test_chunked_losses_and_gradients_equal_the_whole_logits_in_fp32(head):
    """fp32: the loss (values), the LM head's input and parameters' gradients within 1e-6 of the reference,
    relative to its largest entry; the layers below within 1e-5 (measured 1.5e-6: the head input's last-bit
    differences, from matmuls blocked differently, carried through two layers' backward)."""
    model = HEADS[head](torch.float32).train()
    if head == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if head == "LoRA":
        assert {name for name, p in model.named_parameters() if "lm_head" in name and p.requires_grad} == {
            "base_model.model.lm_head.lora_A.default.weight", "base_model.model.lm_head.lora_B.default.weight"}
    chunked, reference = losses(model, CHUNK), losses(model, None)
    for name in chunked:
        got_values, got = run(model, chunked[name])
        expected_values, expected = run(model, reference[name])
        assert relative_error(got_values, expected_values) <= 1e-6, (name, got_values, expected_values)
        assert got.keys() == expected.keys()
        errors = {param: relative_error(got[param], expected[param]) for param in expected}
        head_errors = {param: error for param, error in errors.items() if "lm_head" in param or "LM head" in param
                       or (head == "tied" and "embed_tokens" in param)}
        assert len(head_errors) == {"plain": 2, "tied": 2, "LoRA": 3}[head]
        assert max(head_errors.values()) <= 1e-6, (name, head_errors)
        assert max(errors.values()) <= 1e-5, (name, sorted(errors.items(), key=lambda item: -item[1])[:3])


@pytest.mark.parametrize("head", HEADS)
def test_chunked_losses_and_gradients_in_bf16_are_the_whole_logits_to_bf16_rounding(head):
    """bf16 against the whole logits in bf16: the same log-probs and losses (1e-6); the LM head's input
    gradient within 1e-6 (each position's is its own chunk's); the gradients within 1e-2 where the head's
    bf16 weight gradient is summed chunk by chunk, one rounding (2^-8 relative) per chunk instead of one in
    all (measured 3.0e-3 to 6.0e-3: one or two bf16 steps; peft keeps LoRA's adapters in fp32: 1e-7)."""
    model = HEADS[head](torch.bfloat16).train()
    chunked, reference = losses(model, CHUNK), losses(model, 0)
    for name in ("sft", "policy"):  # the dpo pass's reference is float64, not bf16's whole-logits path
        got_values, got = run(model, chunked[name])
        expected_values, expected = run(model, reference[name])
        assert relative_error(got_values, expected_values) <= 1e-6, name
        errors = {param: relative_error(got[param], expected[param]) for param in expected}
        assert max(errors.values()) <= 1e-2, (name, sorted(errors.items(), key=lambda item: -item[1])[:3])
        assert errors["LM head input"] <= 1e-6, name


def test_next_token_targets_and_whole_logits_scores_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, 9.0, 9.0]]])  # (1, 4, 3)
    labels = torch.tensor([[-100, 1, 2, -100]])  # prompt token, two answer tokens, padding
    targets = next_token_targets(labels)
    assert targets.tolist() == [[1, 2, -100, -100]]
    logprobs, entropy = whole_logits_scores(logits, targets, with_entropy=True)
    expected = torch.log_softmax(logits[0, :2], -1)
    assert logprobs.tolist()[0] == pytest.approx([expected[0, 1].item(), expected[1, 2].item(), 0.0, 0.0], abs=1e-6)
    assert entropy[0, :2].tolist() == pytest.approx((-(expected.exp() * expected).sum(-1)).tolist(), abs=1e-6)
    assert entropy[0, 2:].tolist() == [0.0, 0.0]  # ignored positions are not scored


class AllocatedBytes(TorchDispatchMode):
    """Counts the storages the ops it sees create (not views of their inputs): the most bytes alive at once
    and the largest one. Op-internal scratch is not seen."""

    def __init__(self):
        super().__init__()
        self.sizes, self.live, self.peak, self.largest = {}, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {tensor.untyped_storage().data_ptr() for tensor in tensors_in((args, kwargs))}
        for tensor in tensors_in(out):
            storage = tensor.untyped_storage()
            pointer, size = storage.data_ptr(), storage.nbytes()
            if size and pointer not in inputs and pointer not in self.sizes:
                self.sizes[pointer] = size
                self.live += size
                self.peak, self.largest = max(self.peak, self.live), max(self.largest, size)
                weakref.finalize(storage, self.free, pointer)
        return out

    def free(self, pointer):
        self.live -= self.sizes.pop(pointer)


def tensors_in(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensors_in(item)]
    if isinstance(value, dict):
        return tensors_in(list(value.values()))
    return []


def test_no_batch_by_vocabulary_tensor_exists_in_the_forward_or_the_backward():
    """4 x 128 tokens, a vocabulary of 4099 (fp32): the whole logits path allocates B x T x V x 4 bytes
    several times over; the chunked one (64 tokens a chunk) stays below one such tensor in all, and its
    largest allocation is one chunk's logits."""
    rows, length, vocab, chunk = 4, 128, 4099, 64
    model = tiny_llama(seed=0, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=1)
    input_ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    full = rows * length * vocab * 4
    counted = {}
    for size in (0, chunk):
        model.zero_grad(set_to_none=True)
        with AllocatedBytes() as counted[size]:
            logprobs, _ = token_logprobs(model, {"input_ids": input_ids}, next_token_targets(input_ids), size)
            (-logprobs.sum()).backward()
    assert counted[0].peak >= 2 * full and counted[0].largest >= full
    assert counted[chunk].peak < full / 2, (counted[chunk].peak, full)
    assert counted[chunk].largest == chunk * vocab * 4


def test_a_model_that_soft_caps_its_logits_takes_the_whole_logits(caplog):
    """Gemma-2 soft-caps the LM head's output in its forward, which would transform the chunked scores too."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=203, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=2.0)).eval()
    input_ids = torch.randint(0, 203, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits  # (2, 9, 203) soft-capped to (-2, 2)
        expected = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        got, _ = token_logprobs(model, {"input_ids": input_ids}, next_token_targets(input_ids), CHUNK)
    assert (got[:, :-1] - expected).abs().max().item() <= 1e-6
    assert "Gemma2ForCausalLM transforms its logits after the LM head (final_logit_softcapping)" in caplog.text
