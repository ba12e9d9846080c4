"""Collectives and wall time per `engine.step()`: Adam-mini's param groups next to AdamW's.

Runs itself on 2 DeepSpeed CPU ranks (gloo). For each ZeRO stage it builds a fresh engine per
optimizer: AdamW with the decay / no-decay groups the stages use, Adam-mini with one group per
parameter (the official design), and Adam-mini with `shared_groups=True`. Only
`engine.step()` is timed and counted (gradient norm, clipping, the update, ZeRO's all-gather);
the first steps, which gather the shared group's fragment table once, are left out.

    python -m benchmarks.optimizer_collectives [--steps 10] [--warmup 2] [--zero 1,2,3] [--hidden 256]
        [--layers 2] [--json PATH]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
# torch.distributed entry points DeepSpeed and Adam-mini call; nested calls (all_gather_object
# runs all_gather inside) count once.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_gather_object",
               "all_reduce_coalesced", "all_to_all_single", "barrier")


class CollectiveCounter:
    """Counts torch.distributed collectives while `active`; install before init_distributed so
    that the functions DeepSpeed's backend caches are the counting ones."""

    def __init__(self):
        self.counts = collections.Counter()
        self.active = False
        self._depth = 0

    def install(self) -> "CollectiveCounter":
        from torch.distributed import distributed_c10d
        for name in COLLECTIVES:
            original = getattr(distributed_c10d, name, None)
            if original is None:
                continue
            wrapper = self._wrap(name, original)
            for module in (torch.distributed, distributed_c10d):
                if getattr(module, name, None) is original:
                    setattr(module, name, wrapper)
        return self

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.active and self._depth == 0:
                self.counts[name] += 1
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def total(self) -> int:
        return sum(self.counts.values())


def ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9, "zero_optimization": {"stage": stage}}


def build_model(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=heads, max_position_embeddings=128))


def build_optimizer(kind: str, model):
    from optimizers import Adam_mini, applies_weight_decay
    hyper = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if kind == "AdamW":
        decay = [p for n, p in model.named_parameters() if applies_weight_decay(n)]
        no_decay = [p for n, p in model.named_parameters() if not applies_weight_decay(n)]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=hyper["lr"], betas=hyper["betas"])
    return Adam_mini.from_model(model, **hyper, shared_groups=kind == "Adam-mini, shared group")


def measure(kind: str, stage: int, args, counter: CollectiveCounter) -> dict:
    import deepspeed
    model = build_model(args.hidden, args.layers)
    optimizer = build_optimizer(kind, model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    rank = torch.distributed.get_rank()
    generator = torch.Generator().manual_seed(rank)
    seconds, counts = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, 512, (2, 64), generator=generator)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        torch.distributed.barrier()  # time the step, not the ranks' skew before it
        counter.counts.clear()
        counter.active = True
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        counter.active = False
        if step >= args.warmup:
            seconds.append(elapsed)
            counts.append(counter.total())
    return {"optimizer": kind, "zero": stage, "param_groups": len(optimizer.param_groups),
            "collectives": max(counts), "step_ms": statistics.median(seconds) * 1e3}


def worker(args) -> None:
    counter = CollectiveCounter().install()
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    rows = []
    for stage in args.zero:
        for kind in ("AdamW", "Adam-mini, group per parameter", "Adam-mini, shared group"):
            rows.append(measure(kind, stage, args, counter))
    if torch.distributed.get_rank() == 0:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def print_table(rows: list) -> None:
    adamw = {row["zero"]: row for row in rows if row["optimizer"] == "AdamW"}
    header = ("ZeRO", "optimizer", "groups", "collectives", "x AdamW", "step ms", "x AdamW")
    lines = [(str(r["zero"]), r["optimizer"], str(r["param_groups"]), str(r["collectives"]),
              f"{r['collectives'] / adamw[r['zero']]['collectives']:.2f}", f"{r['step_ms']:.1f}",
              f"{r['step_ms'] / adamw[r['zero']]['step_ms']:.2f}") for r in rows]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    for line in [header] + lines:
        print("  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--zero", default="1,2,3", type=lambda text: [int(s) for s in text.split(",")])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(args.json or Path(tmp) / "rows.json")
        forwarded = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--zero", ",".join(map(str, args.zero)),
                     "--hidden", str(args.hidden), "--layers", str(args.layers)]
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(WORLD_SIZE),
                   "--master_port", str(free_port()), str(Path(__file__).resolve()), *forwarded,
                   "--json", str(rows_path.resolve())]
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            print((result.stdout + result.stderr)[-4000:])
            sys.exit(result.returncode)
        print(f"{WORLD_SIZE} CPU ranks (gloo), Llama hidden {args.hidden}, {args.layers} layers; "
              f"median of {args.steps} steps after {args.warmup}")
        print_table(json.loads(rows_path.read_text()))


if __name__ == "__main__":
    main()
