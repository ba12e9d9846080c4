"""A 2-rank job started by training_scripts/launch.sh: the ranks meet on the launcher's master port
and keep it until the other job's ranks have met too, so two jobs provably hold their ports at once.

    --config OUT: rank 0 writes {"port", "sum"} there, and OUT.ready once its ranks have met;
    RENDEZVOUS_PEER: the other job's OUT (waited for, up to 120 s).
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--local_rank", type=int, default=0)
out = Path(parser.parse_args().config)
dist.init_process_group("gloo")  # env:// from the launcher: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
if dist.get_rank() == 0:
    Path(f"{out}.ready").write_text("")
    peer = os.environ.get("RENDEZVOUS_PEER")
    deadline = time.monotonic() + 120
    while peer and not Path(f"{peer}.ready").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    out.write_text(json.dumps({"port": int(os.environ["MASTER_PORT"]), "sum": total.item(),
                               "peer_met": bool(peer) and Path(f"{peer}.ready").exists()}))
dist.barrier()
dist.destroy_process_group()
