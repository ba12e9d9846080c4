"""Adam-mini on bf16 and fp16 parameters (a plain loop, or TRL / transformers.Trainer on low-precision
weights): every implementation against the reference path run in float64 on the same weights and
gradients, within the rounding of the parameter's own dtype; and the compiled path's graph count."""
import pytest
import torch

from optimizers import Adam_mini
from tests.optimizers.test_adam_mini import GQA, HYPER
from tests.tiny_models import tiny_llama

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def gradients(model, steps, dtype, seed=0):
    """Per step, {name: gradient} of the parameter's shape in `dtype`, the same for every run."""
    generator = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(p.shape, generator=generator).mul_(1e-2).to(dtype)
             for name, p in model.named_parameters()} for _ in range(steps)]


def run(model, grads, **optimizer_args):
    optimizer = Adam_mini(model.named_parameters(), **HYPER, **GQA, **optimizer_args)
    params = dict(model.named_parameters())
    for step_grads in grads:
        for name, grad in step_grads.items():
            params[name].grad = grad.to(params[name].dtype)
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def spacings_apart(low, exact, start, dtype) -> float:
    """Largest |low - exact| over all parameters, in units of `dtype`'s relative spacing times the largest
    of |exact|, |start| and lr: the parameter is rounded to `dtype` (a spacing of its value) and so is
    exp_avg (a spacing of a step, which is about lr), once per step each."""
    worst = 0.0
    for (_, a), (_, b), (_, c) in zip(low.named_parameters(), exact.named_parameters(), start.named_parameters()):
        b, c = b.detach(), c.detach()
        scale = torch.maximum(b.abs(), c.abs()).clamp_min(HYPER["lr"])
        worst = max(worst, ((a.detach().double() - b).abs() / (torch.finfo(dtype).eps * scale)).max().item())
    return worst


@pytest.mark.parametrize("implementation", ["reference", "foreach", "compiled"])
@pytest.mark.parametrize("dtype_name", list(LOW_PRECISION))
@pytest.mark.parametrize("steps", [1, 10])
def test_low_precision_parameters_follow_the_float64_reference(implementation, dtype_name, steps):
    dtype = LOW_PRECISION[dtype_name]
    low = tiny_llama(dtype=dtype)
    exact = tiny_llama(dtype=dtype).double()  # the same rounded start
    grads = gradients(low, steps, dtype)
    optimizer = run(low, grads, implementation=implementation)
    run(exact, [{name: g.double() for name, g in step.items()} for step in grads], implementation="reference")
    # The block statistics stay fp32: in bf16, beta2 = 0.95 would round to 0.94921875 and 0.999 to 1.0.
    assert all(state["block_sq_avg"].dtype == torch.float32 for state in optimizer.state.values())
    start = tiny_llama(dtype=dtype).double()
    moved = max((a.detach().double() - b).abs().max().item()
                for (_, a), (_, b) in zip(low.named_parameters(), start.named_parameters()))
    # An Adam-mini step moves a weight by lr times its gradient over its block's RMS gradient (a few lr
    # at most); with beta2 rounded to 1.0 the step divided by eps instead (1e4 measured).
    assert 0.5 * steps * HYPER["lr"] < moved < 10 * steps * HYPER["lr"]
    print(f"{dtype_name} {implementation} {steps} steps: {spacings_apart(low, exact, start, dtype):.2f} spacings")
    # Each step rounds exp_avg and the parameter once (half a spacing each): within `steps` spacings.
    assert spacings_apart(low, exact, start, dtype) <= steps


def test_state_dict_round_trip_keeps_fp32_statistics():
    model = tiny_llama(dtype=torch.bfloat16)
    grads = gradients(model, 2, torch.bfloat16)
    optimizer = run(model, grads[:1], implementation="foreach")
    saved = optimizer.state_dict()
    resumed = Adam_mini(model.named_parameters(), **HYPER, **GQA, implementation="foreach")
    resumed.load_state_dict(saved)  # torch.optim casts state to each parameter's dtype on load
    for state, original in zip(resumed.state.values(), optimizer.state.values()):
        assert state["block_sq_avg"].dtype == torch.float32
        assert torch.equal(state["block_sq_avg"], original["block_sq_avg"])


def test_compiled_takes_three_graphs_per_dtype_and_never_recompiles():
    """README: a model takes three graphs per dtype and device; a learning-rate schedule never
    recompiles. Counted with Dynamo's counters (torch 2.13's `torch._dynamo.utils.counters`: no public
    counter exists; the lock keeps the version)."""
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama(dtype=dtype)
        optimizer = Adam_mini(model.named_parameters(), **HYPER, **GQA, implementation="compiled")
        params = dict(model.named_parameters())
        for step, step_grads in enumerate(gradients(model, 4, dtype)):
            for group in optimizer.param_groups:
                group["lr"] = HYPER["lr"] * (1 - step / 4)  # a decaying schedule
            for name, grad in step_grads.items():
                params[name].grad = grad
            optimizer.step()
    assert counters["stats"]["unique_graphs"] == 3 * 2, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
