"""HAProxy with deploy/haproxy.cfg as shipped, in front of two replicas on loopback, for the tests.

`HAProxy.start(log, replica1, replica2)` runs Debian's haproxy on free ports and waits until it
answers; `states()` reads its stats page (which replica the health check holds up or down)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from ports import free_port

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg"


def haproxy_bin() -> str | None:
    return shutil.which("haproxy")


class HAProxy:
    def __init__(self, proc: subprocess.Popen, url: str, stats: str, log: Path):
        self.proc, self.url, self.stats, self.log = proc, url, stats, log

    @classmethod
    def start(cls, log: Path, replica1: str, replica2: str, timeout: float = 30) -> HAProxy:
        """HAProxy for two replica URLs (http://host:port), answering at `.url`; its log goes to `log`."""
        port, stats = free_port(), f"127.0.0.1:{free_port()}"
        env = dict(
            os.environ,
            CODEMOAT_LB_BIND=f"127.0.0.1:{port}",
            CODEMOAT_LB_STATS=stats,
            CODEMOAT_REPLICA1=replica1.removeprefix("http://"),
            CODEMOAT_REPLICA2=replica2.removeprefix("http://"),
        )
        out = open(log, "w")
        proc = subprocess.Popen([haproxy_bin(), "-db", "-f", str(CONFIG)], env=env, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        me = cls(proc, f"http://127.0.0.1:{port}", f"http://{stats}/stats;csv", log)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("HAProxy exited:\n" + log.read_text())
            try:
                if httpx.get(me.url + "/health", timeout=2).status_code == 200:
                    return me
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        me.stop()
        raise RuntimeError("HAProxy did not come up:\n" + log.read_text())

    def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy's health check sees it: {"replica1": "UP", "replica2": "DOWN", …}."""
        rows = [line.split(",") for line in httpx.get(self.stats, timeout=5).text.splitlines()]
        col = rows[0].index("status")
        return {r[1]: r[col] for r in rows[1:] if len(r) > col and r[0] == "codemoat" and r[1].startswith("replica")}

    def wait_state(self, replica: str, state: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while (now := self.states().get(replica)) != state:
            if time.time() > deadline:
                raise AssertionError(f"HAProxy holds {replica} {now}, not {state}:\n{self.log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
