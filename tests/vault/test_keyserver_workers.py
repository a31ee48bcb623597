"""`codemoat keyserver --workers N`: each worker listens on the port with a socket of its own (SO_REUSEPORT), so the
kernel spreads connections over the workers. With uvicorn's shared socket one worker took every connection of a
burst (32 of 32 in 4 of 5 tries), and two workers served like one. Stopping the server stops every worker."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import psutil

from attest.tpmhelp import keyserver_process

from codemoat.vault.vendor import Vendor


def _listening(proc: psutil.Process, port: int) -> bool:
    try:
        return any(c.status == "LISTEN" and c.laddr.port == port for c in proc.net_connections())
    except psutil.NoSuchProcess:
        return False


def _established(proc: psutil.Process, port: int) -> int:
    return sum(1 for c in proc.net_connections() if c.status == "ESTABLISHED" and c.laddr.port == port)


def test_two_workers_share_a_burst_of_connections_and_stop_together(tmp_path):
    Vendor.init(tmp_path / "vendor").close()
    with keyserver_process(tmp_path / "vendor", "--workers", "2") as url:
        port = urlsplit(url).port
        server = next(
            p
            for p in psutil.process_iter(["cmdline"])
            if str(port) in " ".join(p.info["cmdline"] or []) and "--workers" in p.info["cmdline"]
        )
        deadline = time.monotonic() + 60  # the first worker up answers /health; wait for the other to listen too
        while sum(1 for p in server.children(recursive=True) if _listening(p, port)) < 2:
            assert time.monotonic() < deadline, "the second worker never listened"
            time.sleep(0.1)
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        for c in conns:  # a request each: every connection accepted and served
            c.sendall(b"GET /health HTTP/1.1\r\nhost: k\r\n\r\n")
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
        workers = [p for p in server.children(recursive=True) if _established(p, port)]
        counts = sorted(_established(p, port) for p in workers)
        # binomial(32, 1/2) by the kernel's hash: fewer than 4 on either worker has odds of about 3 in a million
        assert len(counts) == 2 and counts[0] >= 4, counts
        for c in conns:
            c.close()
        everyone = [server, *server.children(recursive=True)]
    gone, alive = psutil.wait_procs(everyone, timeout=20)
    assert not alive, [p.pid for p in alive]


def test_workers_on_any_free_port_is_a_usage_error(tmp_path):
    """Each worker binds the port itself, so port 0 would give every worker a port of its own."""
    from vault.vaulthelp import cli

    Vendor.init(tmp_path / "vendor").close()
    p = cli("keyserver", "--vendor", str(tmp_path / "vendor"), "--port", "0", "--workers", "2", home=tmp_path / "home")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--workers above 1 needs a fixed --port" in p.stderr
