"""Two processes (or threads) making the machine key at once on a fresh home agree on one key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from codemoat.vault.machine import MachineKey

MAKE = "from codemoat.vault.machine import MachineKey; print(MachineKey.load_or_create().id)"


def test_threads_and_processes_starting_together_share_one_key(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("CODEMOAT_HOME", str(home))
    env = {**os.environ, "CODEMOAT_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", MAKE], env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def make() -> None:
        barrier.wait()
        ids.append(MachineKey.load_or_create().id)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids += [p.communicate(timeout=120)[0].strip() for p in procs]
    assert len(ids) == 12 and len(set(ids)) == 1, ids
    assert MachineKey.load().id == ids[0]  # the key on disk is the one every caller got
    key_file = MachineKey.path()
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert set(json.loads(key_file.read_text())) == {"x25519", "ed25519"}
    assert [p.name for p in home.iterdir() if p.name.endswith(".tmp")] == []  # no private copy left behind
