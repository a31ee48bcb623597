"""Rotating the audit log: archive every record, checkpoint and the head, and start a new chain."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..errors import CodemoatError
from .chain import BODY_FIELDS, GENESIS, SignedHead, body_hash, checkpoints, head, link_hash, records, tip
from .heads import rotation_number, sign_tip
from .rows import normalise


def rotate(log: Any, archive: Path, *, now: float | None = None) -> dict[str, Any]:
    """Move every record, checkpoint and the head into `archive` (JSON lines) and start a new chain.

    For retention, and to resume after tampering has been investigated. The new chain's first
    record (kind `rotation`, signed like any other) holds the archive's SHA-256, the number of
    records moved, the old head's hash and what `verify` said of the old chain, so the archive
    stays anchored to the live log, and its number (`rotation`: one past the rotated chain's, which
    writers compare instead of clocks: `audit.heads.Mine`). `now`: the time the rotation record and its
    head are stamped with (seconds; default this host's clock, which may be behind the replicas')."""
    rep = log.verify()
    if archive.exists():
        raise CodemoatError(f"{archive} already exists: choose a new archive file")
    digest = hashlib.sha256()
    _ = log.signer  # load the key before the transaction takes the database's write lock
    try:  # private from its first byte (it holds the records), new, and never written through a link
        fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise CodemoatError(f"cannot create the archive {archive}: {e.strerror}") from None
    f = os.fdopen(fd, "w", encoding="utf-8")  # closes `fd` from here on
    committing = False
    try:
        with log._lock:
            with log.engine.begin() as c, f:
                # The tip first: appends wait from here until the new chain is committed (PostgreSQL: the chain's
                # trigger locks the tip; SQLite: this write begins the transaction with the write lock, which
                # sqlite3 takes only at the first write). Taken later (a1ee9fa: at the tip's reset), an append
                # committed after the records were read and deleted was left behind the new chain, in no archive.
                c.execute(_TAKE_TIP)

                def out(obj: dict[str, Any]) -> None:
                    line = (json.dumps(obj, ensure_ascii=False, default=str) + "\n").encode()
                    digest.update(line)
                    f.write(line.decode())

                out({"entry": "archive", "format": "codemoat-audit-archive-v1", "verify": rep.to_dict()})
                n, number = 0, 1
                for r in c.execute(sa.select(records).order_by(records.c.seq)):
                    out({"entry": "record", **r._asdict()})
                    n += 1
                    if r.seq == 1:
                        number = rotation_number(r.kind, r.detail) + 1
                for cp in c.execute(sa.select(checkpoints).order_by(checkpoints.c.seq)):
                    out({"entry": "checkpoint", **cp._asdict()})
                h = c.execute(sa.select(head).where(head.c.id == 1)).first()
                if h is not None:
                    out({"entry": "head", **h._asdict()})
                for t in (records, checkpoints, head):
                    c.execute(t.delete())
                c.execute(tip.update().where(tip.c.id == 1).values(seq=0, hash=GENESIS))
                detail = {
                    "archive": str(archive),
                    "archive_sha256": digest.hexdigest(),
                    "records": n,
                    "previous_head": h.hash if h is not None else None,
                    "previous_ok": rep.ok,
                    "previous_problem": rep.problem,
                    "rotation": number,
                }
                # The rotation record is the new chain's record 1 and its head is signed in this same
                # transaction: a replica serving meanwhile (its appends wait on the tip while this runs) must
                # find the chain starting with the rotation and a signed head, never an empty or unsigned new
                # chain it would take for a deleted one.
                _first_record(c, normalise("rotation", {"detail": detail, "ts": now}))
                signed, head_row, mine = sign_tip(c, log.signer, checkpoint_every=log.checkpoint_every, now=now)
                # the archive on disk, its name too, before the commit deletes the records it holds: a crash after the
                # commit left them in neither place (the file's pages were still in the page cache)
                f.flush()
                os.fsync(f.fileno())
                _fsync_dir(archive.parent)
                if log.head_file is not None and log.head_file.exists():
                    _empty_head_file(log.head_file)
                committing = True  # from here the commit: failing, it may still have happened (a connection lost)
            log._healthy, log.failure = True, None
            log._signed_seq, log._last_seq, log._seen_head, log._unsigned_since = 0, 0, False, None
            log._mine, log._owed = None, None  # a head owed for served records: they are in the archive
            log._signed(signed, head_row, mine)
            log._last_seq = signed
    except BaseException:
        f.close()
        if not committing:  # refused before the commit: the records are all still in the database
            with contextlib.suppress(OSError):
                archive.unlink()  # ours (O_EXCL): empty or part of them; left, it blocked a retry ("already exists")
        # a commit that failed may have deleted them (PostgreSQL's connection lost after it committed): the archive,
        # whole and fsynced, stays; `audit verify` says which happened
        raise
    if head_row is not None:
        log._write_head_file(head_row)
    if log.verified_file is not None:  # the operator started a new chain: the verifier follows it
        from . import trusted

        with log.engine.connect() as c:
            row = c.execute(sa.select(head).where(head.c.id == 1)).first()
        trusted.remember(log.verified_file, SignedHead.from_mapping(row._asdict()), log.public_key(), reset=True)
    return detail


def _empty_head_file(path: Path) -> None:
    """Empty the head file in place (writers keep their open descriptors). A link or FIFO put at its name is left
    alone, for `verify` to name (followed, it truncated the file the link named)."""
    from ..paths import open_own

    try:
        fd = open_own(path, "audit head file", os.O_WRONLY, error=OSError)
    except OSError:
        return
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems (FUSE, CIFS) cannot fsync a folder: the file's own fsync is what they give
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


_TAKE_TIP = sa.text("UPDATE audit_tip SET seq = seq WHERE id = 1")  # a write that changes nothing


def _first_record(c: sa.Connection, row: dict[str, Any]) -> None:
    """Write `row` as the chain's first record in transaction `c` (the tip was just reset)."""
    bh = body_hash(row)
    if c.dialect.name == "postgresql":  # the chain's trigger numbers and links it
        cols = (*BODY_FIELDS, "hash")
        sql = "INSERT INTO audit_records ({}) VALUES ({})".format(
            ", ".join(f'"{k}"' for k in cols), ", ".join(f":{k}" for k in cols)
        )
        c.execute(sa.text(sql), {**{k: row[k] for k in BODY_FIELDS}, "hash": bh})
        return
    row.update(seq=1, prev_hash=GENESIS, hash=link_hash(1, GENESIS, bh))
    c.execute(records.insert().values(**row))
    c.execute(tip.update().where(tip.c.id == 1).values(seq=1, hash=row["hash"]))
