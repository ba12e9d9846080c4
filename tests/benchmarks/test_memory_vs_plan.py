"""The memory plan held to measurement: every stage run in one 2-rank launch, each rank's peak growth of
anonymous resident memory against `pipeline.plan`'s peak for the run's config (benchmarks/memory_vs_plan.py
measures; the plan is only ever the thing compared)."""
import pytest

from benchmarks.memory_vs_plan import (HAS_VLLM, MALLOC_ENV, VLLM_ROLLOUT, WHOLE_LOGITS, build_models, compare,
                                       format_results, logits_drops, narrow_llama_config, stage_values, warmup_runs,
                                       write_data, write_spec)
from tests.conftest import launch_ranks

# ZeRO-3 keeps parameters of at most 1e5 elements whole on every rank. Width 256 with an MLP of 384 puts
# every matrix of a layer under it (65,536 and 98,304 elements): the layers are never partitioned; width 320
# puts every one over it (102,400 and 122,880). A large vocabulary in few layers makes the bytes the plan
# counts (130-400 MiB per rank) dwarf what a run costs beyond them (a few MiB: oneDNN's kernel cache,
# DeepSpeed's hooks on each module), while two steps of each run stay quick.
WIDTHS = {"narrow": 256, "wide": 320}
LAYERS, INTERMEDIATE, VOCAB = 12, 384, 16384
MAX_LENGTH, PROMPT_LENGTH, NEW_TOKENS = 128, 32, 16


def suite_runs(root) -> dict:
    """SFT at ZeRO-2 and 3 with and without gradient checkpointing and with both optimizers, on both widths
    (each pair of the four choices at ZeRO-3 appears once), and packed (`data.packing`); reward; ReMax with the actor at ZeRO-3 (generation
    from gathered weights; frozen models at ZeRO-3 whose narrow layers every rank holds whole); PPO at ZeRO-2
    (a critic beside the actor); SFT at ZeRO-3 again with the whole logits at once. Two steps each: ZeRO-3 keeps
    weights gathered only once a step has been traced."""
    models = {}
    for name, width in WIDTHS.items():
        (root / name).mkdir()
        models[name] = build_models(root / name, narrow_llama_config(
            hidden_size=width, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, vocab_size=VOCAB,
            num_attention_heads=width // 64, num_key_value_heads=width // 64, max_position_embeddings=256))[:2]
    data = write_data(root, MAX_LENGTH, PROMPT_LENGTH)

    def run(stage, width, **options):
        values = stage_values(stage, *models[width], data, steps=2, max_length=MAX_LENGTH,
                              max_prompt_length=PROMPT_LENGTH, new_tokens=NEW_TOKENS, **options)
        return stage, values

    return {
        "sft ZeRO-2 Adam-mini narrow": run("sft", "narrow", zero=2, optimizer="adam_mini"),
        "sft ZeRO-2 AdamW wide checkpointing": run("sft", "wide", zero=2, optimizer="adamw", checkpointing=True),
        "sft ZeRO-3 Adam-mini narrow": run("sft", "narrow", zero=3, optimizer="adam_mini"),
        "sft ZeRO-3 Adam-mini narrow" + WHOLE_LOGITS: run("sft", "narrow", zero=3, optimizer="adam_mini",
                                                          logits_chunk=0),
        "sft ZeRO-3 AdamW narrow checkpointing": run("sft", "narrow", zero=3, optimizer="adamw", checkpointing=True),
        "sft ZeRO-3 Adam-mini wide checkpointing": run("sft", "wide", zero=3, optimizer="adam_mini",
                                                       checkpointing=True),
        "sft ZeRO-3 AdamW wide": run("sft", "wide", zero=3, optimizer="adamw"),
        "sft ZeRO-2 Adam-mini narrow packed": run("sft", "narrow", zero=2, optimizer="adam_mini", micro_batch=1,
                                                  packing_tokens=2 * MAX_LENGTH),
        "reward ZeRO-3 Adam-mini narrow": run("reward", "narrow", zero=3, optimizer="adam_mini", micro_batch=1),
        "remax ZeRO-3 Adam-mini narrow checkpointing": run("remax", "narrow", zero=3, optimizer="adam_mini",
                                                           checkpointing=True),
        "ppo ZeRO-2 AdamW wide checkpointing": run("ppo", "wide", zero=2, optimizer="adamw", checkpointing=True),
        # Where vLLM is installed (CI): ReMax with its rollouts from a vLLM engine per rank.
        **({"remax ZeRO-2 Adam-mini narrow vLLM": run("remax", "narrow", zero=2, optimizer="adam_mini",
                                                       rollout=VLLM_ROLLOUT)} if HAS_VLLM else {}),
    }


@pytest.mark.slow
def test_measured_peaks_are_within_a_fifth_of_the_plan(tmp_path, monkeypatch):
    """Every rank of every run peaks at 0.8-1.2 times the plan (measured 1.02-1.15 on 2 CPU ranks; the
    plan before it counted what ZeRO-3 holds whole, gathered and in its bucket gave 1.40 for ReMax at ZeRO-3),
    the runs' log-probabilities chunked (64 tokens of logits at a time) and one SFT run again with the whole
    logits, to see the drop."""
    runs = suite_runs(tmp_path)
    spec = write_spec(tmp_path, runs, warmup_runs(tmp_path))
    for name, value in MALLOC_ENV.items():  # freed blocks go back to the kernel: RssAnon follows live tensors
        monkeypatch.setenv(name, value)
    launch_ranks(2, ["--module", "benchmarks.memory_vs_plan", "--rank-run", spec, tmp_path / "measured"], timeout=600)
    results = compare(spec, tmp_path / "measured", 2)
    print(format_results(results))
    assert len(results) == 2 * len(runs) and all(result["exit"] == 0 for result in results), format_results(results)
    outside = [result for result in results if not 0.8 <= result["ratio"] <= 1.2]
    assert not outside, f"outside 0.8-1.2 of the plan:\n{format_results(outside)}"
    # The chunked logits lower each rank's peak below the whole logits' run. By less than planned (measured 14-21
    # MiB of 28): the chunked run's peak moves to the gradient reduction, which the plan puts 10-15% low here as
    # on the other narrow runs, while the whole-logits run's peak is its forward/backward, planned within 5%.
    drops = logits_drops(results)
    assert len(drops) == 2 and all(d["measured_drop_bytes"] >= 0.25 * d["plan_drop_bytes"] > 0 for d in drops), drops
