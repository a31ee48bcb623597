"""Reading what an `AuditLog` wrote: records by time, kind and user, counts, exports (JSON lines, or CSV that no
spreadsheet runs), and verifying the chain (`audit.verify`) against the heads this machine accepted before. A mixin
of `AuditLog` (`audit.log`), which writes."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from ..errors import CodemoatError
from . import signing
from .chain import FIELDS, records
from .rows import to_public


class LogReading:
    """The reading half of `AuditLog`."""

    engine: Engine
    head_file: Path | None
    verified_file: Path | None
    _signer: signing.Signer | None
    tail_allowance: int  # `audit.head_signing`: how many unsigned records verify accepts after the head

    def records(
        self,
        *,
        since: float | None = None,
        kind: str | None = None,
        user: str | None = None,
        after_seq: int = 0,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> Iterator[dict[str, Any]]:
        q = sa.select(records).where(records.c.seq > after_seq)
        if since is not None:
            q = q.where(records.c.ts_us >= int(since * 1_000_000))
        if kind is not None:
            q = q.where(records.c.kind == kind)
        if user is not None:
            q = q.where(records.c.user == user)
        q = q.order_by(records.c.seq.desc() if newest_first else records.c.seq)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as c:
            for r in c.execution_options(yield_per=1000).execute(q):
                yield to_public(r._asdict())

    def count(self, kind: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(records)
        if kind is not None:
            q = q.where(records.c.kind == kind)
        with self.engine.connect() as c:
            return int(c.execute(q).scalar() or 0)

    def export(self, fmt: str = "jsonl", **filters: Any) -> Iterator[str]:
        """Records as JSON lines or CSV (with hashes, so an exported trail can be re-verified)."""
        if fmt == "jsonl":
            for r in self.records(**filters):
                yield json.dumps(r, ensure_ascii=False) + "\n"
        elif fmt == "csv":
            cols = ["seq", "time", *FIELDS[2:], "hash"]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            yield buf.getvalue()
            for r in self.records(**filters):
                buf.seek(0)
                buf.truncate()
                w.writerow({k: csv_cell(v) for k, v in r.items()})
                yield buf.getvalue()
        else:
            raise CodemoatError(f"unknown export format {fmt!r}: use jsonl or csv")

    # -- verifying ------------------------------------------------------------------
    def verify(self, public_key: bytes | None = None, *, trusted_head: Path | None = None):
        """Walk the chain, the checkpoints and the head; name the first bad record (see `audit.verify`).

        Also checks the log against the head verified before (`verified_file`) and an exported
        `trusted_head`; when the log is OK, `verified_file` moves on to the current head."""
        from . import trusted
        from .verify import verify

        if public_key is None:
            public_key = self.public_key()
        rep = verify(
            self.engine,
            public_key,
            head_file=self.head_file,
            remembered=self.verified_file,
            trusted_head=trusted_head,
            allowance=self.tail_allowance,
        )
        if rep.ok:  # the TPM's checkpoints and its monotonic counter, when this machine has a TPM
            from .tpm_checkpoint import check_report

            check_report(self.engine, rep)
        if rep.ok and rep.head is not None and self.verified_file is not None:
            try:
                trusted.remember(self.verified_file, rep.head, public_key)
            except OSError as e:  # the log is fine; only the memory of it could not be kept
                rep.warning = f"could not remember the verified head in {self.verified_file}: {e.strerror or e}"
        return rep

    def public_key(self) -> bytes | None:
        """The audit key's public half (None when this machine has no key yet)."""
        if self._signer is not None:
            return self._signer.public_bytes
        try:
            return signing.load_signer(create=False).public_bytes
        except CodemoatError:
            return None

    def withheld_for(self, seq: int) -> int | None:
        """The seq of the first `withheld` record that names record `seq`, None if none does (`withheld_by`)."""
        with self.engine.connect() as c:
            return withheld_by(c, {seq}).get(seq)


def csv_cell(v: Any) -> Any:
    """A record's value as an exported CSV cell (lists and objects as JSON) that no spreadsheet runs as a
    formula: text starting with = + - @, a tab or a carriage return (a retained prompt or completion can)
    gets a leading ' (OWASP, CSV injection). JSONL exports keep the text as it is."""
    if isinstance(v, (list, dict)):
        v = json.dumps(v)
    return "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v


def withheld_named(conn: Any, since_us: int) -> set[int]:
    """The seqs of request records that a `withheld` record written since `since_us` names: answers whose client got
    a 503 although their record is in the chain (`serve.late`). Readers that count answers leave them out."""
    q = sa.select(records.c.detail).where(records.c.ts_us >= since_us, records.c.kind == "withheld")
    return {n for (d,) in conn.execute(q) if (n := withheld_record(d)) is not None}


def withheld_by(conn: Any, seqs: set[int], limit: int = 10_000) -> dict[int, int]:
    """Of the records `seqs`, those a later `withheld` record names, with that record's seq (the first one, if the
    chain holds more): their answers were replaced by a 503 although the record is in the chain (`serve.late`). At
    most `limit` withheld records are read (a correction is rare: one per unconfirmed PostgreSQL commit)."""
    if not seqs:
        return {}
    q = (
        sa.select(records.c.seq, records.c.detail)
        .where(records.c.kind == "withheld", records.c.seq > min(seqs))
        .order_by(records.c.seq)
        .limit(limit)
    )
    out: dict[int, int] = {}
    for seq, d in conn.execute(q):
        if (n := withheld_record(d)) in seqs and n < seq:
            out.setdefault(n, seq)
    return out


def withheld_record(detail: Any) -> int | None:
    """The seq a `withheld` record's detail names (None if it names none)."""
    try:
        d = json.loads(detail) if isinstance(detail, str) else detail
        seq = d.get("record") if isinstance(d, dict) else None
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    except (ValueError, RecursionError):  # not JSON; nested deeper than the parser goes
        return None
