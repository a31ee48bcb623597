"""Verifying the audit log: walk the chain, the checkpoints and the head, and name the first bad record.

What each check catches (see `audit.chain` for how records are chained and signed):

* a gap in sequence numbers: a deleted record;
* a record whose hash does not match its contents: an edit;
* a record that does not link to the one before: an edit that was re-hashed, or an insertion
  (the bad record is the one before the break);
* a stretch that no longer matches its signed checkpoint or the signed head: a rewritten chain;
* checkpoints whose own chain breaks, or a checkpoint the signed head names that is gone: a
  deleted checkpoint (all of them included);
* a signed checkpoint, head or head-file copy beyond the last record: truncation;
* a log that is not a continuation of a head verified before (`audit.trusted`): a rollback, an
  emptied log, or a replaced one, even when every signature in it is valid.

Problems are collected with the first record they implicate; the report names the smallest.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from . import signing, trusted
from .chain import GENESIS, HEAD_SLOT, SignedHead, checkpoint_message, checkpoints, hash_matches, head, records
from .rows import iso_time


@dataclass
class VerifyReport:
    ok: bool
    records: int
    checkpoints: int
    head_seq: int | None
    first_bad: int | None = None
    problem: str | None = None
    key_id: str | None = None
    #: the remembered heads this log was found consistent with (or checked against), as "file: record N"
    trusted: list[str] = field(default_factory=list)
    #: something the reader should know that does not make the log bad
    warning: str | None = None
    #: records after the signed head (not signed yet: whoever writes the database could cut or rewrite them)
    unsigned: int = 0
    #: when the oldest of them was written (ISO 8601 UTC), None when there are none
    unsigned_since: str | None = None
    #: the signed head as read (what a verifier remembers when the log is OK)
    head: SignedHead | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head_hash"] = d.pop("head")["hash"] if self.head else None
        return d


def verify(
    engine: Engine,
    public_key: bytes | None,
    *,
    head_file: Path | None = None,
    remembered: Path | None = None,
    trusted_head: Path | None = None,
    allowance: int = 0,
) -> VerifyReport:
    """Walk the chain, the checkpoints and the head; name the first bad record.

    `head_file` is the writer's copy of the signed head; `remembered` the head `audit verify` last
    accepted, `trusted_head` one exported earlier (a missing file is skipped: the caller checks
    that a file it was given exists). `allowance`: how many records the writers may leave after
    the signed head (`audit.heads.tail_allowance`); more is a problem, fewer a warning."""
    kid = signing.key_id(public_key) if public_key else None
    problems: list[tuple[int, str]] = []

    def bad_sig(what: str, key_id: str, message: bytes, sig: str) -> str | None:
        if public_key is None:
            return f"{what} cannot be checked: this machine has no audit-signing key"
        if key_id != kid:
            return f"{what} is signed by key {key_id}, not this machine's audit key {kid}"
        if not signing.verify(public_key, message, sig):
            return f"{what} has an invalid signature"
        return None

    known: list[tuple[str, SignedHead]] = []  # heads verified before, each with its label
    sources = [
        (f"the head `audit verify` last accepted ({remembered})", remembered),
        (f"the exported head {trusted_head}", trusted_head),
    ]
    for label, path in sources:
        if path is None:
            continue
        try:
            t = trusted.load(path, own=path == remembered)
        except ValueError as e:
            problems.append((1, f"{label} cannot be used: {e}; if the log is known good, remove that file"))
            continue
        if t is None:
            continue
        why = bad_sig(label, t.key_id, t.message(), t.signature)
        if why:
            problems.append((1, why))
        else:
            known.append((label, t))

    # the head file before the database: writers write it after their commit, so what it names is in the
    # snapshot read next (read after, a head signed meanwhile looked like a truncated log)
    head_raw = _read_head_file(head_file) if head_file is not None else None
    with engine.connect() as c:
        _one_snapshot(c)
        cps = c.execute(sa.select(checkpoints).order_by(checkpoints.c.seq)).all()
        row_h = c.execute(sa.select(head).where(head.c.id == 1)).first()
        try:
            h = SignedHead.from_mapping(row_h._asdict()) if row_h is not None else None
        except ValueError as e:
            return VerifyReport(
                ok=False,
                records=0,
                checkpoints=len(cps),
                head_seq=None,
                first_bad=1,
                problem=f"the signed head row is damaged: {e}",
                key_id=kid,
            )
        prev_cp = 0
        for cp in cps:
            why = bad_sig(
                f"checkpoint at record {cp.seq}",
                cp.key_id,
                checkpoint_message(cp.seq, cp.hash, cp.prev_checkpoint, cp.ts_us, cp.reason),
                cp.signature,
            )
            if why:
                problems.append((prev_cp + 1, why))
                break
            if cp.prev_checkpoint != prev_cp:
                problems.append(
                    (
                        min(prev_cp, cp.prev_checkpoint) + 1,
                        f"the checkpoint at record {cp.prev_checkpoint} was deleted (the checkpoint at {cp.seq} follows it)",
                    )
                )
                break
            prev_cp = cp.seq
        cp_by_seq = {cp.seq: cp for cp in cps}
        cp_prev = {cp.seq: cp.prev_checkpoint for cp in cps}

        expected, prev_hash, n = 1, GENESIS, 0
        hashes_at: dict[int, str] = {}
        first_record: dict[str, Any] | None = None
        tail_from = (h.seq if h is not None else 0) + 1
        tail, tail_ts = 0, None
        want = set(cp_by_seq) | ({h.seq} if h is not None else set()) | {t.seq for _, t in known}
        for r in c.execution_options(yield_per=2000).execute(sa.select(records).order_by(records.c.seq)):
            row = r._asdict()
            n += 1
            seq = row["seq"]
            if seq != expected:
                what = (
                    f"record {expected} is missing (deleted)"
                    if seq == expected + 1
                    else f"records {expected}–{seq - 1} are missing (deleted)"
                )
                problems.append((expected, what))
                break
            if row["prev_hash"] != prev_hash:
                # Record seq-1 was re-hashed after an edit, or inserted (seqs renumbered): either way
                # the boundary is where the chain breaks.
                problems.append(
                    (
                        max(1, seq - 1),
                        f"the chain breaks between records {seq - 1} and {seq}: record {seq - 1} was altered and re-hashed, or a record was inserted or deleted there",
                    )
                )
                break
            if not hash_matches(row):
                problems.append((seq, f"record {seq} was edited (its contents no longer match its hash)"))
                break
            cp = cp_by_seq.get(seq)
            if cp is not None and cp.hash != row["hash"]:
                start = cp_prev[seq] + 1
                problems.append(
                    (start, f"records {start}–{seq} were rewritten (they no longer match the signed checkpoint at record {seq})")
                )
                break
            if seq == 1:
                first_record = row
            if seq == tail_from:
                tail_ts = row["ts_us"]
            if seq in want:
                hashes_at[seq] = row["hash"]
            prev_hash, expected = row["hash"], seq + 1
        else:
            last = expected - 1
            # A rollback is named before whatever else it left behind (ties go to the first problem).
            rollbacks = [
                p
                for label, t in known
                if (
                    p := trusted.check(
                        t, label, last=last, hash_at=hashes_at, checkpoint_seqs=set(cp_by_seq), first_record=first_record
                    )
                )
                is not None
            ]
            problems[:0] = rollbacks
            beyond = [cp.seq for cp in cps if cp.seq > last]
            if beyond:
                problems.append(
                    (
                        last + 1,
                        f"the log was truncated: a signed checkpoint covers record {beyond[-1]} but the log ends at record {last}",
                    )
                )
            tail = last - (h.seq if h is not None else 0)
            if h is None:
                # a head file holding a head, or a head verified before, says one was signed: records within
                # the allowance (a new log's first batch, committed before its first head) are no excuse then
                if last and (cps or last > allowance or known or _holds_a_head(head_raw)):
                    problems.append((last, "the signed head is missing (records exist but nothing signs the end of the log)"))
            else:
                why = bad_sig("the head", h.key_id, h.message(), h.signature)
                if why:
                    problems.append((min(h.seq, last) or 1, why))
                elif h.seq > last:
                    problems.append(
                        (
                            last + 1,
                            f"the log was truncated: the signed head names record {h.seq} but the log ends at record {last}",
                        )
                    )
                elif tail > allowance:
                    problems.append(
                        (
                            h.seq + 1,
                            f"records {h.seq + 1}–{last} were added after the signed head"
                            + (f" (more than the {allowance} the writers leave unsigned)" if allowance else ""),
                        )
                    )
                elif h.seq <= last and hashes_at.get(h.seq) != h.hash:
                    start = h.last_checkpoint + 1 if h.last_checkpoint < h.seq else h.seq
                    problems.append((start, f"records {start}–{h.seq} were rewritten (they no longer match the signed head)"))
                elif h.last_checkpoint and h.last_checkpoint not in cp_by_seq:
                    what = "every signed checkpoint was deleted" if not cps else "it was deleted"
                    problems.append(
                        (
                            h.last_checkpoint,
                            f"the checkpoint at record {h.last_checkpoint} named by the signed head is missing ({what})",
                        )
                    )
                elif cps and cps[-1].seq != h.last_checkpoint:
                    problems.append(
                        (
                            h.last_checkpoint + 1,
                            f"a signed checkpoint at record {cps[-1].seq} is newer than the one the signed head names "
                            f"({h.last_checkpoint}): the head was put back to an older one",
                        )
                    )
            if head_file is not None:
                problems.extend(_check_head_file(head_file, head_raw, public_key, kid, last, c))

    unsigned = max(0, tail)
    report = VerifyReport(
        ok=not problems,
        records=n,
        checkpoints=len(cps),
        head_seq=h.seq if h is not None else None,
        key_id=kid,
        trusted=[f"{label}: record {t.seq}" for label, t in known],
        head=h,
        unsigned=unsigned,
    )
    if unsigned and tail_ts is not None:
        # an unsigned record's time is whatever was written there (text, a year past 9999): named, never a crash
        report.unsigned_since = iso_time(tail_ts)
        age = f"{max(0.0, time.time() - tail_ts / 1_000_000):.0f} s old" if report.unsigned_since else f"time {tail_ts!r}"
        report.warning = (
            f"records {last - unsigned + 1}–{last} ({unsigned}, the oldest {age}) follow the signed head: "
            "not signed yet, so whoever writes the database could cut or rewrite them unnoticed"
        )
    if problems:
        report.first_bad, report.problem = min(problems, key=lambda p: p[0])
    return report


def _read_head_file(path: Path) -> bytes | ValueError | None:
    """The head file's bytes; None when there is none, the error when it cannot be read as the writer's own."""
    from ..paths import read_own

    try:  # the writer's own file: a FIFO or a link put in its place is a problem, not a hang or a redirect
        return read_own(path, "audit head file", error=ValueError)
    except FileNotFoundError:
        return None
    except ValueError as e:
        return e


def _holds_a_head(raw: bytes | ValueError | None) -> bool:
    """Whether the head file's bytes hold anything written (a rotation empties it; `_check_head_file` judges it)."""
    return isinstance(raw, bytes) and bool(raw.strip(b"\x00 \n"))


