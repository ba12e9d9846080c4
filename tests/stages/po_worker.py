"""Runs several policy-optimisation stages one after another in one DeepSpeed launch (one process
group), so the tests pay the launch once: `po_worker.py MODULE CONFIG [MODULE CONFIG ...]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.run import main  # noqa: E402
from pipeline.stages import STAGES  # noqa: E402

SPECS = {spec.module: spec for spec in STAGES.values()}

if __name__ == "__main__":
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    for module_name, config in zip(args[::2], args[1::2]):
        spec = SPECS[module_name]
        code = main(spec.run, spec.config_class, ["--config", config])
        if code:
            sys.exit(code)
