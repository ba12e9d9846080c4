"""prepare_dataset on every rank, called before the process group exists as the stages call it.

Launched by test_data_cache.py; each rank writes whether it tokenised and what it got to --out.
"""
import argparse
import hashlib
import json
from pathlib import Path

from transformers import AutoTokenizer

from pipeline.config import DataConfig
from pipeline.data import prepare_dataset
from pipeline.engine import init_distributed

parser = argparse.ArgumentParser()
for name in ("--tokenizer", "--data", "--cache-dir", "--out"):
    parser.add_argument(name, required=True)
parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher's
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
config = DataConfig(path=args.data, split="train_sft", eval_split="test_sft", format="sft", chat_template="chatml",
                    cache_dir=args.cache_dir)
train, test, report = prepare_dataset(config, tokenizer, seed=0)
init_distributed()  # after the data, as in the stages: the file lock alone keeps the ranks in step
import torch.distributed as dist  # noqa: E402
rows = json.dumps([train[i] for i in range(len(train))] + [test[i] for i in range(len(test))])
result = {"tokenised": not report.from_cache, "eval_tokenised": not report.eval_report.from_cache,
          "rows": hashlib.sha256(rows.encode()).hexdigest(), "kept": report.kept_rows}
Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result), encoding="utf-8")
