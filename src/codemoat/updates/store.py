"""The customer's update store: verify, install, list and roll back bundles, crash-safely.

    $CODEMOAT_HOME/updates/state.json        which bundle each channel serves, its history, and the
                                             versions a running server refused (`fail`)
    $CODEMOAT_HOME/updates/license.lic       the license whose support window gates new bundles
    $CODEMOAT_HOME/updates/bundles/<id>/     an installed bundle (model.moat + model.lic, or the
                                             sealed payload + manifest.json)
    $CODEMOAT_HOME/updates/staging/<id>/     a bundle being installed (removed on the next run)

What is checked before a bundle installs is `checks.py`'s. Installing is rename-based: the payload is copied into staging and checked there (updates.payload:
what `verify` checks, on the copy), renamed into bundles/, and only then does a new state.json
(written beside it, fsynced) replace the old one by rename. A crash before that rename leaves the
previous state, which names only complete bundles; a crash after it leaves the new one. A license
given with the bundle is written (license.lic.tmp, fsynced) before that rename and renamed over
license.lic after it: a full disk fails before the switch, installing nothing (one line); a crash
between the two renames is finished by `reconcile`, which knows the copy by the SHA-256 the state records.
`reconcile()`, run first by every operation, deletes staging leftovers and bundles no state names,
and brings the index's knowledge packs in line with the state (updates.tidy): what it did is audited as
`recovered` (the repair of a crash). An operation's own tidying after its switch (the version a
rollback left, one no longer kept) is named in that operation's record instead. Every step is
reported to `audit(step, detail)`.

A model or adapter version is installed *pending* (`"pending": true` in its state entry, `update list`'s
status) until a serve has health-checked it once (`confirm`: the hand-off's swap, or serve's start with
`update:model`, serve.swapping.check_installed_at_start). Whatever finds it pending checks it before
serving it; one that fails, or whose swap was cut off (the serve died: `update apply` sees no answer),
is recorded failed and the version before it is current again (`fail`). Once one serve's check passed
it, another serve's failure is that serve's own (its memory, its device): `fail(only_pending=True)`
leaves it current for the fleet. A state written before this has no `pending` key: its versions count
as checked (adapters were never pending before). Each start that loads a pending version counts
it first (`start_attempt`): one that ended its process that many times is failed unloaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import CodemoatError
from ..vault.clock import ClockGuard
from ..vault.codec import VaultError
from ..vault.license import MAX_FILE
from ..vault.machine import MachineKey
from ..vault.payload import open_payload
from . import packs, payload
from ..paths import fsync_dir
from .tidy import LICENSE_KEY, tidy
from .bundle import Bundle, payload_context
from .checks import BundleChecks

CRASH_ENV = "CODEMOAT_UPDATE_CRASH_AT"  # tests only: os._exit() at a named step (needs PYTEST_CURRENT_TEST)
HOLD_ENV = "CODEMOAT_UPDATE_HOLD_AT"  # tests only: wait for good at a named point, to be killed there (`hold`)
STEPS = ("verified", "staged", "stored", "journaled", "switched", "indexed")
KEEP = 2  # earlier versions kept per channel for `update rollback`
Audit = Callable[[str, dict[str, Any]], None]


def _changes_store(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The method reads the state, changes it and writes it back: under the store's lock (`_locked`)."""

    @functools.wraps(fn)
    def locked(self: UpdateStore, *a: Any, **kw: Any) -> Any:
        with self._locked():
            return fn(self, *a, **kw)

    return locked