def _check_head_file(
    path: Path, raw: bytes | ValueError | None, public_key: bytes | None, kid: str | None, last: int, c
) -> list[tuple[int, str]]:
    if raw is None:
        return []
    if isinstance(raw, ValueError):
        return [(1, str(raw))]
    slots, empty = [], 0
    for i in range(0, len(raw), HEAD_SLOT):
        if not raw[i : i + HEAD_SLOT].strip(b"\x00 \n"):
            empty += 1  # never written (a new chain has only filled the other slot)
            continue
        try:
            slots.append(SignedHead.from_mapping(json.loads(raw[i : i + HEAD_SLOT])))
        except ValueError:
            # Slots are sector-sized and sector-aligned, so a crash does not tear them; a damaged
            # slot would otherwise let someone fall back to the older head and drop a record.
            return [(1, f"the head file {path} is damaged (slot {i // HEAD_SLOT})")]
    if not slots:
        return []
    fh = max(slots, key=lambda x: x.seq)
    if empty and fh.seq > 1:
        return [(1, f"the head file {path} has a blank slot after record {fh.seq}")]
    if fh.key_id != kid:
        return [(1, f"the head file {path} is signed by key {fh.key_id}, not this machine's audit key {kid}")]
    if public_key is None or not signing.verify(public_key, fh.message(), fh.signature):
        return [(1, f"the head file {path} has an invalid signature")]
    if fh.seq > last:
        return [(last + 1, f"the log was truncated: the head file names record {fh.seq} but the log ends at record {last}")]
    got = c.execute(sa.select(records.c.hash).where(records.c.seq == fh.seq)).scalar()
    if got != fh.hash:
        return [(1, f"records up to {fh.seq} were rewritten (record {fh.seq} no longer matches the head file)")]
    return []


def _one_snapshot(c: sa.Connection) -> None:
    """Read the checkpoints, the head and the records as of one instant, though writers go on (`audit verify`
    beside a busy server). Read one statement after another, a head signed in between named a checkpoint
    not read yet ('deleted'), and records appended after the head was read were an unsigned tail past the
    allowance (SQLite with `sign_every = 1` allows none): verify failed on an honest log."""
    if c.dialect.name == "postgresql":
        c.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
    elif c.dialect.name == "sqlite":  # sqlite3 begins a transaction only before a write: the reads' one snapshot
        c.exec_driver_sql("BEGIN")
