"""Writes the comparison task's synthetic data (see pipeline/compare_task.py) and prints its gold-reward statistics.

    python scripts/make_compare_data.py --out data/compare --seed 0

The files are reproducible: the same seed and sizes give byte-identical files, and
tests/pipeline/test_compare_task.py checks that the shipped data/compare matches a fresh run.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from pipeline.compare_task import data_stats, write_compare_data  # noqa: E402
from scripts.make_demo_data import main as task_data_main  # noqa: E402


def main(argv=None) -> None:
    task_data_main(argv, write=write_compare_data, stats=data_stats, default_out="data/compare",
                   description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
