"""Helpers for the worker scripts that tests start under real DeepSpeed ranks."""
import argparse
import json

import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from pipeline.run import finish_collectives


def worker_parser() -> argparse.ArgumentParser:
    """The arguments every worker takes: `--out` (where rank 0 writes its results) and the
    `--local_rank` the DeepSpeed launcher passes; a worker adds its own to it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    return parser


def full_fp32_params(engine) -> dict:
    """Every parameter's full fp32 master copy (collective under ZeRO-3: call on all ranks)."""
    params = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        params[name] = (full if full is not None else param).detach().float().clone()
    return params


def max_delta(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in b)


def write_results(path, results: dict) -> None:
    """Rank 0 writes the figures the test asserts on; all ranks wait so none exits early (holding the
    wait's handle, see pipeline.run.finish_collectives), then leave the process group."""
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    finish_collectives()
    dist.destroy_process_group()
