"""benchmarks/rollout_speed: its arithmetic on hand-made passes and runs (tokens/s medians without the
warm-up pass, vLLM / HF, the seed comparison, a run's summary), and that a fixed-length rollout really runs
every response to the token budget where the plain engine would stop at eos; with vLLM (slow), both
engines of one worker get the same prompts and budgets and return responses of exactly that length."""
import importlib.util
import json
import math

import pytest
import torch

from benchmarks.rollout_speed import (IdTokenizer, UnshardedActor, check_lengths, end_to_end_rows,
                                      generation_rows, generation_worker, rate_summary, rollout_classes,
                                      run_summary)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
EOS = 7


def passes(*runs):
    return [{"seconds": seconds, "new_tokens": tokens, "responses": responses} for seconds, tokens, responses in runs]


def test_rates_leave_out_the_warm_up_pass_and_the_ratio_divides_the_medians():
    hf = passes((100.0, 10, [[1], [2]]), (2.0, 100, [[1], [2]]), (4.0, 100, [[1], [2]]), (5.0, 100, [[1], [2]]))
    vllm = passes((50.0, 10, []), (1.0, 100, []), (2.0, 100, []), (1.0, 120, [[1], [3]]))
    # Rates after the first pass: HF 50, 25, 20 tokens/s; vLLM 100, 50, 120.
    summary = rate_summary(hf)
    assert (summary["tokens_per_s"], summary["min"], summary["max"], summary["repeats"]) == (25.0, 20.0, 50.0, 3)
    assert summary["warmup_s"] == 100.0 and summary["new_tokens"] == 100
    [greedy] = generation_rows({"passes": {"greedy": {"hf": hf, "vllm": vllm}}}, "m")
    assert greedy["vllm"]["tokens_per_s"] == 100.0 and greedy["ratio"] == pytest.approx(4.0)
    assert greedy["greedy_equal"] == 0.5  # the last passes' responses: [1] equal, [2] vs [3] not
    [sampled] = generation_rows({"passes": {"sampled": {"hf": hf, "vllm": vllm}}}, "m")
    assert "greedy_equal" not in sampled


def test_a_runs_summary_is_its_median_step_and_its_last_evaluation():
    rows = [{"step": 0, "eval/gold_reward": 0.1, "eval/reward": -3.0},
            {"step": 1, "step_time": 3.0}, {"step": 2, "step_time": 1.0}, {"step": 3, "step_time": 2.5},
            {"step": 3, "eval/gold_reward": 0.6, "eval/reward": 7.0}, {"step": 2, "eval/gold_reward": 0.4,
                                                                       "eval/reward": 5.0}]
    assert run_summary(rows) == {"steps": 3, "step_time": 2.5, "train_s": 6.5, "gold_reward": 0.6, "eval_reward": 7.0,
                                 "eval_step": 3}
    with pytest.raises(ValueError, match="0 logged steps"):
        run_summary(rows[:1])


def test_end_to_end_rows_give_mean_and_std_per_engine_and_the_step_time_ratio():
    runs = [{"stage": "remax", "engine": engine, "seed": seed, "steps": 60, "step_time": step, "train_s": 60 * step,
             "wall_s": 100.0, "gold_reward": gold}
            for engine, steps, golds in (("hf", (1.0, 2.0, 3.0), (0.5, 0.52, 0.54)),
                                         ("vllm", (0.5, 1.0, 1.5), (0.53, 0.55, 0.57)))
            for seed, step, gold in zip(range(3), steps, golds)]
    runs.append({"stage": "remax", "engine": "vllm", "seed": 3, "failed": "exit code 1"})
    hf, vllm = end_to_end_rows(runs)
    assert hf["step_time"] == (2.0, 1.0) and vllm["step_time"] == (1.0, 0.5) and vllm["seeds"] == [0, 1, 2]
    assert vllm["step_time_ratio"] == 0.5 and "step_time_ratio" not in hf and vllm["train_s"] == (60.0, 30.0)
    assert vllm["gold_reward"][0] == pytest.approx(0.55) and vllm["gold_vs_hf"]["within_noise"]


def uniform_llama(vocab: int = 8):
    """A tiny Llama whose every next-token distribution is uniform (final norm zeroed: all logits 0), so
    its eos comes up one time in `vocab`. Heads of 32: vLLM's CPU attention has no kernel for 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                         eos_token_id=EOS, pad_token_id=None, bos_token_id=None))
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model.eval()


def test_fixed_length_rollouts_run_every_response_to_the_budget_where_plain_ones_stop_at_eos():
    from pipeline.rl.rollout import Sampling

    actor, tokenizer = UnshardedActor(uniform_llama()), IdTokenizer(eos_token_id=EOS, pad_token_id=0)
    batch = {"input_ids": torch.randint(0, EOS, (8, 4), generator=torch.Generator().manual_seed(0))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    hf, _ = rollout_classes()
    torch.manual_seed(0)
    [short] = hf(actor, tokenizer).generate(batch, [Sampling(16)])
    torch.manual_seed(0)
    [full] = hf(actor, tokenizer).generate(batch, [Sampling(16, min_new_tokens=16)])
    # The control: with eos at 1 in 8 per token, 8 rows of 16 tokens would all run on with p = (7/8)^128.
    assert short.mask.sum(-1).min() < 16
    assert full.mask.shape == (8, 16) and full.mask.sum(-1).tolist() == [16] * 8
    assert not (full.sequences[:, 4:] == EOS).any()
    result = {"kind": "random", "budgets": {"fixed_length": True, "max_new_tokens": {"sampled": 16}},
              "passes": {"sampled": {"hf": passes((1.0, 128, [[1] * 16] * 8)),
                                     "vllm": passes((1.0, 127, [[1] * 16] * 7 + [[1] * 15]))}}}
    assert check_lengths(result) == ["random sampled vllm: response lengths [15, 16], not 16"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (bash scripts/setup.sh --vllm)")
def test_a_worker_gives_both_engines_the_same_prompts_and_budget_and_both_fill_it(tmp_path):
    model_dir = tmp_path / "model"
    uniform_llama(vocab=64).save_pretrained(model_dir)
    spec = {"kind": "random", "model": str(model_dir), "threads": 1, "repeats": 1, "batch": 3, "new_tokens": 8,
            "kv_cache_gib": 0.05}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    generation_worker(str(tmp_path / "spec.json"), str(tmp_path / "out.json"))
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["budgets"] == {"prompts": 3, "prompt_tokens": 3 * 32, "max_new_tokens": {"sampled": 8},
                                 "fixed_length": True}
    assert check_lengths(result) == []
    for engine in ("hf", "vllm"):
        runs = result["passes"]["sampled"][engine]
        assert len(runs) == 2 and all(run["new_tokens"] == 3 * 8 and run["seconds"] > 0 for run in runs)
        assert all(math.isfinite(run["seconds"]) for run in runs)
