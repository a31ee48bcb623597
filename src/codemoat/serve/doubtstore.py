"""The refused answers whose record may be in the chain (`serve.late`'s doubts), kept on disk so that a server that
dies before it could look them up leaves them to the next one.

    $CODEMOAT_HOME/audit-doubts-<db>/<id>.jsonl   one process's doubts, a JSON object per line (0600)
    $CODEMOAT_HOME/audit-doubts-<db>/<id>.lock    held (flock) for as long as that process lives

`<db>` names the database (as the audit head's file does): a server takes over only doubts about its own chain.
A doubt holds what finds its record (its time, its body hash) and the facts a `withheld` record names (user, token,
route, protocol, model, client, status, tokens): no text. A new doubt, a change after a round of lookups and each
try of a `withheld` record's append are lines appended, a doubt's later line replacing its earlier ones (`read`);
after every `max_kept` lines, the file is written again whole (a temporary file, fsynced, renamed over it). Each process writes files of its own (several servers may share a home: a blue-green pair, the
tests), so no two write one file.

A process that starts (`adopt`) takes over the files whose lock nobody holds: their process ended (killed, crashed,
or stopped while the database was still unreachable) with doubts unsettled. It copies them into its own file, then
removes the others' files while it still holds their lock, and checks that the file it locked is still the one at
that name (another process that adopted it first removed it): each doubt is adopted once. A lock is created under
another name and renamed into place once held, so no process finds a lock that its owner has not taken yet. A line
that is not a doubt (a torn last line, an edited file) is skipped with an error line. A file that is a symbolic
link, or not a regular file, is refused (`paths.open_own`), and so is a folder that is a link. A machine that loses
power may lose the lines appended since the last rewrite (they are not fsynced: every refused request would wait
for the disk); a process that dies loses none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

from .. import paths
from ..audit.chain import _db_id
from ..errors import CodemoatError

log = logging.getLogger("codemoat.audit")

#: bytes of one file read at most when adopting it (a doubt's line is ~300 bytes; `late.MAX_KEPT` of them fit)
MAX_FILE = 16 << 20
_KEYS = ("ts", "ts_us", "body", "facts", "looked", "withheld", "tried", "settled")
_FACT_KEYS = {"user", "token_id", "route", "protocol", "model", "client", "status", "prompt_tokens", "completion_tokens"}
_WITHHELD_KEYS = {"user", "token_id", "route", "protocol", "model", "client", "ts", "status", "detail"}


def folder_for(home: Path, db_url: str) -> Path:
    """The doubts folder of the chain in database `db_url` (named as `audit.chain.head_file_for` names its file)."""
    return home / f"audit-doubts-{_db_id(db_url)}"


def encode(d: dict[str, Any]) -> bytes:
    return (json.dumps({k: d.get(k) for k in _KEYS}, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _plain(v: Any) -> bool:
    return v is None or type(v) in (str, int) or type(v) is float and math.isfinite(v)


def _time(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _withheld_ok(w: Any, facts: dict[str, Any]) -> bool:
    """A `withheld` record's fields as `late.LateRecords._settle` makes them from the doubt's facts, and nothing else
    (they go into the signed chain)."""
    if w is None:
        return True
    if not isinstance(w, dict) or set(w) != _WITHHELD_KEYS or not _time(w["ts"]) or w["status"] != 503:
        return False
    detail = w["detail"]
    return (
        all(_plain(w[k]) and w[k] == facts.get(k) for k in _WITHHELD_KEYS - {"detail", "ts", "status"})
        and isinstance(detail, dict)
        and set(detail) == {"record", "status", "why"}
        and type(detail["record"]) is int
        and detail["status"] == facts.get("status")
        and type(detail["why"]) is str
    )


def decode(line: bytes) -> dict[str, Any] | None:
    """A doubt read back, None if the line is not one."""
    try:
        d = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not (
        isinstance(d, dict)
        and _time(d.get("ts"))
        and type(d.get("ts_us")) is int
        and isinstance(d.get("body"), str)
        and isinstance(d.get("facts"), dict)
        and not set(d["facts"]) - _FACT_KEYS
        and all(_plain(v) for v in d["facts"].values())
        and _withheld_ok(d.get("withheld"), d["facts"])
        and (d.get("tried") is None or _time(d["tried"]))
        and d.get("looked") in (None, True, False)
        and d.get("settled") in (None, True, False)
    ):
        return None
    return {k: d.get(k) for k in _KEYS}


def read(raw: bytes, name: Any) -> list[dict[str, Any]]:
    """A doubts file's doubts: the last line of each (a later line replaces its earlier ones), none that says it is
    settled; a line that is not a doubt is skipped with an error line."""
    last: dict[tuple[int, str], dict[str, Any]] = {}
    for i, line in enumerate(raw.splitlines(), 1):
        if (d := decode(line)) is None:
            log.error("%s line %d is not a refused answer to look up: skipped", name, i)
        else:
            last.pop((d["ts_us"], d["body"]), None)
            last[(d["ts_us"], d["body"])] = d
    return [d for d in last.values() if not d.get("settled")]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class DoubtStore:
    """One process's doubts file in `folder` (see the module docstring), made at the first `add`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.path = folder / f"{self.id}.jsonl"
        self.appended = 0  # lines appended since the file was last written whole
        self._lock_fd: int | None = None
        self._held: list[int] = []  # locks of files taken over that could not be removed: held while this process lives

    def _folder(self) -> None:
        if self.folder.is_symlink():
            raise CodemoatError(f"{self.folder} is a symbolic link, not the audit doubts folder")
        self.folder.mkdir(mode=paths.PRIVATE_DIR, exist_ok=True)
        paths.make_private(self.folder, "the audit doubts folder")

    def _own(self) -> None:
        """Create this process's lock (held until it ends), once: taken under another name, then renamed into place
        (a lock found under its name is always held by a live owner or by nobody)."""
        if self._lock_fd is not None:
            return
        self._folder()
        new = self.folder / f"{self.id}.new"
        fd = paths.open_own(new, "audit doubts lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new name: nobody else holds it
            os.rename(new, self.folder / f"{self.id}.lock")
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def add(self, doubts: list[dict[str, Any]]) -> None:
        """Append doubts (an OSError or `CodemoatError` passes: the caller logs it, the doubts stay in memory)."""
        if not doubts:
            return
        self._own()
        fd = paths.open_own(self.path, "audit doubts file", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, b"".join(encode(d) for d in doubts))
            except BaseException:  # no half line for the next one to be glued onto
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        self.appended += len(doubts)

    def write(self, doubts: list[dict[str, Any]]) -> None:
        """This process's doubts, all of them, in place of what its file held (none: the file goes)."""
        self.appended = 0
        if self._lock_fd is None and not doubts:
            return
        self._own()
        if not doubts:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        tmp = self.folder / f"{self.id}.tmp"
        fd = paths.open_own(tmp, "audit doubts file", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            _write_all(fd, b"".join(encode(d) for d in doubts))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self.path)

    def adopt(self) -> list[dict[str, Any]]:
        """The doubts of the processes that ended with some unsettled, now this process's (see the module docstring)."""
        if not self.folder.exists() and not self.folder.is_symlink():
            return []
        try:
            self._folder()
        except (OSError, CodemoatError) as e:
            log.error("could not read the refused answers other servers left to look up: %s", e)
            return []
        for new in self.folder.glob("*.new"):  # a lock whose process died before it renamed it (no file of it exists)
            if new.name != f"{self.id}.new":
                self._remove_stale(new)
        got: list[dict[str, Any]] = []
        for lock in sorted(self.folder.glob("*.lock")):
            other = lock.name[: -len(".lock")]
            if other == self.id:
                continue
            try:
                got += self._adopt_one(lock, other)
            except (OSError, CodemoatError) as e:
                log.error("could not take over another server's refused answers to look up (%s): %s", lock, e)
        return got

    def _remove_stale(self, new: Path) -> None:
        try:
            fd = paths.open_own(new, "audit doubts lock", os.O_RDWR)
        except (OSError, CodemoatError):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(new, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(new)
        except OSError:
            pass  # its process is taking it now, or another removed it
        finally:
            os.close(fd)

    def _adopt_one(self, lock: Path, other: str) -> list[dict[str, Any]]:
        try:
            fd = paths.open_own(lock, "audit doubts lock", os.O_RDWR)
        except CodemoatError:
            if not lock.exists() and not lock.is_symlink():
                return []  # taken over meanwhile by another server
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []  # its process lives
            try:
                if os.stat(lock, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                    return []  # another process adopted it first and removed it
            except FileNotFoundError:
                return []
            data = self.folder / f"{other}.jsonl"
            try:
                raw = paths.read_own(data, "audit doubts file", MAX_FILE)
            except FileNotFoundError:
                raw = b""
            doubts = read(raw, data)
            self.add(doubts)  # in this process's file before the other's goes
            try:
                for leftover in (data, self.folder / f"{other}.tmp", lock):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
            except OSError as e:  # they are this process's now all the same; nobody else may take them while it lives
                log.error("could not remove the refused answers' file %s, taken over: %s", data, e)
                self._held.append(fd)
                fd = -1
            if doubts:
                log.warning(
                    "%d refused answers whose audit record may be in the chain, left by a server that ended (%s), "
                    "will be looked up by this one",
                    len(doubts),
                    lock.name,
                )
            return doubts
        finally:
            if fd >= 0:
                os.close(fd)
