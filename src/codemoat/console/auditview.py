"""The audit page's reads: filtered records (newest first, one page; a record whose answer was withheld says so), and
the alerts worth a look: distillation alarms, quota refusals (429), requests refused for a secret and answers withheld
although their record is in the chain. SQL does the filtering."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from ..audit.chain import records
from ..audit.log import parse_since, to_public
from ..audit.reading import withheld_by
from ..errors import CodemoatError

PAGE = 100


@dataclass
class Filters:
    user: str = ""
    route: str = ""
    status: str = ""
    since: str = ""
    kind: str = ""

    @classmethod
    def of(cls, q: dict[str, str]) -> Filters:
        return cls(**{k: (q.get(k) or "").strip()[:256] for k in ("user", "route", "status", "since", "kind")})

    def where(self) -> list[Any]:
        for k, v in vars(self).items():  # PostgreSQL refuses a NUL in any text it is sent: a 500 (DataError), was
            if "\x00" in v:
                raise CodemoatError(f"{k}: a NUL character is in no audit record")
        conds: list[Any] = []
        if self.user:
            conds.append(records.c.user == self.user)
        if self.route:
            conds.append(records.c.route == self.route)
        if self.kind:
            conds.append(records.c.kind == self.kind)
        if self.status:
            # ASCII digits only: str.isdigit() is true of '²', which int() refuses (a ValueError: a 500)
            if not (self.status.isascii() and self.status.isdigit()) or not 100 <= int(self.status) <= 599:
                raise CodemoatError(f"status {self.status!r}: an HTTP status is a number from 100 to 599")
            conds.append(records.c.status == int(self.status))
        if self.since:
            start = parse_since(self.since)
            if start is not None:
                conds.append(records.c.ts_us >= int(start * 1_000_000))
        return conds

    def query(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v}


def page(engine: Engine, f: Filters, before: int | None = None, limit: int = PAGE) -> list[dict[str, Any]]:
    """One page of records matching `f`, newest first, older than `before` (a seq) when given. A request record that
    a later `withheld` record names carries that record's seq as `withheld_by`: its answer's client got a 503
    instead (`serve.late`), which the page says beside the status the record holds."""
    q = sa.select(records).where(*f.where())
    if before is not None:
        q = q.where(records.c.seq < before)
    q = q.order_by(records.c.seq.desc()).limit(limit)
    with engine.connect() as c:
        recs = [to_public(r._asdict()) for r in c.execute(q)]
        marks = withheld_by(c, {r["seq"] for r in recs if r.get("kind") == "request"})
    for r in recs:
        if r["seq"] in marks:
            r["withheld_by"] = marks[r["seq"]]
    return recs


def rows(engine: Engine, f: Filters):
    """Every record matching `f`, oldest first (for exports), streamed."""
    q = sa.select(records).where(*f.where()).order_by(records.c.seq)
    with engine.connect() as c:
        for r in c.execution_options(yield_per=1000).execute(q):
            yield to_public(r._asdict())


RECENT = 50_000  # alerts are looked for in the newest records only: the page stays fast on a long log


def alerts(engine: Engine, limit: int = 20) -> dict[str, list[dict[str, Any]]]:
    """Distillation alarms, quota refusals, secret refusals and withheld answers among the newest `RECENT` records,
    newest first."""
    out = {}
    with engine.connect() as c:
        top = int(c.execute(sa.select(sa.func.max(records.c.seq))).scalar() or 0)
    recent = records.c.seq > top - RECENT
    for name, cond in (
        ("alarms", records.c.kind == "alert"),
        ("quota", sa.and_(records.c.kind == "request", records.c.status == 429)),
        ("secrets", sa.and_(records.c.kind == "request", records.c.status == 400, records.c.detail.like('%"secrets"%'))),
        ("withheld", records.c.kind == "withheld"),
    ):
        with engine.connect() as c:
            rs = c.execute(sa.select(records).where(recent, cond).order_by(records.c.seq.desc()).limit(limit)).all()
        out[name] = [to_public(r._asdict()) for r in rs]
    return out


def detail_text(d: dict[str, Any]) -> str:
    return json.dumps(d, ensure_ascii=False, sort_keys=True) if d else ""
