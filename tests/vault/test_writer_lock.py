"""db.writer_lock: the key server's seat transactions on an SQLite file are taken in turn across processes
by a flock beside the file, so a worker waits for another's commit in the kernel, not in SQLite's polling
busy handler (sleeps of 1 ms and more, the worker's event loop standing still). A second open of the lock
file stands for another process: a flock belongs to the open file description, so the check is the same."""

from __future__ import annotations

import fcntl
import os

from codemoat.db import make_engine, writer_lock
from codemoat.vault.keyserver import REQUEST_DOMAIN, KeyServer
from codemoat.vault.lease import LeaseClient
from codemoat.vault.license import License
from ggufs import write_gguf

try:
    from .vaulthelp import bundle
except ImportError:
    from vaulthelp import bundle


def _free(path: str) -> bool:
    """True when another process could take the flock on `path` right now."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # lets it go when it was taken
    return True


def test_the_writer_lock_of_an_sqlite_file_excludes_other_processes(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'v.db'}")
    lock = writer_lock(engine)
    assert writer_lock(engine) is lock  # one per file and process: every key server in it shares it
    with lock:
        assert not _free(str(tmp_path / "v.db.write-lock"))
    assert _free(str(tmp_path / "v.db.write-lock"))
    engine.dispose()


def test_a_lease_transaction_holds_the_writer_lock_from_the_nonce_spend_to_the_commit(vendor, machine, tmp_path, monkeypatch):
    p = tmp_path / "m.gguf"
    write_gguf(p, 4096)
    _, lic, _ = bundle(vendor, p, tmp_path / "out", machine, mode="lease", keyserver="http://127.0.0.1:9")
    ks = KeyServer(vendor)
    client = LeaseClient(License.load(lic), machine)
    path = f"{vendor.engine.url.database}.write-lock"
    seen = []
    spend_on, issue_on = ks.nonces.spend_on, ks.nonces.issue_on

    def spending(*a):
        seen.append(("spend", _free(path)))
        return spend_on(*a)

    def issuing(*a):
        seen.append(("issue", _free(path)))
        return issue_on(*a)

    monkeypatch.setattr(ks.nonces, "spend_on", spending)
    monkeypatch.setattr(ks.nonces, "issue_on", issuing)
    req = client._signed_request(ks.challenge(client.lic.id)["nonce"], REQUEST_DOMAIN)
    assert "lease" in ks.lease(req)
    # the challenge's nonce writes nothing and takes no lock (a flood of challenges must not hold up leases); the
    # lease's spend and its next nonce are in its transaction, under the lock
    assert seen == [("issue", True), ("spend", False), ("issue", False)]
    assert _free(path)  # let go once committed
    client.close()
