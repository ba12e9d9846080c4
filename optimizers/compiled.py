"""Adam-mini's update as one `torch.compile`d function: C++/OpenMP on CPU, Triton on GPU.

The whole blocks of a presented tensor are viewed as (blocks, block_numel) and updated by one
compiled function: Inductor fuses the moment update, the per-block mean square, the
denominator and the parameter write into loops over memory, so no temporary the size of the
tensor is made. Hyperparameters go in as 0-dim tensors, so a changing learning rate or bias
correction never recompiles; shapes are dynamic. The one or two blocks cut by a shard boundary
(their squared sum comes from the cross-rank all-reduce) take a few eager ops.
"""
from __future__ import annotations

import functools
import math
import types

import torch


def _whole_blocks(param, grad, exp_avg, block_sq_avg, beta1, beta2, step_size, decay, bias_correction2_sqrt, eps):
    """In place. param, grad, exp_avg: (blocks, block_numel); block_sq_avg: (blocks,); the rest 0-dim.

    The arithmetic is in block_sq_avg's dtype (fp32 for bf16/fp16 parameters, like the scalars);
    exp_avg and the parameter are rounded once each to their own dtype, and the step uses the moment
    before its rounding.
    """
    compute = block_sq_avg.dtype
    g = grad.to(compute)
    momentum = exp_avg.to(compute).lerp(g, 1 - beta1)
    exp_avg.copy_(momentum)
    block_sq_avg.mul_(beta2).add_((1 - beta2) * g.square().mean(dim=1))
    denom = block_sq_avg.sqrt() / bias_correction2_sqrt + eps
    param.copy_(param.to(compute) * decay - step_size * (momentum / denom.unsqueeze(1)))


@functools.cache
def _compiled(dtype: torch.dtype, device_type: str):
    """The compiled function for one dtype and device type. Each gets a code object of its own:
    Dynamo keeps graphs, and its limit of 8 recompiles, per code object, and the 0/1 size
    specialisations already take three graphs per dtype."""
    code = _whole_blocks.__code__.replace(co_name=f"_whole_blocks_{str(dtype).split('.')[-1]}_{device_type}")
    function = types.FunctionType(code, _whole_blocks.__globals__, code.co_name)
    return torch.compile(function, dynamic=True, fullgraph=True)


def _scalars(item, hyper: dict) -> tuple:
    """The 0-dim hyperparameter tensors of one update, in the block statistics' dtype (fp32 for
    bf16/fp16 parameters: in bf16, beta2 = 0.999 is 1.0; in fp16, eps = 1e-8 is 0)."""
    statistics = item.state["block_sq_avg"]
    values = (hyper["beta1"], hyper["beta2"], hyper["lr"] / hyper["bias_correction1"],
              1 - hyper["lr"] * hyper["weight_decay"], hyper["bias_correction2_sqrt"], hyper["eps"])
    return tuple(torch.tensor(value, dtype=statistics.dtype, device=statistics.device) for value in values)


def compiled_update(item, hyper: dict, segments) -> None:
    """Updates one uniform-block piece (see adam_mini._Work) in place.

    `segments` is adam_mini.Adam_mini._segments(item): the held elements split into a cut first
    block, whole blocks and a cut last block.
    """
    beta1, beta2, step_size, decay, bias_correction2_sqrt, eps = scalars = _scalars(item, hyper)
    block_numel = item.layout.block_numel
    exp_avg, block_sq_avg = item.state["exp_avg"].view(-1), item.state["block_sq_avg"]
    last_block = block_sq_avg.numel() - 1
    for kind, (lo, hi), (first, last) in segments:
        p, g, m = item.param[lo:hi], item.grad[lo:hi], exp_avg[lo:hi]
        if kind == "body":
            rows = last - first
            # detach(): the same memory without the view's link to its base, which Dynamo would
            # otherwise guard on (one graph per base size).
            _compiled(p.dtype, p.device.type)(p.view(rows, -1).detach(), g.view(rows, -1).detach(), m.view(rows, -1).detach(),
                        block_sq_avg[first:last].detach(), *scalars)
            continue
        override = item.first_sq if first == 0 else math.nan
        if first == last_block and not math.isnan(item.last_sq):
            override = item.last_sq
        compute = block_sq_avg.dtype
        g = g.to(compute)
        block_sq = g.square().sum() if math.isnan(override) else torch.tensor(override, dtype=compute,
                                                                               device=g.device)
        momentum = m.to(compute).lerp(g, 1 - hyper["beta1"])
        m.copy_(momentum)
        v = block_sq_avg[first:last]
        v.mul_(beta2).add_((1 - beta2) * block_sq / block_numel)
        denom = v.sqrt() / bias_correction2_sqrt + eps
        p.copy_(p.to(compute) * decay - step_size * (momentum / denom))
