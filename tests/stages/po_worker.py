"""Runs several policy-optimisation stages one after another in one DeepSpeed launch (one process
group), so the tests pay the launch once: `po_worker.py MODULE CONFIG [MODULE CONFIG ...]`."""
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.run import main  # noqa: E402

CONFIG_CLASSES = {"stages.rloo": "RlooConfig", "stages.grpo": "GrpoConfig", "stages.remax": "RemaxConfig",
                  "stages.ppo": "PpoConfig"}

if __name__ == "__main__":
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    for module_name, config in zip(args[::2], args[1::2]):
        module = importlib.import_module(module_name)
        code = main(module.run, getattr(module, CONFIG_CLASSES[module_name]), ["--config", config])
        if code:
            sys.exit(code)
