"""Software TPMs for bench/attest.py: n swtpm processes on free loopback port pairs, and machines on them
whose AKs are marked bound at the vendor (provisioning is not what the bench measures)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PCRS = [15]


def free_pair() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue


class Tpms:
    """n software TPMs (fresh state each, no EK certificate: not needed here)."""

    def __init__(self, n: int, work: Path):
        self.procs, self.tctis = [], []
        for i in range(n):
            d = work / f"tpm{i}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            port = free_pair()
            self.procs.append(
                subprocess.Popen(
                    [
                        "swtpm",
                        "socket",
                        "--tpm2",
                        "--tpmstate",
                        f"dir={d}",
                        "--server",
                        f"type=tcp,port={port},bindaddr=127.0.0.1",
                        "--ctrl",
                        f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                        "--flags",
                        "not-need-init,startup-clear",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            self.tctis.append(f"swtpm:host=127.0.0.1,port={port}")
        time.sleep(0.5)

    def close(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(timeout=10)


def tpm_machine(tcti: str, vendor):
    """A machine on that chip, its AK marked bound at the vendor. Provisioning (EK certificate chain,
    MakeCredential/ActivateCredential: `vendor tpm challenge|confirm`) is not what is measured here, and
    these swtpm states have no EK certificate, so the bound row is written directly."""

    from codemoat.attest.tpm import TpmAttestor
    from codemoat.vault.machine import MachineKey

    m = MachineKey.generate(facts={})
    with TpmAttestor(tcti) as a:
        m.tpm = {"tcti": tcti, "identity": a.identity(PCRS)}
    mark_bound(vendor, m)
    return m


def mark_bound(vendor, m) -> None:
    import sqlalchemy as sa

    from codemoat.vault.tpmbind import key_id, tpm_keys_t

    t = m.tpm["identity"]
    with vendor.engine.begin() as c:
        c.execute(sa.delete(tpm_keys_t).where(tpm_keys_t.c.ak_id == key_id(t["ak"])))
        c.execute(
            tpm_keys_t.insert().values(
                ak_id=key_id(t["ak"]), machine_id=m.id, ek_id=key_id(t["ek"] or ""), bound_at=int(time.time())
            )
        )
