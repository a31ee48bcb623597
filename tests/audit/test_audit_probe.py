"""The audit log's writability stays known between an editor's keystrokes (`audit.probe`), in the real app on a
real llama.cpp engine: a request after a pause does not wait for a probe, and a log that stops taking records
is found by the background probe, without any request, so the next request is refused as before."""

from __future__ import annotations

import sqlite3
import time

from procfs import open_to
from codemoat.audit import probe
from codemoat.config import Settings
from waiting import wait_for

from .test_audit_trust import client_for, complete
from .trustapp import tiny_llm

llm = tiny_llm  # the module's engine (trustapp)


def test_after_a_pause_the_next_request_finds_the_log_known_writable(accounts, tokens, llm):
    with client_for(Settings(), accounts, llm) as c:
        log = c.app.state.trust.log
        assert complete(c, tokens["alice"]).status_code == 200
        time.sleep(1.5)  # longer than known_writable's second: before audit.probe, the next request probed first
        assert log.known_writable
        assert complete(c, tokens["alice"]).status_code == 200


def test_a_log_that_stops_taking_records_is_found_without_a_request_and_refuses(audit_home, accounts, tokens, llm):
    with client_for(Settings(), accounts, llm) as c:
        log = c.app.state.trust.log
        assert complete(c, tokens["alice"]).status_code == 200
        con = sqlite3.connect(audit_home / "codemoat.db")
        con.execute("ALTER TABLE audit_records RENAME TO audit_records_moved")  # the log is gone
        con.commit()
        assert wait_for(lambda: log.failure is not None)  # the background probe saw it, no request sent
        assert not log.known_writable
        r = complete(c, tokens["alice"])
        assert r.status_code == 503 and "audit log" in r.json()["error"]["message"]
        con.execute("ALTER TABLE audit_records_moved RENAME TO audit_records")
        con.commit()
        assert wait_for(lambda: log.known_writable)  # and it comes back by itself once the log takes records again
        assert complete(c, tokens["alice"]).status_code == 200


def test_an_idle_server_stops_probing(accounts, tokens, llm, monkeypatch):
    monkeypatch.setattr(probe, "ACTIVE_S", 1.0)  # a second: the request and the assert after it may run late
    with client_for(Settings(), accounts, llm) as c:
        log = c.app.state.trust.log
        assert complete(c, tokens["alice"]).status_code == 200
        assert wait_for(lambda: log.keeper._thread is None)  # no request for ACTIVE_S: the thread ended
        assert wait_for(lambda: not log.known_writable)  # nothing probes an idle log
        assert complete(c, tokens["alice"]).status_code == 200  # the request probes itself, and starts it again
        assert log.keeper._thread is not None


def test_an_app_that_shut_down_leaves_its_audit_log_closed(accounts, tokens, llm):
    """The app's shutdown closes its audit log: the head file's descriptor, the probe and the writer threads
    went on after it (the probe for ACTIVE_S, the writer for good), each keeping the log and its database
    connections alive: ~1,000 descriptors in the test suite's process, which makes an app per test."""
    with client_for(Settings(), accounts, llm) as c:
        log = c.app.state.trust.log
        assert complete(c, tokens["alice"]).status_code == 200
        threads = [t for t in (log.keeper._thread, log._writer._thread, log._timer._thread) if t is not None]
        assert open_to(log.head_file) == 1 and len(threads) >= 2  # held while it serves: the probe, the writer
    assert open_to(log.head_file) == 0
    assert wait_for(lambda: not any(t.is_alive() for t in threads)), threads
    assert log.verify().ok  # the shutdown checkpoint and every record are there
