"""Audit logs for the tests that open their own on a database URL (SQLite or PostgreSQL)."""

from __future__ import annotations

from pathlib import Path


def open_log(url: str, home: Path, **kw):
    """An `AuditLog` on `url`, its head file in `home`, a checkpoint every 10 records unless `kw` says."""
    from codemoat.audit.log import AuditLog, head_file_for
    from codemoat.db import open_db

    kw.setdefault("checkpoint_every", 10)
    return AuditLog(open_db(url), head_file=head_file_for(url, home), **kw)


def fill(log, n: int, start: int = 0) -> list[int]:
    """Append `n` of alice's completions (prompt_tokens counting from `start`); their seqs."""
    return [log.append("request", user="alice", route="/v1/completions", status=200, prompt_tokens=start + i) for i in range(n)]
