"""vLLM as the rollout engine: the trainer's weights as the engine receives them (layer by layer, LoRA
merged, names plain), request seeds, the sampler correction on hand-built tensors, the `rollout`
section's checks; and on 2 real CPU ranks, an engine per rank following a DeepSpeed trainer at ZeRO-2,
ZeRO-3 and ZeRO-3 with LoRA: greedy responses token for token equal to HF `generate` on the trainer's
current weights, sampled tokens' log-probabilities equal to the trainer's within 1e-5 (fp32)."""
import copy
import importlib.util

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.rl.algos import clipped_surrogate_loss, reinforce_loss, truncated_importance_weights
from pipeline.rl.sections import require_vllm
from pipeline.rl.stage import sampler_correction
from pipeline.rl.vllm_engine import layer_groups, plain_weights, request_identities, request_seed
from pipeline.generation import Responses
from tests.conftest import launch_ranks, read_json
from tests.tiny_models import save_tiny_model_dir, tiny_llama

HAS_VLLM = importlib.util.find_spec("vllm") is not None


# ---- the weights the engine receives ------------------------------------------------------------

def test_weights_are_grouped_by_decoder_layer_in_model_order():
    model = tiny_llama()
    groups = [[name for name, _ in group] for group in layer_groups(model)]
    assert [group[0] for group in groups] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                              "model.layers.1.self_attn.q_proj.weight", "model.norm.weight",
                                              "lm_head.weight"]
    assert all(name.startswith("model.layers.1.") for name in groups[2])
    assert sum(len(group) for group in groups) == len(list(model.parameters()))


def test_lora_reaches_the_engine_merged_under_plain_names_and_the_trainer_keeps_its_weights():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    plain_names = [name for name, _ in base.named_parameters()]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    sent = {name: tensor.clone() for group in layer_groups(model) for name, tensor in plain_weights(model, group)}
    # The independent reference: peft's own merge, on a copy.
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert list(sent) == plain_names
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(sent["model.layers.0.self_attn.q_proj.weight"],
                           before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())


def test_request_seeds_repeat_for_the_same_rollout_and_differ_across_requests():
    assert request_seed(0, ("train", 3, 0), ("row", 5, 0)) == request_seed(0, ("train", 3, 0), ("row", 5, 0))
    seeds = {request_seed(0, ("train", step, which), ("row", row, repeat)) for step in range(4)
             for which in range(2) for row in range(8) for repeat in range(2)}
    assert len(seeds) == 128 and all(0 <= seed < 2**31 for seed in seeds)
    assert request_seed(1, ("train", 3, 0), ("row", 5, 0)) != request_seed(0, ("train", 3, 0), ("row", 5, 0))


def test_a_prompt_is_seeded_by_its_row_whichever_rank_and_batch_it_falls_in():
    """Rows 4 and 9 on rank 0 in one micro-batch, or row 9 alone on rank 2 in another: row 9's requests
    are the same; a prompt repeated k times (GRPO's group) has k identities."""
    ids = torch.zeros(3, 2, dtype=torch.long)
    on_two = request_identities({"input_ids": ids, "row_id": [4, 9, 9]}, rank=0)
    on_three = request_identities({"input_ids": ids[:2], "row_id": [9, 9]}, rank=2)
    assert on_two[1:] == on_three == [("row", 9, 0), ("row", 9, 1)]
    assert on_two[0] == ("row", 4, 0)
    # Without row ids (a batch made outside the stages): the rank and the row.
    assert request_identities({"input_ids": ids[:2]}, rank=1) == [("rank", 1, 0), ("rank", 1, 1)]


# ---- the sampler correction ---------------------------------------------------------------------

def test_truncated_importance_weights_are_the_probability_ratio_capped():
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.0, -0.5, -3.0]])
    weights = truncated_importance_weights(trainer, sampler, cap=2.0)
    assert torch.allclose(weights, torch.tensor([[1.0, torch.exp(torch.tensor(-1.5)).item(), 2.0]]))


