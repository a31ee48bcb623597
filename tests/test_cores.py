"""Engines size their threads by the cores the process may run on (taskset, a container's cpuset),
not by the machine's: two replicas pinned to one core each must not run two llama.cpp threads each."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import os, sys
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
from codemoat.cores import usable_cores
from codemoat.engines.llamacpp import LlamaCppEngine
e = LlamaCppEngine(sys.argv[1], n_ctx=256, use_extra_bufts=False)
print(usable_cores(), e._llm.n_threads, e._llm.n_threads_batch)
e.close()
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least two usable cores to tell them apart")
def test_a_process_pinned_to_one_core_runs_one_llama_thread(tiny_gguf):
    out = subprocess.run([sys.executable, "-c", CHILD, str(tiny_gguf)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["1", "1", "1"]


def test_usable_cores_is_the_affinity():
    from codemoat.cores import usable_cores

    assert usable_cores() == len(os.sched_getaffinity(0))
