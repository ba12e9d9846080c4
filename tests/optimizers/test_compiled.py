"""The torch.compile'd update ("compiled") against the plain reference path."""
import pytest
import torch

from optimizers import Adam_mini
from optimizers.compiled import compiled_update
from optimizers.partition import BlockLayout
from tests.optimizers.test_adam_mini import GQA, HYPER, _shard_items, max_delta, train
from tests.tiny_models import tiny_llama


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
def test_compiled_equals_reference_over_training(dtype, tolerance):
    models = {path: tiny_llama(dtype=dtype) for path in ("reference", "compiled")}
    for path, model in models.items():
        optimizer = Adam_mini(model.named_parameters(), **HYPER, **GQA, implementation=path)
        train(model, optimizer, 5)
        for group in optimizer.param_groups:
            group["lr"] = HYPER["lr"] / 2  # a schedule's change must not need a new graph
        train(model, optimizer, 5, seed=1)
    assert max_delta(models["compiled"], tiny_llama(dtype=dtype)) > 1e-2  # it really trained
    assert max_delta(models["compiled"], models["reference"]) <= tolerance


@pytest.mark.parametrize("cuts", [[13], [13, 27, 58], [3, 5]], ids=["one-cut", "three-cuts", "inside-one-block"])
def test_compiled_on_cut_blocks_in_float64(cuts):
    layout = BlockLayout("w", (7, 10), "row", 10, True)
    generator = torch.Generator().manual_seed(0)
    param0 = torch.randn(70, dtype=torch.float64, generator=generator)
    grad = torch.randn(70, dtype=torch.float64, generator=generator)
    results = {}
    for path in ("reference", "compiled"):
        optimizer = Adam_mini([("mlp.weight", torch.nn.Parameter(param0.view(7, 10).clone()))], implementation=path)
        param = param0.clone()
        for item in _shard_items(optimizer, layout, param, grad, cuts):
            if path == "reference":
                optimizer._reference_update(item)
            else:
                compiled_update(item, optimizer._hyper(item), list(optimizer._segments(item)))
        results[path] = param
    assert (results["compiled"] - results["reference"]).abs().max().item() <= 1e-14


def test_compiled_with_a_shared_group():
    models = {path: tiny_llama(dtype=torch.float64) for path in ("reference", "compiled")}
    for path, model in models.items():
        train(model, Adam_mini(model.named_parameters(), **HYPER, **GQA, implementation=path, shared_groups=True), 3)
    assert max_delta(models["compiled"], models["reference"]) <= 1e-12
