"""Rotating the audit log: archive every record, checkpoint and the head, and start a new chain."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..errors import CodemoatError
from .chain import GENESIS, SignedHead, checkpoints, head, records, tip


def rotate(log: Any, archive: Path) -> dict[str, Any]:
    """Move every record, checkpoint and the head into `archive` (JSON lines) and start a new chain.

    For retention, and to resume after tampering has been investigated. The new chain's first
    record (kind `rotation`, signed like any other) holds the archive's SHA-256, the number of
    records moved, the old head's hash and what `verify` said of the old chain, so the archive
    stays anchored to the live log."""
    rep = log.verify()
    if archive.exists():
        raise CodemoatError(f"{archive} already exists: choose a new archive file")
    digest = hashlib.sha256()
    with log._lock:
        with log.engine.begin() as c, open(archive, "x", encoding="utf-8") as f:

            def out(obj: dict[str, Any]) -> None:
                line = (json.dumps(obj, ensure_ascii=False, default=str) + "\n").encode()
                digest.update(line)
                f.write(line.decode())

            out({"entry": "archive", "format": "codemoat-audit-archive-v1", "verify": rep.to_dict()})
            n = 0
            for r in c.execute(sa.select(records).order_by(records.c.seq)):
                out({"entry": "record", **r._asdict()})
                n += 1
            for cp in c.execute(sa.select(checkpoints).order_by(checkpoints.c.seq)):
                out({"entry": "checkpoint", **cp._asdict()})
            h = c.execute(sa.select(head).where(head.c.id == 1)).first()
            if h is not None:
                out({"entry": "head", **h._asdict()})
            for t in (records, checkpoints, head):
                c.execute(t.delete())
            c.execute(tip.update().where(tip.c.id == 1).values(seq=0, hash=GENESIS))
            if log.head_file is not None and log.head_file.exists():
                os.truncate(log.head_file, 0)  # in place: writers keep their open descriptors
        os.chmod(archive, 0o600)
        log._healthy, log.failure = True, None
        log._signed_seq, log._last_seq, log._seen_head, log._unsigned_since = 0, 0, False, None
    detail = {
        "archive": str(archive),
        "archive_sha256": digest.hexdigest(),
        "records": n,
        "previous_head": h.hash if h is not None else None,
        "previous_ok": rep.ok,
        "previous_problem": rep.problem,
    }
    log.append("rotation", detail=detail)
    log.sign()  # the new chain's first record signed at once: the verifier remembers that head
    if log.verified_file is not None:  # the operator started a new chain: the verifier follows it
        from . import trusted

        with log.engine.connect() as c:
            row = c.execute(sa.select(head).where(head.c.id == 1)).first()
        trusted.remember(log.verified_file, SignedHead.from_mapping(row._asdict()), log.public_key(), reset=True)
    return detail
