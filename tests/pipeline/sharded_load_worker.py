"""Models created sharded at ZeRO-3 (2 real CPU ranks, bf16): the policy, the reference, the reward model
and PPO's critic.

Launched by test_models.py. Per model, rank 0 writes every rank's parameter bytes held right after
creation (before any engine exists) next to the whole model's, the largest difference of the gathered
parameters from the same checkpoint loaded whole, and of the ZeRO-3 engine's outputs (loss,
log-probabilities, reward scores) from the whole model's.
"""
import tempfile

import torch
import torch.distributed as dist

from pipeline.config import DataConfig, EngineConfig, ModelConfig, OptimConfig, RunConfig
from pipeline.engine import (create_engine, create_frozen_engine, frozen_ds_config, init_distributed,
                             sharded_creation, training_ds_config)
from pipeline.generation import response_logprobs
from pipeline.models import RewardModel, load_causal_lm, load_reference
from tests.rank_tools import worker_parser, write_results
from tests.tiny_models import tiny_llama

RESPONSE = 6


def held_bytes(model) -> int:
    """Parameter bytes this rank holds: its ZeRO-3 partitions, or the whole tensors of an unsharded model."""
    return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in model.parameters())


def whole_bytes(model) -> int:
    return sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size() for p in model.parameters())


def max_param_diff(sharded, whole) -> float:
    """Largest difference of the gathered ZeRO-3 parameters from the whole model's (collective)."""
    from deepspeed import zero

    expected, diff = dict(whole.named_parameters()), 0.0
    for name, param in sharded.named_parameters():
        with zero.GatheredParameters([param]):
            diff = max(diff, (param.data.float() - expected[name].float()).abs().max().item())
    return diff


def buffer_mismatches(sharded, whole) -> list:
    """Names of the buffers (RoPE's inv_freq, ...) whose dtype or values differ from the whole model's."""
    expected = dict(whole.named_buffers())
    return [name for name, buffer in sharded.named_buffers()
            if buffer.dtype != expected[name].dtype or not torch.equal(buffer, expected[name])]


def all_ranks(value: int) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main():
    args = worker_parser().parse_args()
    init_distributed()
    shared = [tempfile.mkdtemp()]
    dist.broadcast_object_list(shared)
    policy_dir, reward_dir = f"{shared[0]}/policy", f"{shared[0]}/reward"
    if dist.get_rank() == 0:
        tiny_llama(seed=3, num_hidden_layers=4).to(torch.bfloat16).save_pretrained(policy_dir)
        RewardModel(tiny_llama(seed=5, num_hidden_layers=4).to(torch.bfloat16).model).save_pretrained(reward_dir)
    dist.barrier()
    config = RunConfig(output_dir=f"{shared[0]}/run", model=ModelConfig(path=policy_dir),
                       data=DataConfig(path="unused"), optim=OptimConfig(lr=1e-2, gradient_clipping=1.0),
                       engine=EngineConfig(zero_stage=3, precision="bf16", micro_batch_size=3))
    generator = torch.Generator().manual_seed(4)
    sequences = torch.randint(0, 203, (3, 14), generator=generator)
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :3] = 0  # a left-padded row
    results = {}

    # The policy: a training engine at ZeRO-3.
    with torch.no_grad():
        whole = load_causal_lm(config.model, dtype=torch.bfloat16).eval()
        expected_loss = whole(input_ids=sequences, attention_mask=attention_mask, labels=sequences).loss.float()
        expected_logprobs, _ = response_logprobs(whole, sequences, attention_mask, RESPONSE)
    with sharded_creation(training_ds_config(config)):
        policy = load_causal_lm(config.model, dtype=torch.bfloat16)
    results["policy"] = {"held": all_ranks(held_bytes(policy)), "whole": whole_bytes(whole),
                         "dtype": str(next(policy.parameters()).dtype), "param_diff": max_param_diff(policy, whole),
                         "buffer_mismatches": buffer_mismatches(policy, whole)}
    engine = create_engine(config, policy, total_steps=1).engine
    engine.eval()
    with torch.no_grad():
        loss = engine(input_ids=sequences, attention_mask=attention_mask, labels=sequences).loss.float()
        logprobs, _ = response_logprobs(engine, sequences, attention_mask, RESPONSE)
    results["policy"].update(loss=loss.item(), expected_loss=expected_loss.item(),
                             loss_diff=(loss - expected_loss).abs().item(),
                             logprobs_diff=(logprobs - expected_logprobs).abs().max().item())

    # The reference: frozen, from its own files, at ZeRO-3.
    with sharded_creation(frozen_ds_config(config, zero_stage=3)):
        reference = load_reference(config.model, dtype=torch.bfloat16)
    results["reference"] = {"held": all_ranks(held_bytes(reference)), "whole": whole_bytes(whole),
                            "param_diff": max_param_diff(reference, whole),
                            "buffer_mismatches": buffer_mismatches(reference, whole)}
    reference = create_frozen_engine(config, reference, zero_stage=3)
    with torch.no_grad():
        logprobs, _ = response_logprobs(reference, sequences, attention_mask, RESPONSE)
    results["reference"]["logprobs_diff"] = (logprobs - expected_logprobs).abs().max().item()

    # The reward model: frozen backbone + v_head at ZeRO-3.
    with torch.no_grad():
        whole_reward = RewardModel.from_pretrained(reward_dir, dtype=torch.bfloat16).eval()
        expected_scores = whole_reward(sequences, attention_mask).float()
    with sharded_creation(frozen_ds_config(config, zero_stage=3)):
        reward = RewardModel.from_pretrained(reward_dir, dtype=torch.bfloat16)
    results["reward"] = {"held": all_ranks(held_bytes(reward)), "whole": whole_bytes(whole_reward),
                         "param_diff": max_param_diff(reward, whole_reward),
                         "buffer_mismatches": buffer_mismatches(reward, whole_reward)}
    reward = create_frozen_engine(config, reward, zero_stage=3)
    with torch.no_grad():
        scores = reward(input_ids=sequences, attention_mask=attention_mask).float()
    results["reward"].update(scores_diff=(scores - expected_scores).abs().max().item(),
                             score_scale=expected_scores.abs().max().item())

    # PPO's critic, built by the stage's own code from the reward model: the bytes it holds as it
    # reaches its engine factory.
    import pipeline.rl.models as rl_models
    import stages.ppo as ppo

    def held_when_wrapped(ppo_config, model, total_steps):
        results["critic"] = {"held": all_ranks(held_bytes(model)), "whole": whole_bytes(whole_reward),
                             "param_diff": max_param_diff(model, whole_reward),
                             "buffer_mismatches": buffer_mismatches(model, whole_reward)}
        return create_engine(ppo_config, model, total_steps)

    rl_models.create_engine = held_when_wrapped
    ppo_config = ppo.PpoConfig(output_dir=config.output_dir, model=config.model, data=DataConfig(path="unused",
                               format="prompt"), optim=config.optim, engine=config.engine,
                               ppo=ppo.PpoSection(reward_model_path=reward_dir, critic_init="reward"))
    rl_models.build_critic(ppo_config, "reward", reward_dir, None, total_steps=1)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
