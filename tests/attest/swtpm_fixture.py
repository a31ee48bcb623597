"""A real software TPM (swtpm) per test, on free loopback ports; never a host's /dev/tpm*.

    swtpm socket --tpm2 --server type=tcp,port=P,bindaddr=127.0.0.1 --ctrl type=tcp,port=P+1,... (the TCTI's control port)
           --flags not-need-init,startup-clear

Each state is made by `swtpm_setup --create-ek-cert` with a local CA in the test's temp dir, so
every chip has its own endorsement seed (its own keys) and an EK certificate whose chain the
tests verify. There is no resource manager: the code under test flushes its transient handles.
"""

from __future__ import annotations


import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

NEEDED = ("swtpm", "swtpm_setup", "swtpm_localca")


def _listening(port: int) -> bool:
    """Is a socket listening on 127.0.0.1:`port`? Read from /proc/net/tcp: connecting would take the
    TPM's one command connection."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            return any(cols[1] == want and cols[3] == "0A" for cols in (line.split() for line in f) if len(cols) > 3)
    except OSError:
        return True  # no /proc: the control port's answer has to do


def _free_pair() -> int:
    """A free port P with P+1 free too: the swtpm TCTI sends control commands to port + 1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


def available() -> str | None:
    """Why the TPM tests cannot run here, or None."""
    missing = [c for c in NEEDED if shutil.which(c) is None]
    if missing:
        return f"Debian packages swtpm swtpm-tools are not installed ({', '.join(missing)} missing)"
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        return "tpm2-pytss is not installed (pip install -e '.[tpm]')"
    return None


class Swtpm:
    """One software TPM: `tcti` reaches it; `stop()` ends it (its state stays in `state`)."""

    def __init__(self, root: Path, ca: Path, ek_cert: bool = True):
        self.root, self.ca = root, ca
        self.state = root / "state"
        self.state.mkdir(parents=True)
        args = ["swtpm_setup", "--tpm2", "--tpmstate", str(self.state), "--config", str(ca / "setup.conf")]
        if ek_cert:
            args.append("--create-ek-cert")
        subprocess.run(args, check=True, capture_output=True, timeout=60)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> None:
        self.port = _free_pair()
        ctrl = self.port + 1
        self.proc = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state}",
                "--server",
                f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                # the control channel: a probe on the command port would take the TPM's one connection
                socket.create_connection(("127.0.0.1", ctrl), timeout=0.2).close()
                if _listening(self.port):  # the command port too (the control port can be up first)
                    return
                time.sleep(0.02)
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"swtpm exited: {self.proc.stderr.read().decode()[-300:]}")
                time.sleep(0.02)
        raise RuntimeError("swtpm did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def swtpm_ca(tmp_path_factory) -> Path:
    """A local certificate authority for EK certificates, in a temp dir (not /var/lib/swtpm-localca)."""
    why = available()
    if why:
        pytest.skip(why)
    ca = tmp_path_factory.mktemp("swtpm-ca")
    (ca / "localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    (ca / "setup.conf").write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {ca}/localca.conf\n"
        "create_certs_tool_options = /etc/swtpm-localca.options\n"
        "active_pcr_banks = sha256\n"
    )
    return ca


@pytest.fixture
def swtpm_factory(tmp_path, swtpm_ca):
    """`make()` starts another software TPM (its own seed, so its own keys); all stop after the test."""
    made: list[Swtpm] = []

    def make(ek_cert: bool = True) -> Swtpm:
        t = Swtpm(tmp_path / f"swtpm{len(made)}", swtpm_ca, ek_cert)
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


@pytest.fixture
def swtpm(swtpm_factory) -> Swtpm:
    return swtpm_factory()


__all__ = ["Swtpm", "available", "swtpm", "swtpm_ca", "swtpm_factory"]
