"""Adam-mini with one shared param group under real DeepSpeed CPU ranks (shared_groups_worker.py):
exact against the unsharded optimizer with one group per parameter, at ZeRO 0-3 on 2 and 3 ranks,
with blocks cut by shard boundaries, offload and bf16; checkpoints; DeepSpeed's collectives."""
import pytest
import torch

from optimizers import Adam_mini
from tests.conftest import launch_ranks, read_json
from tests.optimizers.test_zero import BF16_MAX, BF16_RELATIVE, EXACT
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.slow

FP32_CASES = ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "zero2_foreach", "zero3_foreach",
              "zero1_reference", "zero3_sub_groups"]


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def results(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"shared{request.param}")
    launch_ranks(request.param, ["tests/optimizers/shared_groups_worker.py", "--out", out / "results.json",
                                 "--checkpoint-dir", out / "checkpoints"])
    return read_json(out / "results.json")


@pytest.mark.parametrize("case", FP32_CASES)
def test_shared_group_matches_unsharded_step_for_step(results, case):
    outcome = results[case]
    assert "error" not in outcome, outcome.get("error")
    assert outcome["param_groups"] == 1
    assert len(outcome["max_delta_per_step"]) == 10
    assert max(outcome["max_delta_per_step"]) <= EXACT
    if case != "zero0":
        assert outcome["cut_blocks"] >= 1  # a shard boundary really falls inside a block
    if case == "zero3_sub_groups":
        assert outcome["flat_partitions"] >= 2  # DeepSpeed really stepped several sub-groups


def test_shared_group_bf16_follows_fp32(results):
    outcome = results["zero2_bf16"]
    assert "error" not in outcome, outcome.get("error")
    assert outcome["relative_error"] <= BF16_RELATIVE
    assert max(outcome["max_delta_per_step"]) <= BF16_MAX


@pytest.mark.parametrize("stage", [2, 3])
def test_shared_group_checkpoint_resumes_bitwise(results, stage):
    assert results[f"resume_zero{stage}"]["resume_max_delta"] == 0.0


def test_collectives_per_step_at_most_adamw_plus_one(results):
    counts = results["collectives"]
    for stage in (2, 3):
        assert counts[f"shared_zero{stage}"] <= counts[f"adamw_zero{stage}"] + 1, counts


def test_misplaced_mapping_is_refused(results):
    # DeepSpeed 0.19.8 maps round_robin_gradients wrongly: refuse rather than update other weights.
    assert "round_robin_gradients" in results["zero2_round_robin"]["error"]
    assert "does not point at its master weights" in results["zero2_round_robin"]["error"]


def test_shared_group_without_deepspeed_equals_per_parameter_groups():
    models = {shared: tiny_llama() for shared in (False, True)}
    for shared, model in models.items():
        optimizer = Adam_mini(model.named_parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, dim=96,
                              n_heads=3, n_kv_heads=1, shared_groups=shared)
        generator = torch.Generator().manual_seed(0)
        for _ in range(5):
            ids = torch.randint(0, 203, (4, 12), generator=generator)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert len(optimizer.param_groups) == (1 if shared else len(list(model.parameters())))
    per_parameter = dict(models[False].named_parameters())
    assert max((p - per_parameter[n]).abs().max().item() for n, p in models[True].named_parameters()) == 0.0