def _step(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name and os.environ.get("PYTEST_CURRENT_TEST"):
        os._exit(86)


def hold(name: str) -> None:
    """Tests only (needs PYTEST_CURRENT_TEST): at the point `name` given in CODEMOAT_UPDATE_HOLD_AT, create
    $CODEMOAT_HOME/run/held-NAME-PID and wait until it is removed, so that a test kills the process (kill -9)
    there, or changes what another process would change meanwhile (the store) and lets it go on."""
    if os.environ.get(HOLD_ENV) == name and os.environ.get("PYTEST_CURRENT_TEST"):
        marker = paths.home() / "run" / f"held-{name}-{os.getpid()}"
        marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        marker.touch()
        while marker.exists():
            time.sleep(0.05)


def model_files(folder: Path) -> tuple[Path, Path]:
    """An installed model bundle's `model.moat` and `model.lic`, once its folder is found to hold its own: the
    manifest's bundle id is the folder's, and model.lic is the license the manifest carries (the license names
    the model, and opening the model checks it). Another version's model and license copied into the current
    version's folder were served as that version: a rollback `update rollback` never recorded."""
    manifest = _own_manifest(folder)
    try:
        lic = json.loads(paths.read_own(folder / "model.lic", "model license", MAX_FILE))
    except ValueError:
        lic = None
    if lic != manifest.get("license"):
        raise CodemoatError(
            f"installed model {manifest.get('version', folder.name)}: its folder holds another version's license "
            "(and so model): run `codemoat update list`, or `update rollback` to go back"
        )
    return folder / "model.moat", folder / "model.lic"


def read_installed(folder: Path) -> tuple[dict[str, Any], bytes]:
    """An installed bundle's manifest.json and payload.sealed, read as the update state is (paths.read_own:
    a FIFO or a symbolic link put in their place is refused in one line, not waited on or followed)."""
    return _own_manifest(folder), paths.read_own(folder / "payload.sealed", "sealed payload", None)


def _own_manifest(folder: Path) -> dict[str, Any]:
    """An installed bundle's manifest.json, once it names the folder's own bundle: another version's files put in
    this one's folder opened (their payload's sealed context is their own manifest's), and were served or indexed as
    the version the state and `update list` name."""
    try:
        manifest = json.loads(paths.read_own(folder / "manifest.json", "bundle manifest", 16 << 20))
    except (ValueError, RecursionError) as e:  # JSON's own message names a line and column, not the file
        raise CodemoatError(
            f"installed bundle {folder.name}: its manifest.json is not JSON ({e}): run `codemoat update list`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("bundle_id") != folder.name:
        raise CodemoatError(f"installed bundle {folder.name} holds another bundle's files: run `codemoat update list`")
    return manifest


class UpdateStore(BundleChecks):
    def __init__(
        self,
        root: Path | None = None,
        machine: MachineKey | None = None,
        audit: Audit | None = None,
        models: list[Path] | None = None,
    ):
        self.root = root or paths.home() / "updates"
        #: model files this machine serves besides the installed model bundle (`model.path`): an
        #: adapter bundle installs only for one of these or that bundle's model
        self.models = list(models or [])
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_depth = 0
        self._switched = False
        self.machine = machine or MachineKey.load()
        self.guard = ClockGuard(self.machine)
        self._audit = audit

    # -- state ----------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def license_path(self) -> Path:
        return self.root / "license.lic"

    def state(self) -> dict[str, Any]:
        try:
            s = json.loads(paths.read_own(self.state_path, "update state", 16 << 20))
        except FileNotFoundError:
            return {"format": 1, "channels": {}, "bundles": {}}
        except ValueError:
            raise CodemoatError(f"update state {self.state_path} is damaged") from None
        if not isinstance(s, dict) or not isinstance(s.get("channels"), dict) or not isinstance(s.get("bundles"), dict):
            raise CodemoatError(f"update state {self.state_path} is damaged")
        return s

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time changes the store: every read-change-write of state.json (apply, rollback,
        confirm, fail, reconcile) holds an flock on updates/state.lock. Two serves confirming at their start,
        or `update apply` beside a rollback, each renamed state.json.tmp over the state (one rename failed with
        FileNotFoundError) and wrote back what it had read, losing the other's change. Re-entrant in this object."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        fd = paths.open_own(self.root / "state.lock", "update store lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
        finally:
            os.close(fd)  # and the flock with it

    def _write_state(self, s: dict[str, Any]) -> None:
        self._replace(self.state_path, json.dumps(s, indent=2, sort_keys=True).encode(), "journaled")

    def _replace(self, path: Path, data: bytes, step: str | None = None) -> None:
        """`path` replaced by `data` crash-safely: written to PATH.tmp (never through a link or into a FIFO
        put there: paths.open_own), fsynced, renamed over `path`."""
        tmp = self._written(path, data)
        if step:
            _step(step)
        os.replace(tmp, path)
        fsync_dir(self.root)

    def _written(self, path: Path, data: bytes) -> Path:
        """PATH.tmp holding `data`, fsynced (a full disk fails here, before anything is replaced); removed when not."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            with os.fdopen(paths.open_own(tmp, "file codemoat writes", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def audit(self, step: str, **detail: Any) -> None:
        if self._audit is not None:
            self._audit(step, detail)

    @_changes_store
    def reconcile(self) -> list[str]:
        """Finish or undo what a crash left: returns what it did (also audited, as `recovered`)."""
        did = self._tidy()
        if did:
            self.audit("recovered", actions=did)
        return did

    def _tidy(self) -> list[str]:
        """Delete staging leftovers and bundles no state names, and index the packs the state names (updates.tidy)."""
        return tidy(self)

    def verify(self, path: Path, license_file: Path | None = None) -> dict[str, Any]:
        try:
            bundle = Bundle(path)
            payload.check_early(bundle)
            report = self.check(bundle, license_file)
            payload.check_contents(bundle, self.machine, self.guard)
        except CodemoatError as e:
            self.audit("refused", file=Path(path).name, action="verify", reason=str(e))
            raise
        self.audit(
            "verified",
            file=Path(path).name,
            bundle_id=bundle.bundle_id,
            kind=bundle.kind,
            name=bundle.name,
            version=bundle.manifest["version"],  # the release's (the layout is bundle.format_version)
        )
        return report

    # -- install ---------------------------------------------------------------------------------
    def current(self, chan: str) -> dict[str, Any] | None:
        s = self.state()
        cur = s["channels"].get(chan, {}).get("current")
        return dict(s["bundles"][cur], bundle_id=cur) if cur else None

    @_changes_store
    def apply(self, path: Path, license_file: Path | None = None, groups: list[str] | None = None) -> dict[str, Any]:
        self.reconcile()
        try:
            if groups is not None and not [g for g in groups if g]:  # not "everyone" by default: say so
                raise CodemoatError("--groups names no group: give the groups that may use it (or leave it out)")
            return self._apply(Path(path), license_file, groups)
        except OSError as e:  # a full disk (ENOSPC, EFBIG) before the switch: one line, the version before serves on
            if self._switched:
                raise
            why = f"cannot install {Path(path).name}: {e.strerror or e}; nothing was installed, the version before serves on"
            shutil.rmtree(self.root / "staging", ignore_errors=True)
            self._tidy_quietly()
            self.audit("refused", file=Path(path).name, action="apply", reason=why)
            raise CodemoatError(why) from None
        except CodemoatError as e:
            shutil.rmtree(self.root / "staging", ignore_errors=True)  # what a refused bundle had copied so far
            self.audit("refused", file=Path(path).name, action="apply", reason=str(e))
            raise

    def _apply(self, path: Path, license_file: Path | None, groups: list[str] | None) -> dict[str, Any]:
        self._switched = False  # until the new state is in place: an OSError before it installed nothing (`apply`)
        bundle = Bundle(path)
        # read once, before anything switches: the file read again after the switch was recorded unchecked (another
        # file put in its place meanwhile), or failed (it was gone) with the bundle installed but said refused
        lic_doc = None if license_file is None else paths.read_regular(license_file, "license file", MAX_FILE, VaultError)
        report = self.check(bundle, lic_doc)
        m = bundle.manifest
        self.audit(
            "apply_started",
            bundle_id=m["bundle_id"],
            kind=m["kind"],
            name=m["name"],
            version=m["version"],
            installed=report["installed"],
        )
        _step("verified")
        stage = self.root / "staging" / m["bundle_id"]
        try:
            stage.mkdir(parents=True)  # new: reconcile emptied staging (a link left there is not followed)
        except FileExistsError:  # reconcile could not remove it (a folder inside it not writable): one line, not a traceback
            raise CodemoatError(f"{stage} is left from an earlier install and cannot be removed: remove it by hand") from None
        payload.stage(bundle, stage, self.machine, self.guard)
        (stage / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))
        fsync_dir(stage)
        _step("staged")
        (self.root / "bundles").mkdir(exist_ok=True)
        final = self.root / "bundles" / m["bundle_id"]
        os.replace(stage, final)
        fsync_dir(self.root / "bundles")
        _step("stored")
        s = self.state()
        chan = bundle.channel
        ch = s["channels"].setdefault(chan, {"current": None, "history": []})
        previous = ch["current"]
        if previous:
            ch["history"] = (ch.get("history", []) + [previous])[-KEEP:]
        ch["current"] = m["bundle_id"]
        info = {
            k: m.get(k)
            for k in ("kind", "name", "version", "released_at", "notes", "replaces", "rollback_target", "bundle_id", "base")
        }
        info.update(installed_at=int(time.time()), dir=str(final))
        if m["kind"] in ("model", "adapter"):  # until a serve's health check passed once (confirm)
            info["pending"] = True
        if m["kind"] == "knowledge-pack":
            info["groups"] = sorted(set(groups or packs.pack_groups(m["name"]) or ["everyone"]))
        elif m["kind"] == "adapter":  # who is served with it (updates.adapters); a new version keeps the choice
            before = s["bundles"].get(previous, {}).get("groups") if previous else None
            info["groups"] = sorted(set(groups or before or ["everyone"]))
        s["bundles"][m["bundle_id"]] = info
        live = {b for c in s["channels"].values() for b in [c.get("current"), *c.get("history", [])] if b}
        s["bundles"] = {k: v for k, v in s["bundles"].items() if k in live}
        # the license is written before the switch and renamed in after it: written after it (as before), a full
        # disk there left the new version current under the license before, with apply reporting a failure
        lic_tmp = None if lic_doc is None else self._written(self.license_path, lic_doc)
        if lic_doc is not None:  # what a crash before the rename is finished by: reconcile renames a copy of this one in
            s[LICENSE_KEY] = hashlib.sha256(lic_doc).hexdigest()
        try:
            self._write_state(s)
        except BaseException:
            if lic_tmp is not None:
                lic_tmp.unlink(missing_ok=True)
            raise
        self._switched = True
        if lic_tmp is not None:  # a rename: no space needed (a crash just before it: reconcile finishes it, updates.tidy)
            _step("license_pending")  # not in STEPS: the state has switched, the license not yet
            os.replace(lic_tmp, self.license_path)
            fsync_dir(self.root)
        _step("switched")
        out = {
            "bundle_id": m["bundle_id"],
            "kind": m["kind"],
            "name": m["name"],
            "version": m["version"],
            "previous": s["bundles"].get(previous, {}).get("version") if previous else None,
            "dir": str(final),
        }
        if m["kind"] == "knowledge-pack":
            out["index"] = self._index_pack(m["bundle_id"], m, info["groups"])
            _step("indexed")
        tidied = self._tidy()  # drops versions no longer kept
        self.audit("applied", **{k: v for k, v in out.items() if k != "dir"}, **({"tidied": tidied} if tidied else {}))
        return out

    def _tidy_quietly(self) -> None:
        """`_tidy` after a refused install (the bundle moved into bundles/ that no state names goes now, freeing its
        space), never raising over the refusal's own error."""
        try:
            self._tidy()
        except (OSError, CodemoatError):
            pass

    def _index_pack(self, bundle_id: str, m: dict[str, Any], groups: list[str]) -> dict[str, Any]:
        full, blob = read_installed(self.root / "bundles" / bundle_id)
        plain = open_payload(blob, full["keys"], self.machine, payload_context(full))
        return packs.import_pack(plain, full, groups)

    @_changes_store
    def rollback(self, chan: str | None = None) -> dict[str, Any]:
        """Serve the version installed before the current one (a local admin action: no vendor signature needed)."""
        self.reconcile()
        s = self.state()
        if chan is None:
            latest = max(
                (
                    (c, s["bundles"][v["current"]]["installed_at"])
                    for c, v in s["channels"].items()
                    if v.get("current") and v.get("history")
                ),
                key=lambda x: x[1],
                default=None,
            )
            if latest is None:
                raise CodemoatError("nothing to roll back: no channel has an earlier version installed")
            chan = latest[0]
        ch = s["channels"].get(chan)
        if not ch or not ch.get("history"):
            raise CodemoatError(f"nothing to roll back in {chan}: no earlier version is installed")
        gone, back = ch["current"], ch["history"][-1]
        gone_version, gone_groups = s["bundles"][gone]["version"], s["bundles"][gone].get("groups")
        if gone_groups is not None:  # who may use it is the admin's latest choice, not the old version's
            s["bundles"][back]["groups"] = gone_groups
        ch["current"], ch["history"] = back, ch["history"][:-1]
        s["bundles"] = {k: v for k, v in s["bundles"].items() if k != gone}
        self._write_state(s)
        info = s["bundles"][back]
        tidied = self._tidy()  # drops the rolled-back bundle and re-indexes a pack
        out = {"channel": chan, "version": info["version"], "from": gone_version, "bundle_id": back}
        self.audit("rolled_back", channel=chan, to=info["version"], frm=gone_version, bundle_id=back, tidied=tidied)
        return out

    @_changes_store
    def confirm(self, chan: str, bundle_id: str) -> bool:
        """A serve's health check of `bundle_id` passed: it is no longer pending (audited `confirmed`).
        False when it is not current in `chan` or was not pending (nothing to record)."""
        s = self.state()
        ch = s["channels"].get(chan)
        info = s["bundles"].get(bundle_id) if ch and ch.get("current") == bundle_id else None
        if not info or not info.get("pending"):
            return False
        del info["pending"]
        info.pop("start_attempts", None)  # a checked version is never failed for its tries
        info["confirmed_at"] = int(time.time())
        self._write_state(s)
        self.audit("confirmed", channel=chan, version=info["version"], bundle_id=bundle_id)
        return True

    @_changes_store
    def start_attempt(self, chan: str, limit: int) -> list[dict[str, Any]]:
        """A process is about to load `chan`'s current version at its start (serve, or vaultd, with
        `update:model`). A pending version's tries are counted first, durably (`start_attempts` in its
        state entry, written before the load), as A/B updaters count boot tries: a version that kills the
        process while it loads or is checked (out of memory, a native crash: nothing records a failure)
        would otherwise be loaded again by every restart. Once it has been tried `limit` times without a
        check passing it, it is recorded failed here without being loaded, and the version before it is
        current (counted in turn when it is pending too). Returns what it failed ({version, reason})."""
        gone: list[dict[str, Any]] = []
        while True:
            s = self.state()
            cur = s["channels"].get(chan, {}).get("current")
            info = s["bundles"].get(cur) if cur else None
            if not info or not info.get("pending"):
                return gone
            tried = info.get("start_attempts", 0)
            tried = tried if isinstance(tried, int) and tried >= 0 else 0
            if tried < limit:
                info["start_attempts"] = tried + 1
                self._write_state(s)
                return gone
            reason = (
                f"it was tried at {tried} start{'s' if tried != 1 else ''} and none came up with it (the process ended"
                " before its health check passed: out of memory or a crash while it loaded, or a start that failed"
                " for another reason, such as its port in use); not loaded again"
            )
            what = {"model": "installed"} if chan == "model" else {"channel": chan}
            self.audit("swap_failed", **what, version=info["version"], reason=reason)
            self.fail(chan, cur, reason)
            gone.append({"version": info["version"], "reason": reason})

    def pending(self, chan: str, bundle_id: str) -> bool:
        """`bundle_id` is `chan`'s current version and no serve has health-checked it yet."""
        cur = self.current(chan)
        return bool(cur and cur["bundle_id"] == bundle_id and cur.get("pending"))

    @_changes_store
    def fail(self, chan: str, bundle_id: str, reason: str, *, only_pending: bool = False) -> dict[str, Any] | None:
        """The running server could not serve `bundle_id` (it failed to load or its health check): make
        the version before it current again and record this one as failed. None when `bundle_id` is
        not current in `chan` (nothing to undo), or, with `only_pending`, when a serve's check passed
        it already (a swap cut off in one serve that another serve checked)."""
        s = self.state()
        ch = s["channels"].get(chan)
        if not ch or ch.get("current") != bundle_id:
            return None
        if only_pending and not s["bundles"][bundle_id].get("pending"):
            return None
        gone = s["bundles"][bundle_id]
        hist = ch.get("history", [])
        back = hist[-1] if hist else None
        if back is not None and gone.get("groups") is not None:  # the admin's latest choice stays
            s["bundles"][back]["groups"] = gone["groups"]
        ch["current"], ch["history"] = back, hist[:-1]
        failed = {k: gone.get(k) for k in ("kind", "name", "version", "released_at", "installed_at", "notes")}
        failed.update(channel=chan, bundle_id=bundle_id, reason=reason[:300], failed_at=int(time.time()))
        s["failed"] = ([*s.get("failed", [])] + [failed])[-10:]
        s["bundles"] = {k: v for k, v in s["bundles"].items() if k != bundle_id}
        self._write_state(s)
        tidied = self._tidy()  # drops the failed bundle's files (and re-indexes a pack)
        to = s["bundles"][back]["version"] if back else None
        self.audit(
            "swap_rolled_back",
            channel=chan,
            failed=gone["version"],
            to=to,
            bundle_id=bundle_id,
            reason=reason[:300],
            tidied=tidied,
        )
        return {"channel": chan, "failed": gone["version"], "version": to}

    def failed(self) -> list[dict[str, Any]]:
        """Versions the running server refused (failed load or health check), oldest first."""
        return list(self.state().get("failed", []))

    def list(self) -> list[dict[str, Any]]:
        self.reconcile()
        s = self.state()
        rows = []
        for chan, ch in sorted(s["channels"].items()):
            for bid in [*ch.get("history", []), ch.get("current")]:
                if not bid:
                    continue
                info = s["bundles"][bid]
                row = dict(info, channel=chan, current=bid == ch.get("current"))
                if info.get("pending"):
                    row["status"] = "pending"  # not health-checked by a serve yet
                if info["kind"] == "model":
                    row["model"] = str(Path(info["dir"]) / "model.moat")
                    row["license"] = str(Path(info["dir"]) / "model.lic")
                rows.append(row)
        for f in s.get("failed", []):
            rows.append(dict(f, current=False, status="failed"))
        return rows
