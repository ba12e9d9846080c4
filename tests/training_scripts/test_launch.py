"""training_scripts/launch.sh: jobs started at once on one machine get their own master port."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, free_port, rank_env

LAUNCH = REPO_ROOT / "training_scripts" / "launch.sh"
WORKER = "tests.training_scripts.rendezvous_worker"


def launch_env(**extra) -> dict:
    env = dict(rank_env(), PYTHON=sys.executable, NUM_GPUS="2", **extra)
    for name in ("HOSTFILE", "MASTER_PORT"):
        if name not in extra:
            env.pop(name, None)
    return env


@pytest.mark.slow
def test_two_jobs_started_at_once_do_not_collide(tmp_path):
    """Each job's ranks meet and then wait until the other job's have met, so both hold a port at once;
    on one shared port the second job's rank 0 could not bind it (EADDRINUSE)."""
    outs = [tmp_path / "job0.json", tmp_path / "job1.json"]
    jobs = [subprocess.Popen(["bash", str(LAUNCH), WORKER, str(out)], env=launch_env(RENDEZVOUS_PEER=str(peer)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for out, peer in zip(outs, reversed(outs))]
    logs = [job.communicate(timeout=300)[0] for job in jobs]
    for job, log in zip(jobs, logs):
        assert job.returncode == 0, log[-4000:]
    results = [json.loads(out.read_text()) for out in outs]
    assert all(result["sum"] == 3.0 and result["peer_met"] for result in results)  # ranks 1 + 2, overlapping
    assert results[0]["port"] != results[1]["port"]


@pytest.mark.slow
def test_master_port_is_honoured_when_set(tmp_path):
    port = free_port()
    out = tmp_path / "job.json"
    result = subprocess.run(["bash", str(LAUNCH), WORKER, str(out)], env=launch_env(MASTER_PORT=str(port)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert json.loads(out.read_text())["port"] == port


@pytest.mark.parametrize("port", ["abc", "0", "70000", "29500;touch x", "123456789012345678901"])
def test_a_master_port_that_is_not_a_port_is_refused(port):
    result = subprocess.run(["bash", str(LAUNCH), WORKER, "out.json"], env=launch_env(MASTER_PORT=port),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"MASTER_PORT is '{port}'" in result.stderr
