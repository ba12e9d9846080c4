"""Fingerprints of the policy stages' results, to show a refactor moved nothing: each of ReMax, RLOO,
GRPO, PPO and DPO runs a few steps on 2 CPU ranks (one launch, tiny models built here, fixed seeds),
and the SHA-256 of every final tensor (PPO's critic too) and every logged metric (timings left out)
are written as JSON. Run it on two commits and compare the files:

    python scripts/stage_fingerprints.py --out before.json     # on the old commit
    python scripts/stage_fingerprints.py --out after.json --compare before.json
"""
import argparse
import hashlib
import json
import shlex
import sys
import tempfile
from pathlib import Path

import yaml
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import launch_ranks, without_timing  # noqa: E402
from tests.tiny_models import write_stage_inputs  # noqa: E402

STEPS = 4
# (stage, ZeRO stage, section overrides): the sampling stages' KL setting under its old key where the
# stage had one (ReMax's `kl_ctl`), so that both the old and the new name are exercised over time.
CASES = [("remax", 2, {}), ("remax", 3, {"temperature": 0.7}), ("rloo", 2, {}),
         ("grpo", 3, {"updates_per_rollout": 2}), ("grpo", 2, {"kl_penalty": "reward", "scale_rewards": False}),
         ("ppo", 2, {}), ("ppo", 3, {"critic_init": "policy", "updates_per_rollout": 1}), ("dpo", 2, {}),
         ("dpo", 3, {"loss_type": "ipo"})]


def stage_config(stage: str, zero_stage: int, overrides: dict, root: Path) -> dict:
    sampling = stage != "dpo"
    config = dict(seed=0, model={"path": str(root / "model")},
                  data={"path": str(root / ("prompts.jsonl" if sampling else "pairs.jsonl")),
                        "format": "prompt" if sampling else "pairwise", "eval_fraction": 0.125,
                        "max_length": 24, "max_prompt_length": 12},
                  optim={"lr": 2e-3, "warmup_steps": 2, "betas": [0.9, 0.95]},
                  engine={"zero_stage": zero_stage, "micro_batch_size": 2},
                  training={"epochs": 4, "max_steps": STEPS, "eval_every_steps": 2},
                  logging={"progress_bar": False, "tensorboard": False}, checkpoint={"every_steps": 2})
    if sampling:
        section = {"reward_model_path": str(root / "reward"), "max_new_tokens": 6, "ref_zero_stage": 3,
                   "reward_zero_stage": 3}
        if stage in ("rloo", "grpo"):
            section["num_samples"] = 2
        if stage == "remax":
            section["kl_ctl"] = 0.1
    else:
        section = {"beta": 0.1, "ref_zero_stage": zero_stage if zero_stage == 3 else 0}
    config[stage] = {**section, **overrides}
    return config


def digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def tensors_digest(directory: Path) -> dict:
    found = {}
    for path in sorted(directory.rglob("*.safetensors")):
        for name, tensor in sorted(load_file(path).items()):
            key = f"{path.relative_to(directory)}:{name}"
            found[key] = hashlib.sha256(tensor.contiguous().view(-1).view(torch_uint8()).numpy().tobytes()).hexdigest()
    return found


def torch_uint8():
    import torch
    return torch.uint8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", help="an earlier --out file: exit 1 when anything differs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_stage_inputs(root)
        runs = []
        for stage, zero, overrides in CASES:
            name = f"{stage}-{zero}-{len(runs)}"
            (root / f"{name}.yaml").write_text(yaml.safe_dump(stage_config(stage, zero, overrides, root)))
            runs.append((name, shlex.join([f"stages.{stage}", "--config", str(root / f"{name}.yaml"),
                                          f"output_dir={root / name}"])))
        launch_ranks(2, ["tests/stages/stage_sequence_worker.py", "--out", root / "runs.json",
                         *[f"--run={command}" for _, command in runs]])
        exits = [run["exit"] for run in json.loads((root / "runs.json").read_text())["runs"]]
        result = {}
        for (name, _), code in zip(runs, exits):
            output = root / name
            rows = without_timing([json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()])
            result[name] = {"exit": code, "metrics": rows, "metrics_sha256": digest(rows),
                            "tensors": tensors_digest(output / "final") if code == 0 else {}}
            if (output / "critic").is_dir():
                result[name]["critic"] = tensors_digest(output / "critic")
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    for name, run in result.items():
        print(f"{name}: exit {run['exit']}, {len(run['metrics'])} metric rows {run['metrics_sha256'][:12]}, "
              f"{len(run['tensors'])} tensors")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [name for name in before if before[name] != result.get(name)]
        print("identical" if not differ else f"DIFFERENT: {differ}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
