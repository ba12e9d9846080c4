"""Log-probabilities and entropies of responses (`response_logprobs`, the update's `policy_logprobs`)
against a naive per-position computation: each response token scored by the model on that row's real
tokens alone (no padding, default positions), one prefix at a time. Left-padded prompts of different
lengths, a response that stops at eos and is padded after it, and one cut by the length limit; the LM
head applied to all positions at once and 2 tokens at a time (pipeline.chunked_logits)."""
import pytest
import torch

from pipeline.generation import Responses, response_logprobs, response_mask
from pipeline.rl.rollout import policy_logprobs
from tests.tiny_models import tiny_llama

PAD, EOS = 0, 2
PROMPTS = [[5, 17, 33, 41], [9, 12], [60, 61, 62]]      # left-padded to 4
RESPONSES = [[7, 8, EOS, PAD, PAD], [21, 22, 23, 24, 25], [EOS, PAD, PAD, PAD, PAD]]  # stops, cut, stops at once


def batch():
    width = max(len(p) for p in PROMPTS)
    rows = [[PAD] * (width - len(p)) + p + r for p, r in zip(PROMPTS, RESPONSES)]
    sequences = torch.tensor(rows)
    mask = response_mask(sequences, width, EOS, PAD)  # (B, T): up to and including the first eos
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    return sequences, torch.cat([prompt_mask, mask], dim=1), mask


def naive(model, prompt, response, keep):
    """Per kept response position t: (log p(y_t | real tokens before it), entropy of that distribution)."""
    logprobs, entropies = [], []
    for t in range(keep):
        context = torch.tensor([prompt + response[:t]])
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=context).logits[0, -1].double(), dim=-1)
        logprobs.append(log_p[response[t]].item())
        entropies.append(-(log_p.exp() * log_p).sum().item())
    return logprobs, entropies


@pytest.mark.parametrize("chunk", [0, 2], ids=["whole", "chunked"])
def test_response_and_policy_logprobs_match_a_per_position_computation(chunk):
    model = tiny_llama(seed=1).eval()
    sequences, attention_mask, mask = batch()
    assert mask.sum(-1).tolist() == [3, 5, 1]
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, sequences, attention_mask, mask.shape[1], with_entropy=True,
                                              chunk=chunk)
    update_logprobs, update_entropy = policy_logprobs(model, Responses(sequences, attention_mask, mask, reward=None),
                                                      chunk)
    assert update_logprobs.requires_grad
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        keep = int(mask[row].sum())
        expected_logprobs, expected_entropies = naive(model, prompt, response, keep)
        for got_logprobs, got_entropy in ((logprobs, entropy), (update_logprobs, update_entropy)):
            torch.testing.assert_close(got_logprobs[row, :keep].detach().double(), torch.tensor(expected_logprobs,
                                       dtype=torch.float64), rtol=0, atol=1e-5, msg=f"log-probs of row {row}")
            torch.testing.assert_close(got_entropy[row, :keep].double(), torch.tensor(expected_entropies,
                                       dtype=torch.float64), rtol=0, atol=1e-5, msg=f"entropies of row {row}")
