"""Runs stage commands one after another in the same DeepSpeed ranks, each exactly as
`python -m MODULE ARGS` runs it (its entry point, argument parsing, seeding and exit code): one
launch for many runs, where each launch costs every rank an interpreter start and its imports.

    <2 ranks> tests/stages/stage_sequence_worker.py --out F --run "stages.sft --config C output_dir=D" [--run ...]

Rank 0 writes, per run in order, its exit code and the step it resumed from (null: from step 0).
"""
import gc
import logging
import re
import shlex

from pipeline.engine import init_distributed
from pipeline.run import run_as_main
from tests.rank_tools import worker_parser, write_results


class ResumedFrom(logging.Handler):
    """Catches the run directory's "resumed from <checkpoint> (step N)" record."""

    def __init__(self):
        super().__init__()
        self.step = None

    def emit(self, record):
        match = re.fullmatch(r"resumed from \S+ \(step (\d+)\)", record.getMessage())
        if match:
            self.step = int(match.group(1))


def run_command(command: str) -> dict:
    module, *argv = shlex.split(command)
    handler, logger = ResumedFrom(), logging.getLogger("pipeline.rundir")
    logger.addHandler(handler)
    try:
        code = run_as_main(module, argv)
    finally:
        logger.removeHandler(handler)
    gc.collect()  # the finished run's engines go before the next run builds its own
    return {"command": command, "exit": code, "resumed_from": handler.step}


def main():
    parser = worker_parser()
    parser.add_argument("--run", action="append", required=True, help="MODULE ARGS, as after `python -m`")
    args = parser.parse_args()
    init_distributed()
    write_results(args.out, {"runs": [run_command(command) for command in args.run]})


if __name__ == "__main__":
    main()
