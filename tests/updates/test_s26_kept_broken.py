"""A serve whose current model version failed to load here (another serve's check passed it, so the store keeps it)
falls back, for itself only, to the newest version kept before it (`engines.loader.open_installed`, `_to_open`).

Was: when that kept version's folder was broken (a file missing or unreadable), its files were read outside the try
that skips a failed load, and the start stopped with that folder's one line, though the version kept before it would
have served. Now: it is skipped for the next kept version, the log line that reports the fallback names it and why,
and only when no kept version opens does the start stop, with one line naming each.

Real bundles in a real store; the other serve's check is its real effect on the store (store.confirm), made at the
point a serve reports (store.hold: in-process, the function; for the CLI, $CODEMOAT_HOME/run/held-NAME-PID)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from codemoat.updates.store import HOLD_ENV
from updhelp import one_line_error


def _torn(v: dict) -> None:
    """The version's model no longer opens: here, a load that fails in this serve only."""
    moat = Path(v["dir"]) / "model.moat"
    data = bytearray(moat.read_bytes())
    data[len(data) // 2] ^= 1
    moat.write_bytes(bytes(data))


def _missing(v: dict) -> None:
    (Path(v["dir"]) / "manifest.json").unlink()


def _unreadable(v: dict) -> None:
    """model.lic a symbolic link (to the file it was): refused by paths.read_own, in one line."""
    lic = Path(v["dir"]) / "model.lic"
    moved = lic.with_name("moved.lic")
    lic.rename(moved)
    lic.symlink_to(moved)


def _three_versions(shop, store):
    """1 and 2 confirmed and kept, 3 current and pending, its model torn (it fails to load in every serve)."""
    lic = shop.license()
    vs = []
    for version in ("1", "2", "3"):
        vs.append(store.apply(shop.release(version), lic))
        if version != "3":
            assert store.confirm("model", vs[-1]["bundle_id"])
    _torn(vs[2])
    assert store.state()["channels"]["model"]["history"] == [vs[0]["bundle_id"], vs[1]["bundle_id"]]
    return vs


def _another_serve_confirms(monkeypatch, store, v: dict) -> None:
    """At `start_load` (this serve's load of the pending version failed), another serve's check passes it."""
    import codemoat.updates.store as store_mod

    def hold(name: str) -> None:
        if name == "start_load":
            assert store.confirm("model", v["bundle_id"])

    monkeypatch.setattr(store_mod, "hold", hold)


def _open(monkeypatch, store, vs):
    from codemoat.config import load_settings
    from codemoat.engines.loader import open_installed

    _another_serve_confirms(monkeypatch, store, vs[2])
    return open_installed(load_settings(**{"model.path": "update:model"}))


def _served(monkeypatch, store, vs, caplog) -> tuple[str, str]:
    """The version this serve opens, and the log line that reports its fallback."""
    caplog.set_level(logging.WARNING, logger="codemoat.updates")
    holder = _open(monkeypatch, store, vs)
    try:
        assert holder.get() is not None
        version = holder.status.bundle.version
    finally:
        holder.close()
    (line,) = [r.getMessage() for r in caplog.records if "this server serves" in r.getMessage()]
    return version, line


def test_a_kept_version_with_a_broken_folder_is_skipped_for_the_one_before_it(shop, store, monkeypatch, caplog):
    vs = _three_versions(shop, store)
    _missing(vs[1])
    caplog.set_level(logging.WARNING, logger="codemoat.updates")
    holder = _open(monkeypatch, store, vs)  # was: CodemoatError/FileNotFoundError on 2's manifest
    try:
        assert holder.status.bundle.version == "1"
        assert holder.get() is not None
    finally:
        holder.close()
    assert store.current("model")["bundle_id"] == vs[2]["bundle_id"] and store.failed() == []  # the store unchanged
    (line,) = [r.getMessage() for r in caplog.records if "this server serves" in r.getMessage()]
    assert "this server serves 1, kept before it, until it restarts; skipped" in line, line
    assert "2 (its manifest.json: No such file or directory)" in line, line  # which version, and why
    recs = [(d["version"], bool(d.get("this_server_only"))) for s, d in holder.update_records if s == "swap_failed"]
    assert recs == [("3", False), ("2", True)]  # 3's failure its own (the store kept it), 2 skipped by this serve


@pytest.mark.parametrize(
    "text, why",
    [("{not json", "Expecting"), ("[" * 100_000, "maximum recursion depth")],
    ids=["not-json", "nested-past-the-parsers-depth"],
)
def test_a_kept_version_whose_manifest_is_not_json_is_skipped_naming_the_file(shop, store, monkeypatch, caplog, text, why):
    """Was: skipped with JSON's own message ('Expecting value: line 1 column 1 (char 0)'), which names no file; and a
    manifest nested past the parser's depth was a RecursionError, which an adapter's open did not catch."""
    vs = _three_versions(shop, store)
    (Path(vs[1]["dir"]) / "manifest.json").write_text(text)
    version, line = _served(monkeypatch, store, vs, caplog)
    assert version == "1"
    assert ": 2 (installed bundle " in line and f"its manifest.json is not JSON ({why}" in line, line


def test_the_newest_kept_version_serves_when_its_folder_is_whole(shop, store, monkeypatch, caplog):
    """The negative beside it: nothing broken, the newest kept version serves and the log line names no skip."""
    vs = _three_versions(shop, store)
    version, line = _served(monkeypatch, store, vs, caplog)
    assert version == "2"
    assert line.endswith("this server serves 2, kept before it, until it restarts"), line


def test_with_every_kept_version_broken_the_start_stops_with_one_line_naming_them(shop, store, monkeypatch):
    vs = _three_versions(shop, store)
    _missing(vs[1])
    _unreadable(vs[0])
    with pytest.raises(CodemoatError) as got:
        _open(monkeypatch, store, vs)
    line = str(got.value)
    assert "\n" not in line and "installed model 3 failed to load here" in line, line
    assert "no version kept before it loaded here: 2 (" in line and "; 1 (" in line, line
    assert "manifest.json" in line and "symbolic link" in line, line  # why each
    assert store.current("model")["bundle_id"] == vs[2]["bundle_id"]  # the store unchanged


def test_a_serve_start_with_every_kept_version_broken_is_one_line(shop, store, home):
    """The same through `codemoat serve`: exit 1, one `error:` line, no traceback."""
    vs = _three_versions(shop, store)
    _missing(vs[1])
    _unreadable(vs[0])
    env = dict(os.environ, **{HOLD_ENV: "start_load"})
    env.pop("CODEMOAT_DEBUG", None)
    args = [sys.executable, "-m", "codemoat.cli.main", "serve", "--model", "update:model", "--port", "0"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        marker = home / "run" / f"held-start_load-{proc.pid}"
        deadline = time.monotonic() + 120
        while not marker.exists():  # its load of 3 failed, and it waits there
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        assert store.confirm("model", vs[2]["bundle_id"])  # as another serve's passed check does
        marker.unlink()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "\n".join(x for x in err.splitlines() if not x.startswith("WARNING:"))  # the log lines of each version tried
    line = one_line_error(subprocess.CompletedProcess(args, proc.returncode, out, err), "no version kept before it loaded here")
    assert ": 2 (" in line and "; 1 (" in line, line


def test_a_pending_current_version_with_a_broken_folder_goes_back_at_once(shop, store):
    """Was: the store's current version, still pending (never checked), whose folder was broken stopped the start with
    a bare FileNotFoundError naming its path, at every start, until `update.start_attempts` ran out (the fourth start
    served the version before it). Now it fails here as a failed load does: the store goes back to the version kept
    before it, and this first start serves that one."""
    from codemoat.config import load_settings
    from codemoat.engines.loader import open_installed

    vs = _three_versions(shop, store)
    _missing(vs[2])
    holder = open_installed(load_settings(**{"model.path": "update:model"}))
    try:
        assert holder.status.bundle.version == "2"
    finally:
        holder.close()
    assert store.current("model")["bundle_id"] == vs[1]["bundle_id"]  # the store went back: 3 failed at start
    assert [f["version"] for f in store.failed()] == ["3"]
    recs = [(s, d["version"]) for s, d in holder.update_records if s == "swap_failed"]
    assert recs == [("swap_failed", "3")] and "manifest.json" in holder.update_records[0][1]["reason"]
