"""Compiles, once, what a run would otherwise build on first use, so the first stage starts in seconds.

    python -m pipeline.prebuild [--cpu-ranks]

Adam-mini's CPU kernel (optimizers/kernels, ~1 s) and, with --cpu-ranks, DeepSpeed's shared-memory
collectives for ranks on the CPU (`deepspeed_shm_comm`, ~30 s of C++), which DeepSpeed otherwise
builds when the first CPU stage initialises its process group. Both are cached under ~/.cache
(ADAM_MINI_KERNEL_CACHE, TORCH_EXTENSIONS_DIR) and rebuilt only when their sources or the compiler
flags change.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.prebuild", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-ranks", action="store_true", help="also build DeepSpeed's CPU collectives")
    args = parser.parse_args(argv)
    from optimizers import kernels

    start = time.perf_counter()
    built = kernels.load() is not None
    print(f"Adam-mini CPU kernel: {'ready' if built else 'not built (no C compiler); the foreach path is used'} "
          f"({time.perf_counter() - start:.1f} s)")
    if args.cpu_ranks:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.accelerator import get_accelerator

        start = time.perf_counter()
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not builder.is_compatible():
            print("DeepSpeed CPU collectives: not available here; ranks use gloo alone")
        else:
            builder.load(verbose=False)
            print(f"DeepSpeed CPU collectives: ready ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
