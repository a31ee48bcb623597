"""How many CPU cores this process may run on (its affinity: `taskset`, a container's cpuset)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on, which on a host split between replicas (`taskset -c`, a
    container's `--cpuset-cpus`) is fewer than the machine has: llama.cpp given more threads than its
    cores waits on descheduled threads at every step."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
