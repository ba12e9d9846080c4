"""A free TCP port for a job's rendezvous (DeepSpeed's master port, torch's TCPStore), and the
shared-memory files DeepSpeed's CPU ranks name after it.

The usual trick, binding port 0 and closing it, returns a port from the kernel's ephemeral range,
the range every outgoing connection also draws from: between the pick and the store's listen, a
connection (gloo opens several per rank pair) can take it, and the job fails with EADDRINUSE. Ports
below that range are never handed to outgoing connections, so one that is free now stays free
unless another listener takes the same number.
"""
from __future__ import annotations

import glob
import os
import random
import socket

EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
LOWEST = 20000  # well above the registered services most machines run


def free_port(attempts: int = 100) -> int:
    """A port no socket is bound to, outside the ephemeral range where the system says what it is."""
    try:
        with open(EPHEMERAL_RANGE_FILE) as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = None
    if ephemeral_low is not None and ephemeral_low - LOWEST > 1000:
        # The system's entropy, not `random`'s global state: a run seeds that, and would get the same ports.
        candidates = random.SystemRandom().sample(range(LOWEST, ephemeral_low), min(attempts, ephemeral_low - LOWEST))
        for port in candidates:
            with socket.socket() as probe:
                try:
                    probe.bind(("", port))
                except OSError:
                    continue
                return port
    with socket.socket() as probe:  # no such range here: the kernel's pick
        probe.bind(("", 0))
        return probe.getsockname()[1]


def shared_memory_names(port, rank="*") -> list:
    """The /dev/shm files DeepSpeed's CPU all-reduce made for the ranks meeting on `port`."""
    return sorted(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"))


if __name__ == "__main__":
    print(free_port())
