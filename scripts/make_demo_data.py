"""Writes the CPU demo's synthetic task data (see pipeline/demo_task.py) and prints its gold-reward statistics.

    python scripts/make_demo_data.py --out data/demo --seed 0

The files are reproducible: the same seed and sizes give byte-identical files, and
tests/pipeline/test_demo_task.py checks that the shipped data/demo matches a fresh run.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from pipeline.demo_task import data_stats, write_demo_data  # noqa: E402


def main(argv=None, write=write_demo_data, stats=data_stats, default_out="data/demo", description=None) -> None:
    """The command line for a task's data writer `write` (this demo's, or another task's with the same
    signature, as scripts/make_compare_data.py runs it) and its statistics `stats`."""
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("--out", default=default_out, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-sft", type=int, default=2000)
    parser.add_argument("--n-pairs", type=int, default=2000)
    parser.add_argument("--n-prompts", type=int, default=500)
    parser.add_argument("--n-eval-prompts", type=int, default=64)
    args = parser.parse_args(argv)
    rows = write(args.out, seed=args.seed, n_sft=args.n_sft, n_pairs=args.n_pairs,
                 n_prompts=args.n_prompts, n_eval_prompts=args.n_eval_prompts)
    print(f"wrote {', '.join(f'{len(v)} {k}' for k, v in rows.items())} and tokenizer/ to {args.out}")
    print(json.dumps({k: round(v, 4) for k, v in stats(rows).items()}, indent=2))


if __name__ == "__main__":
    main()
