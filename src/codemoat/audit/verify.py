"""Verifying the audit log: walk the chain, the checkpoints and the head, and name the first bad record.

What each check catches (see `audit.log` for how records are chained and signed):

* a gap in sequence numbers: a deleted record;
* a record whose hash does not match its contents: an edit;
* a record that does not link to the one before: an edit that was re-hashed, or an insertion
  (the bad record is the one before the break);
* a stretch that no longer matches its signed checkpoint or the signed head: a rewritten chain;
* checkpoints whose own chain breaks: a deleted checkpoint;
* a signed checkpoint, head or head-file copy beyond the last record: truncation.

Problems are collected with the first record they implicate; the report names the smallest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..errors import CodemoatError
from . import signing
from .log import GENESIS, _SLOT, checkpoint_message, checkpoints, head, head_message, record_hash, records

if TYPE_CHECKING:
    from .log import AuditLog


@dataclass
class VerifyReport:
    ok: bool
    records: int
    checkpoints: int
    head_seq: int | None
    first_bad: int | None = None
    problem: str | None = None
    key_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify(log: "AuditLog", public_key: bytes | None = None) -> VerifyReport:
    """Walk the chain, the checkpoints and the head; name the first bad record."""
    if public_key is None:
        try:
            public_key = signing.load_signer(create=False).public_bytes if log._signer is None else log._signer.public_bytes
        except CodemoatError:
            public_key = None
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

    with log.engine.connect() as c:
        cps = c.execute(sa.select(checkpoints).order_by(checkpoints.c.seq)).all()
        h = c.execute(sa.select(head).where(head.c.id == 1)).first()
        prev_cp = 0
        for cp in cps:
            why = bad_sig(f"checkpoint at record {cp.seq}", cp.key_id, checkpoint_message(cp.seq, cp.hash, cp.prev_checkpoint, cp.ts_us, cp.reason), cp.signature)
            if why:
                problems.append((prev_cp + 1, why))
                break
            if cp.prev_checkpoint != prev_cp:
                problems.append((min(prev_cp, cp.prev_checkpoint) + 1, f"the checkpoint at record {cp.prev_checkpoint} was deleted (the checkpoint at {cp.seq} follows it)"))
                break
            prev_cp = cp.seq
        cp_by_seq = {cp.seq: cp for cp in cps}
        cp_prev = {cp.seq: cp.prev_checkpoint for cp in cps}

        expected, prev_hash, n = 1, GENESIS, 0
        hashes_at: dict[int, str] = {}
        want = set(cp_by_seq) | ({h.seq} if h is not None else set())
        for r in c.execution_options(yield_per=2000).execute(sa.select(records).order_by(records.c.seq)):
            row = r._asdict()
            n += 1
            seq = row["seq"]
            if seq != expected:
                what = f"record {expected} is missing (deleted)" if seq == expected + 1 else f"records {expected}–{seq - 1} are missing (deleted)"
                problems.append((expected, what))
                break
            if row["prev_hash"] != prev_hash:
                # Record seq-1 was re-hashed after an edit, or inserted (seqs renumbered): either way
                # the boundary is where the chain breaks.
                problems.append((max(1, seq - 1), f"the chain breaks between records {seq - 1} and {seq}: record {seq - 1} was altered and re-hashed, or a record was inserted or deleted there"))
                break
            if record_hash(row) != row["hash"]:
                problems.append((seq, f"record {seq} was edited (its contents no longer match its hash)"))
                break
            cp = cp_by_seq.get(seq)
            if cp is not None and cp.hash != row["hash"]:
                start = cp_prev[seq] + 1
                problems.append((start, f"records {start}–{seq} were rewritten (they no longer match the signed checkpoint at record {seq})"))
                break
            if seq in want:
                hashes_at[seq] = row["hash"]
            prev_hash, expected = row["hash"], seq + 1
        else:
            last = expected - 1
            beyond = [cp.seq for cp in cps if cp.seq > last]
            if beyond:
                problems.append((last + 1, f"the log was truncated: a signed checkpoint covers record {beyond[-1]} but the log ends at record {last}"))
            if h is None:
                if last:
                    problems.append((last, "the signed head is missing (records exist but nothing signs the end of the log)"))
            else:
                why = bad_sig("the head", h.key_id, head_message(h.seq, h.hash, h.last_checkpoint, h.ts_us), h.signature)
                if why:
                    problems.append((min(h.seq, last) or 1, why))
                elif h.seq > last:
                    problems.append((last + 1, f"the log was truncated: the signed head names record {h.seq} but the log ends at record {last}"))
                elif h.seq < last:
                    problems.append((h.seq + 1, f"records {h.seq + 1}–{last} were added after the signed head"))
                elif hashes_at.get(h.seq) != h.hash:
                    start = h.last_checkpoint + 1 if h.last_checkpoint < h.seq else h.seq
                    problems.append((start, f"records {start}–{h.seq} were rewritten (they no longer match the signed head)"))
                elif cps and cps[-1].seq != h.last_checkpoint:
                    problems.append((h.last_checkpoint + 1, f"the checkpoint at record {h.last_checkpoint} named by the signed head is missing"))
            problems.extend(_check_head_file(log, public_key, kid, last, c))

    report = VerifyReport(ok=not problems, records=n, checkpoints=len(cps), head_seq=h.seq if h is not None else None, key_id=kid)
    if problems:
        report.first_bad, report.problem = min(problems, key=lambda p: p[0])
    return report

def _check_head_file(log: "AuditLog", public_key: bytes | None, kid: str | None, last: int, c) -> list[tuple[int, str]]:
    if log.head_file is None or not log.head_file.exists():
        return []
    raw = log.head_file.read_bytes()
    slots, empty = [], 0
    for i in range(0, len(raw), _SLOT):
        if not raw[i:i + _SLOT].strip(b"\x00 \n"):
            empty += 1  # never written (a new chain has only filled the other slot)
            continue
        try:
            fh = json.loads(raw[i:i + _SLOT])
            slots.append((fh, head_message(fh["seq"], fh["hash"], fh["last_checkpoint"], fh["ts_us"])))
        except (ValueError, KeyError, TypeError):
            # Slots are sector-sized and sector-aligned, so a crash does not tear them; a damaged
            # slot would otherwise let someone fall back to the older head and drop a record.
            return [(1, f"the head file {log.head_file} is damaged (slot {i // _SLOT})")]
    if not slots:
        return []
    fh, msg = max(slots, key=lambda x: x[0]["seq"])
    if empty and fh["seq"] > 1:
        return [(1, f"the head file {log.head_file} has a blank slot after record {fh['seq']}")]
    if fh.get("key_id") != kid:
        return [(1, f"the head file {log.head_file} is signed by key {fh.get('key_id')}, not this machine's audit key {kid}")]
    if public_key is None or not signing.verify(public_key, msg, fh.get("signature", "")):
        return [(1, f"the head file {log.head_file} has an invalid signature")]
    if fh["seq"] > last:
        return [(last + 1, f"the log was truncated: the head file names record {fh['seq']} but the log ends at record {last}")]
    got = c.execute(sa.select(records.c.hash).where(records.c.seq == fh["seq"])).scalar()
    if got != fh["hash"]:
        return [(1, f"records up to {fh['seq']} were rewritten (record {fh['seq']} no longer matches the head file)")]
    return []


