"""The refused answers whose record may be in the chain (`serve.late`'s doubts), kept on disk so that a server that
dies before it could look them up leaves them to the next one.

    $CODEMOAT_HOME/audit-doubts/<id>.jsonl   one process's doubts, a JSON object per line (0600)
    $CODEMOAT_HOME/audit-doubts/<id>.lock    held (flock) for as long as that process lives

A doubt holds what finds its record (its time, its body hash) and the facts a `withheld` record names (user, token,
route, protocol, model, client, status, tokens): no text. A new doubt is one line appended; after a round of
lookups the file is written again whole (a temporary file renamed over it). Each process writes files of its own
(several servers may share a home: a blue-green pair, the tests), so no two write one file.

A process that starts (`adopt`) takes over the files whose lock nobody holds: their process ended (killed, crashed,
or stopped while the database was still unreachable) with doubts unsettled. It copies them into its own file, then
removes the others' files while it still holds their lock, and checks that the file it locked is still the one at
that name (another process that adopted it first removed it): each doubt is adopted once. A line that is not a
doubt (a torn last line, an edited file) is skipped with an error line. A file that is a symbolic link, or not a
regular file, is refused (`paths.open_own`). A machine that loses power may lose the lines not yet on disk (they
are not fsynced: every refused request would wait for the disk); a process that dies loses none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import CodemoatError

log = logging.getLogger("codemoat.audit")

#: bytes of one file read at most when adopting it (a doubt's line is ~300 bytes; `late.MAX_KEPT` of them fit)
MAX_FILE = 16 << 20
_KEYS = ("ts", "ts_us", "body", "facts", "looked", "withheld")


def encode(d: dict[str, Any]) -> bytes:
    return (json.dumps({k: d.get(k) for k in _KEYS}, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> dict[str, Any] | None:
    """A doubt read back, None if the line is not one."""
    try:
        d = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not (
        isinstance(d, dict)
        and isinstance(d.get("ts"), (int, float))
        and isinstance(d.get("ts_us"), int)
        and isinstance(d.get("body"), str)
        and isinstance(d.get("facts"), dict)
        and isinstance(d.get("withheld"), (dict, type(None)))
    ):
        return None
    return {k: d.get(k) for k in _KEYS}


class DoubtStore:
    """One process's doubts file in `folder` (see the module docstring), made at the first `add`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.path = folder / f"{self.id}.jsonl"
        self._lock_fd: int | None = None

    def _own(self) -> None:
        """Create this process's lock (held until it ends) and data file, once."""
        if self._lock_fd is not None:
            return
        self.folder.mkdir(mode=paths.PRIVATE_DIR, exist_ok=True)
        fd = paths.open_own(self.folder / f"{self.id}.lock", "audit doubts lock")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new name: nobody else holds it
        self._lock_fd = fd

    def add(self, d: dict[str, Any]) -> None:
        """Append one doubt (an OSError or `CodemoatError` passes: the caller logs it, the doubt stays in memory)."""
        self._own()
        fd = paths.open_own(self.path, "audit doubts file", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, encode(d))
        finally:
            os.close(fd)

    def write(self, doubts: list[dict[str, Any]]) -> None:
        """This process's doubts, all of them, in place of what its file held (none: the file goes)."""
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
            os.write(fd, b"".join(encode(d) for d in doubts))
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def adopt(self) -> list[dict[str, Any]]:
        """The doubts of the processes that ended with some unsettled, now this process's (see the module docstring)."""
        if not self.folder.is_dir():
            return []
        got: list[dict[str, Any]] = []
        for lock in sorted(self.folder.glob("*.lock")):
            other = lock.name[: -len(".lock")]
            if other == self.id:
                continue
            try:
                got += self._adopt_one(lock, self.folder / f"{other}.jsonl")
            except (OSError, CodemoatError) as e:
                log.error("could not take over another server's refused answers to look up (%s): %s", lock, e)
        return got

    def _adopt_one(self, lock: Path, data: Path) -> list[dict[str, Any]]:
        fd = paths.open_own(lock, "audit doubts lock", os.O_RDWR)
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
            try:
                raw = paths.read_own(data, "audit doubts file", MAX_FILE)
            except FileNotFoundError:
                raw = b""
            doubts = []
            for i, line in enumerate(raw.splitlines(), 1):
                if (d := decode(line)) is None:
                    log.error("%s line %d is not a refused answer to look up: skipped", data, i)
                else:
                    doubts.append(d)
            for d in doubts:
                self.add(d)  # in this process's file before the other's goes
            with contextlib.suppress(FileNotFoundError):
                os.unlink(data)
            os.unlink(lock)
            if doubts:
                log.warning(
                    "%d refused answers whose audit record may be in the chain, left by a server that ended (%s), "
                    "will be looked up by this one",
                    len(doubts),
                    lock.name,
                )
            return doubts
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release this process's lock: its file stays for the next process to adopt if it holds doubts, else both go."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            if not self.path.exists():
                os.unlink(self.folder / f"{self.id}.lock")
        except OSError:
            pass
        finally:
            os.close(fd)