def test_the_correction_weighs_each_tokens_loss_and_the_gap_is_summed_over_response_tokens():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -4.0]])
    sampler = torch.tensor([[-1.1, -1.5, 0.0], [-0.2, -0.1, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    responses = Responses(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5), mask, torch.zeros(2), sampler)
    weights, sums = sampler_correction(trainer, responses, cap=1.2)
    gap = 0.1 + 0.5 + 0.0 + 0.2 + 4.0  # |trainer - sampler| on the 5 response tokens
    assert sums["sampler_logprob_gap"].item() == pytest.approx(gap)
    expected = torch.exp(trainer - sampler).clamp(max=1.2) * mask
    assert torch.allclose(weights, expected)
    # REINFORCE and the clipped surrogate with weights equal the hand-weighted per-token losses.
    logprobs = trainer.clone().requires_grad_()
    returns = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 0.5]])
    loss = reinforce_loss(logprobs, returns, mask, weights)
    assert loss.item() == pytest.approx(-(returns * trainer * mask * expected).sum().item() / 5)
    advantage = torch.tensor([1.0, -1.0])
    surrogate, _ = clipped_surrogate_loss(logprobs, trainer, advantage, mask, 0.2, weights=weights)
    assert surrogate.item() == pytest.approx(-(advantage[:, None] * mask * expected).sum().item() / 5)
    assert sampler_correction(trainer, Responses(responses.sequences, responses.attention_mask, mask,
                                                 responses.reward), 1.2) == (None, {})


# ---- config -------------------------------------------------------------------------------------

def test_the_rollout_section_reports_its_problems_by_field(monkeypatch):
    from stages.grpo import GrpoConfig

    base = ["model.path=m", "data.path=d", "data.format=prompt", "grpo.reward_model_path=r"]
    with pytest.raises(ConfigError) as error:
        load_config(GrpoConfig, None, [*base, "rollout.engine=sglang", "rollout.gpu_memory_utilization=1.5",
                                       "rollout.kv_cache_gib=0", "rollout.max_model_len=8",
                                       "rollout.importance_correction=0.5"])
    problems = "\n".join(error.value.problems)
    for expected in ("`rollout.engine` is 'sglang'", "`rollout.gpu_memory_utilization` is 1.5",
                     "`rollout.kv_cache_gib` is 0", "`rollout.max_model_len` 8 is below `data.max_length` 512",
                     "`rollout.importance_correction` is 0.5"):
        assert expected in problems
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as error:
            load_config(GrpoConfig, None, [*base, "rollout.engine=vllm", "rollout.sleep=true"])
        assert "`rollout.sleep` is true but vLLM's sleep mode needs a GPU" in "\n".join(error.value.problems)
    with pytest.raises(ConfigError) as error:
        load_config(GrpoConfig, None, [*base, "rollout.importance_correction=2"])
    assert "`rollout.importance_correction` is set with `rollout.engine` hf" in "\n".join(error.value.problems)
    # Without vLLM a config still loads (plans and dry runs need no engine); the run refuses at its start.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "vllm"
                        else real_find_spec(name, *rest))
    config = load_config(GrpoConfig, None, [*base, "rollout.engine=vllm"])
    with pytest.raises(ConfigError) as error:
        require_vllm(config)
    assert "`rollout.engine` is vllm but vLLM is not installed; install it with `bash scripts/setup.sh --vllm`" in \
        "\n".join(error.value.problems)


# ---- on 2 ranks ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (bash scripts/setup.sh --vllm)")
def test_the_engine_follows_the_trainer_at_zero_2_and_3_and_with_lora(tmp_path):
    save_tiny_model_dir(tmp_path / "model")
    launch_ranks(2, ["tests/pipeline/vllm_worker.py", "--out", tmp_path / "out.json", "--model", tmp_path / "model"])
    ranks = read_json(tmp_path / "out.json")["ranks"]
    for rank, cases in enumerate(ranks):
        assert set(cases) == {"zero2", "zero3", "zero3_lora"}
        for case, result in cases.items():
            where = f"rank {rank}, {case}"
            for phase in ("start", "trained"):
                compared = result[phase]
                assert compared["vllm_greedy"] == compared["hf_greedy"], f"{where}, {phase}: greedy tokens differ"
                assert compared["vllm_response_mask"] == compared["hf_response_mask"], where
                assert compared["sampled_tokens"] > 0 and compared["logprob_gap"] < 1e-5, (where, compared)
            # Training moved the weights, and the engine followed: its greedy answers changed with them.
            assert result["trained"]["hf_greedy"] != result["start"]["hf_greedy"], where
            assert result["synced_step"] == 3, where
            assert result["trainer_unchanged_by_sync"] and result["trainer_unchanged_by_sync_after_training"], where
