"""Console page render time and `usage report` time over a large history, side by side with the same
pages over an empty database, and the usage report's SQL aggregation beside the same numbers
computed by reading every row into Python.

Data (SQLite under a scratch $CODEMOAT_HOME): --records audit records (default 1,000,000, written in
bulk: the chain's hashes are not valid, which no page here reads), --events completions with one
`view` event each and a `select` for 27% of them (default 100,000), from 200 users over 30 days.
Pages are fetched through the real app (`create_app`, the trust layer's audit middleware included)
with a signed-in session, --reps times each after one warm-up; p50 and p95 per page.

    .venv/bin/python bench/console.py [--records 1000000] [--events 100000] [--reps 15]

Writes bench/results/console.md. Targets (issue 20): page p95 <= 300 ms, usage report <= 2 s.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _results import write_in_place  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "console.md"
PAGES = ("/admin", "/admin/people", "/admin/audit", "/admin/audit?user=u7&status=200", "/admin/costs", "/admin/model")
LANGS = ("python", "typescript", "go", "java", "rust", "unknown")


def fill(engine, records: int, events: int) -> None:
    import sqlalchemy as sa

    from codemoat.audit.chain import records as rec
    from codemoat.usage.tables import completions, events as ev

    now = time.time()
    rnd = random.Random(7)
    with engine.begin() as c:
        batch = []
        for i in range(1, records + 1):
            ts = now - (records - i) * (30 * 86400 / records)
            batch.append(
                {
                    "seq": i,
                    "ts_us": int(ts * 1e6),
                    "kind": "request",
                    "user": f"u{i % 200}",
                    "token_id": "tok_x",
                    "route": "/v1/completions",
                    "protocol": "tabby",
                    "model": "m",
                    "repos": "[]",
                    "snippets": "[]",
                    "prompt_tokens": 900,
                    "completion_tokens": 20,
                    "latency_ms": 80.0,
                    "status": 200 if i % 50 else 429,
                    "client": "127.0.0.1",
                    "detail": '{"method": "POST"}',
                    "prev_hash": "0" * 64,
                    "hash": "0" * 64,
                }
            )
            if len(batch) == 50_000:
                c.execute(rec.insert(), batch)
                batch.clear()
        if batch:
            c.execute(rec.insert(), batch)
        comp, evs = [], []
        for i in range(events):
            ts = now - rnd.random() * 30 * 86400
            day = time.strftime("%Y-%m-%d", time.gmtime(ts))
            user, lang, cid = f"u{rnd.randrange(200)}", LANGS[i % len(LANGS)], f"cmpl-{i:024x}"
            comp.append(
                {
                    "completion_id": cid,
                    "ts": ts,
                    "day": day,
                    "user": user,
                    "kind": "completion" if i % 20 else "chat",
                    "language": lang,
                    "protocol": "tabby",
                    "prompt_tokens": 900,
                    "completion_tokens": 20,
                    "latency_ms": rnd.uniform(30, 400),
                    "retrieval": i % 2 == 0,
                    "status": 200,
                    "chars": 40,
                    "lines": 2,
                    "first_line_chars": 20,
                }
            )
            base = {
                "ts": ts,
                "day": day,
                "user": user,
                "completion_id": cid,
                "choice_index": 0,
                "protocol": "tabby",
                "matched": True,
                "language": lang,
                "chars": 40,
                "lines": 2,
                "select_kind": None,
            }
            evs.append({**base, "type": "view"})
            if rnd.random() < 0.27:
                evs.append({**base, "type": "select"})
        if comp:
            c.execute(completions.insert(), comp)
            c.execute(ev.insert(), evs)
    if records:  # a signed head over the bulk rows, so that the server appends after them (their hashes stay unchecked)
        from codemoat.audit.chain import head, tip
        from codemoat.audit.log import AuditLog

        row = AuditLog(engine)._signed_head(records, "0" * 64, 0, int(now * 1e6))
        with engine.begin() as c:
            c.execute(head.insert().values(id=1, **row))
            c.execute(tip.update().where(tip.c.id == 1).values(seq=records, hash="0" * 64))  # the chain goes on from there
    with engine.begin() as c:
        from codemoat.usage.rollup import rebuild

        rebuild(c)  # what migration u002 does for rows written before it (the server keeps it as it writes)
        c.execute(sa.text("ANALYZE"))


def timed(fn, reps: int) -> tuple[float, float]:
    fn()  # warm-up
    xs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t0) * 1000)
    xs.sort()
    return statistics.median(xs), xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def measure(home: Path, records: int, events: int, reps: int) -> dict[str, tuple[float, float]]:
    os.environ["CODEMOAT_HOME"] = str(home)
    home.mkdir(mode=0o700)
    from fastapi.testclient import TestClient

    from codemoat.accounts import Accounts
    from codemoat.config import Settings
    from codemoat.db import open_db
    from codemoat.engines.holder import ModelHolder
    from codemoat.serve.app import create_app
    from codemoat.usage import report

    url = f"sqlite:///{home / 'codemoat.db'}"
    engine = open_db(url)
    t0 = time.perf_counter()
    fill(engine, records, events)
    print(f"  filled {records:,} records and {events:,} completions in {time.perf_counter() - t0:.0f} s", flush=True)
    accounts = Accounts(engine)
    for u in range(200):
        accounts.add_user(f"u{u}", ["eng"] if u % 2 else ["eng", "web"])
    _, admin = accounts.create_token("root", user="root", scopes=("admin",))
    app = create_app(Settings(), holder=ModelHolder("bench-model"), accounts=accounts)
    out: dict[str, tuple[float, float]] = {}
    with TestClient(app) as c:
        import re

        form = c.get("/admin/signin")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        assert c.post("/admin/signin", data={"csrf": csrf, "token": admin}, follow_redirects=False).status_code == 303
        for p in PAGES:
            assert c.get(p).status_code == 200, p
            out[p] = timed(lambda p=p: c.get(p), reps)
            print(f"  {p}: p50 {out[p][0]:.0f} ms, p95 {out[p][1]:.0f} ms", flush=True)
    since = time.time() - 30 * 86400  # mid-day: the first day's rows are read from the raw tables
    for by in ("day", "user", "language"):
        out[f"usage report --by {by} (SQL)"] = timed(lambda by=by: report(engine, by=by, since=since), max(3, reps // 3))
    out["usage report --by language (the same SQL over the raw tables, rollup=False)"] = timed(
        lambda: report(engine, by="language", since=since, rollup=False), 2
    )
    out["usage report --by language (rows read into Python)"] = timed(lambda: python_report(engine, since), 2)
    if records or events:
        for name, ms in writes(engine).items():
            out[name] = (ms, ms)
    engine.dispose()
    return out


def writes(engine, n: int = 1000) -> dict[str, float]:
    """µs per write (a completion, then its view event) with the roll-up kept, and with the rows alone."""
    from dataclasses import dataclass, field

    import codemoat.usage.rollup as rollup
    from codemoat.usage import UsageStore

    @dataclass
    class Facts:
        protocol: str = "tabby"
        prompt_tokens: int = 900
        completion_tokens: int = 20
        snippets: list = field(default_factory=list)
        completion_text: str = "x = 1\n"
        event: str | None = None
        completion_id: str | None = None
        choice_index: int | None = None
        select_kind: str | None = None
        language: str | None = "a.py"

    store, saved, out = UsageStore(engine), (rollup.add_completion, rollup.add_event), {}
    try:
        for rnd in range(2):
            for kept in (True, False):
                rollup.add_completion, rollup.add_event = saved if kept else (lambda *a: None, lambda *a: None)
                t0 = time.perf_counter()
                for i in range(n):
                    cid = f"cmpl-{rnd}{int(kept)}{i:022x}"
                    store.record(f"w{i % 50}", "/v1/completions", 200, 80.0, Facts(completion_id=cid))
                    store.record_event(f"w{i % 50}", "view", completion_id=cid)
                ms = (time.perf_counter() - t0) / (2 * n) * 1e6  # µs
                name = "one usage write, µs (completion or event), roll-up kept" if kept else "one usage write, µs, rows alone"
                out[name] = min(out.get(name, ms), ms)
    finally:
        rollup.add_completion, rollup.add_event = saved
    return out


def python_report(engine, since: float) -> dict:
    """The reference: the same per-language numbers by reading every row."""
    import sqlalchemy as sa

    from codemoat.usage.tables import completions, events

    rows: dict[str, list[int]] = {}
    with engine.connect() as c:
        for r in c.execute(sa.select(completions).where(completions.c.ts >= since)):
            rows.setdefault(r.language, [0, 0, 0])[0] += 1
        for r in c.execute(sa.select(events).where(events.c.ts >= since)):
            x = rows.setdefault(r.language, [0, 0, 0])
            x[1 if r.type == "view" else 2] += 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        print("empty database:")
        empty = measure(Path(tmp) / "empty", 0, 0, a.reps)
    from codemoat import db

    db._migrated.clear()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{a.records:,} audit records, {a.events:,} completions and their events:")
        full = measure(Path(tmp) / "full", a.records, a.events, a.reps)
    lines = [
        "# bench/console.py: console pages and usage reports over a large history",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} from other work on the same machine (times are inflated by it), SQLite.",
        f"`.venv/bin/python bench/console.py --records {a.records} --events {a.events} --reps {a.reps}`: each page through the real app "
        "(trust layer and audit middleware included), signed in; one warm-up, then the reps. Targets: page p95 <= 300 ms, "
        "usage report <= 2 s.",
        "",
        f"| what | empty p50 ms | empty p95 ms | {a.records:,} records + {a.events:,} completions p50 ms | p95 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in full:
        e = f"{empty[k][0]:.0f} | {empty[k][1]:.0f}" if k in empty else "- | -"
        lines.append(f"| {k} | {e} | {full[k][0]:.0f} | {full[k][1]:.0f} |")
    lines += [
        "",
        "Overview, People, Costs and the usage report read the daily roll-up (`usage_daily` per day x user x language x "
        "protocol, `usage_daily_lang` per day x language x protocol, `usage_daily_users` per day x user, "
        "`usage_latency_daily`, `usage_hourly`: kept in the same transaction as each usage row); the pages ask for whole "
        "UTC days, which the roll-up answers alone, and a report since a time mid-day reads that day's rows from the raw "
        "tables. The row 'the same SQL over the raw tables' is the roll-up's reference (tests/usage/test_rollup.py), "
        "not the code before the roll-up, which grouped each raw table directly (see its numbers below, from its own run). "
        "The two write rows are µs per write, not ms (the better of two rounds of 1,000 completions and 1,000 events, "
        "each its own transaction), p50 and p95 columns alike. "
        "The Audit page reads one page of records newest first through the primary key, and looks for alerts "
        "(alarms, 429s, blocked secrets) among the newest 50,000 records only; Overview and the usage report aggregate "
        "with GROUP BY in the database, never by reading rows into Python (the last row shows what that would cost).",
        "",
    ]
    # the earlier run's numbers ("## Before the roll-up") and any other section stay, for the side by side
    write_in_place(RESULTS, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
