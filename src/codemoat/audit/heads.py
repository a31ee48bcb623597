"""Signing the audit chain: the signed head and checkpoints, every `sign_every` records, `sign_interval_ms`
after a record was left unsigned, and at shutdown.

Every record is linked (`audit.chain`) the moment it is written; what is batched is the Ed25519
signature over the chain's tip. `sign_tip` locks the signed head row, reads the tip, signs the
checkpoints due since the last one (every record whose seq is a multiple of `checkpoint_every`,
chained by `prev_checkpoint` as before) and a new head naming the tip. Signers take turns on the
head row, appenders on the tip row: a replica signing never holds up another one's appends.

The records after the signed head (the unsigned tail) can be cut or rewritten by whoever writes
the database, with no signature to betray it; the writers bound that tail (`sign_every` records,
`sign_interval_ms`), and `audit verify` reports its length and age and refuses a tail longer than
any writer leaves (`tail_allowance`). With `sign_every = 1` every append returns only after a head
naming its record is signed: on SQLite, in the record's own transaction, there is no tail; on
PostgreSQL the records of appends not returned yet are one, between their commit and their head's. When
that head cannot be signed (a database error after the commit), the appends return all the same (their
records are in the chain), and the writer appends nothing more until it has signed a head that still
holds them (`AuditLog._flush`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from ..db import fast_execute
from ..errors import CodemoatError
from . import signing
from .chain import HEAD_SLOT, SignedHead, checkpoint_message, head_message

log = logging.getLogger("codemoat.audit")


class AuditUnavailable(CodemoatError):
    """The audit log cannot take a record, so the request is refused."""

    status = 503
    code = "audit_unavailable"


# records one group commit may write (a bound on one transaction's size and on a waiter's wait)
MAX_BATCH = 256
# and the prompt and completion text it may carry (`audit.retain_text`), a record more at most: 256
# prompts of 8 MiB (server.max_body_mb) are 2 GiB, past the 1 GB PostgreSQL takes in one message, and
# a refused batch is a 503 for every request in it
MAX_BATCH_CHARS = 64 << 20


def text_chars(row: dict) -> int:
    """The retained text a normalised record carries (what MAX_BATCH_CHARS counts)."""
    return len(row.get("prompt_text") or "") + len(row.get("completion_text") or "")


def batch_full(n: int, chars: int) -> bool:
    """Whether a group commit of `n` records carrying `chars` of retained text takes no more: MAX_BATCH
    records, or MAX_BATCH_CHARS of text reached (the writer thread's batches and `batch_length` alike)."""
    return n >= MAX_BATCH or chars >= MAX_BATCH_CHARS


def batch_length(rows) -> int:
    """How many of `rows` (in order) one group commit takes: at least one, then none more once it is full
    (`batch_full`)."""
    n = chars = 0
    for row in rows:
        if n and batch_full(n, chars):
            break
        n, chars = n + 1, chars + text_chars(row)
    return n


# Plain SQL, built once: signing runs after every append when `sign_every` is 1, and building
# SQLAlchemy expressions per call cost more than the signature.
_HEAD = "SELECT seq, last_checkpoint, hash FROM audit_head WHERE id = 1"
_HEAD_SQL = {
    "wait": sa.text(_HEAD + " FOR UPDATE"),
    "skip": sa.text(_HEAD + " FOR UPDATE SKIP LOCKED"),
    "sqlite": sa.text(_HEAD),  # SQLite has one writer at a time: the transaction's write lock serialises
}
_HEAD_EXISTS = sa.text("SELECT 1 FROM audit_head WHERE id = 1")
_TAKE_WRITE_LOCK = sa.text("UPDATE audit_tip SET seq = seq WHERE id = 1")  # SQLite: a write that changes nothing
_TIP = sa.text("SELECT seq, hash FROM audit_tip WHERE id = 1")
# the tip, and the hash of a record the signer just wrote (`sign_tip`'s `cover`), in one round trip
_TIP_AND = sa.text("SELECT seq, hash, (SELECT hash FROM audit_records WHERE seq = :seq) FROM audit_tip WHERE id = 1")
_ANY_CHECKPOINT = sa.text("SELECT 1 FROM audit_checkpoints LIMIT 1")
_HASHES = sa.text("SELECT seq, hash FROM audit_records WHERE seq IN :seqs").bindparams(sa.bindparam("seqs", expanding=True))
_HASH_AT = sa.text("SELECT hash FROM audit_records WHERE seq = :seq")
_HEAD_COLS = ("seq", "hash", "last_checkpoint", "ts_us", "key_id", "signature")
_CP_COLS = ("seq", "hash", "prev_checkpoint", "ts_us", "reason", "key_id", "signature")
_INSERT_CP = sa.text(f"INSERT INTO audit_checkpoints ({', '.join(_CP_COLS)}) VALUES ({', '.join(':' + k for k in _CP_COLS)})")
_INSERT_HEAD = sa.text(
    f"INSERT INTO audit_head (id, {', '.join(_HEAD_COLS)}) VALUES (1, {', '.join(':' + k for k in _HEAD_COLS)})"
)
_UPDATE_HEAD = sa.text(f"UPDATE audit_head SET {', '.join(f'{k} = :{k}' for k in _HEAD_COLS)} WHERE id = 1")


def run(c: sa.Connection, stmt: Any, params: dict[str, Any] | None = None) -> Any:
    """`c.execute(stmt, params)` of one of the chain's fixed statements: on SQLite straight on the driver
    (`db.fast_execute`, the answer is its cursor: `fetchone()` tuples), which saves SQLAlchemy's ~25 us of
    work per statement, five of them per record; the driver's errors are raised as SQLAlchemy's
    (`IntegrityError`, `OperationalError`), as the writer's retries and refusals expect them."""
    if c.dialect.name != "sqlite":
        return c.execute(stmt, params)
    try:
        return fast_execute(c, stmt, params or {})
    except c.dialect.loaded_dbapi.Error as e:
        raise DBAPIError.instance(None, params, e, c.dialect.loaded_dbapi.Error) from e


def sign_every_for(setting: int, engine: sa.Engine) -> int:
    """`audit.sign_every` as a writer uses it: 0 means every record on SQLite (one host, the
    signature costs nothing there), 64 on PostgreSQL (replicas: one signature per 64 records)."""
    return setting if setting > 0 else (64 if engine.dialect.name == "postgresql" else 1)


def tail_allowance(sign_every: int, dialect: str) -> int:
    """Unsigned records `audit verify` accepts after the signed head: none on SQLite when every append signs
    (the head is signed in the records' own transaction); else what writers leave between two signatures
    (`sign_every`, a few times over for replicas appending while one signs) plus a group commit in flight.
    On PostgreSQL (`dialect`) that is so even with `sign_every = 1`: a batch commits (`audit.pgappend`)
    before the head naming it is signed in the next transaction, and a verify may look in between (its
    requests are not answered until that head is signed)."""
    return 0 if sign_every <= 1 and dialect != "postgresql" else 4 * sign_every + MAX_BATCH


def signed_head_row(signer: signing.Signer, seq: int, hash_: str, last_cp: int, ts_us: int) -> dict[str, Any]:
    sig = signer.sign(head_message(seq, hash_, last_cp, ts_us))
    return dict(seq=seq, hash=hash_, last_checkpoint=last_cp, ts_us=ts_us, key_id=signer.key_id, signature=sig)


def checkpoint_row(signer: signing.Signer, seq: int, hash_: str, prev_cp: int, ts_us: int, reason: str) -> dict[str, Any]:
    sig = signer.sign(checkpoint_message(seq, hash_, prev_cp, ts_us, reason))
    return dict(seq=seq, hash=hash_, prev_checkpoint=prev_cp, ts_us=ts_us, reason=reason, key_id=signer.key_id, signature=sig)


class Mine(NamedTuple):
    """What a writer remembers of the last head it signed: that head's record (`seq`, `hash`) and the chain's
    record 1 as of that signature (its `hash`, and its `rotation` number: `rotation_number`). `restored`: read
    back from the head file (`HeadFile.last_signed`) by a writer that has not signed since it started, so
    the database may be another one at the same URL (`sign_tip`)."""

    seq: int
    hash: str
    first: str | None
    rotation: int
    restored: bool = False


def sign_tip(
    c: sa.Connection,
    signer: signing.Signer,
    *,
    checkpoint_every: int,
    min_tail: int = 1,
    reason: str | None = None,
    wait: bool = True,
    head_expected: bool = False,
    allowance: int = 0,
    tip_row: tuple[int, str] | None = None,
    known: dict[int, str] | None = None,
    mine: Mine | None = None,
    now: float | None = None,
    cover: tuple[int, str] | None = None,
    first_seen: tuple[str | None, int] | None = None,
) -> tuple[int | None, dict[str, Any] | None, Mine | None]:
    """Sign the tip in transaction `c`: (the seq now signed, the new head row or None when nothing was
    signed, what the signer remembers of that head: `Mine`, read in this transaction, or None).

    Signs only when the tip is `min_tail` or more records past the signed head, or always with a
    `reason` (then a checkpoint is also signed at the tip: "shutdown"). `wait=False`: when another
    signer holds the head row, give up at once (None, None, None). `head_expected`: this writer saw a
    signed head before, so a missing one was deleted. `mine`: the last head this writer signed, whose
    record must still be in the chain unless the chain was rotated since. `now`: the time the head is
    stamped with (seconds; default this host's clock). `cover`: (seq, hash) of the last record the caller
    committed before this transaction (PostgreSQL, `sign_every = 1`), which must still be in the chain
    that is (or was already) signed: else its request would be answered with its record gone."""
    kind = "sqlite" if c.dialect.name == "sqlite" else ("wait" if wait else "skip")
    if kind == "sqlite" and tip_row is None:
        # the write lock before the reads: sqlite3 begins the transaction only at the first write, so the
        # head and tip read first were another writer's past (two signers wrote over each other's heads)
        run(c, _TAKE_WRITE_LOCK)
    got = _head_and_tip(c, kind, tip_row, cover)
    if got is None:
        return None, None, None  # another replica is signing now
    h, t = got
    if h is None:
        cps_exist = c.execute(_ANY_CHECKPOINT).first() is not None
        if t[0] and (head_expected or cps_exist or t[0] > allowance + MAX_BATCH or _signed_before(c, mine)):
            if kind != "sqlite" and c.execute(_HEAD_EXISTS).first() is not None:
                # another replica's first head, committed since this transaction looked for one (each
                # PostgreSQL statement reads as of its own moment): its checkpoints were found, and it is here
                got = _head_and_tip(c, kind, None, cover)
                if got is None:
                    return None, None, None
                h, t = got
            if h is None:
                raise AuditUnavailable(
                    "audit log tampered: records exist but the signed head is missing (run `codemoat audit verify`)"
                )
    if h is None:
        hseq, last_cp, hhash = 0, 0, None
    else:
        hseq, last_cp, hhash = h[0], h[1], h[2]  # seq, last_checkpoint, hash
    t_seq, t_hash = t[0], t[1]
    if t_seq < hseq:
        raise AuditUnavailable(
            f"audit log tampered: the chain ends at record {t_seq} but the signed head names record {hseq} (run `codemoat audit verify`)"
        )
    if t_seq == hseq and t_hash != hhash:
        raise _relinked(hseq)
    if cover is not None and (t_seq < cover[0] or t[2] != cover[1]):
        # a trigger of the DBA's deleted the record once the chain had linked it and wound the tip back, so
        # that the next record takes its number; unless the chain was rotated since (it is in the archive)
        first, _ = _first(c, 1)
        # rotated since the record was written: record 1 is another, later rotation than the chain the writer
        # appended to, as its last signature in this process read it, else as it read it before its first append
        # (`first_seen`: a head read back from the head file may predate a rotation; none known: no excuse)
        if mine is not None and not mine.restored:
            rotated = _rotated_since(first, mine)
        elif first_seen is not None:
            rotated = first[0] != first_seen[0] and first[1] > first_seen[1]
        else:
            rotated = False
        if not rotated:
            raise AuditUnavailable(
                f"audit log tampered: record {cover[0]}, just written, is no longer in the chain (run `codemoat audit verify`)"
            )
    at_tip = reason is not None and last_cp != t_seq
    if not at_tip and t_seq - hseq < max(1, min_tail):
        return hseq, None, None
    if hseq and hhash != _hash_at(c, hseq, known):
        # whoever writes the database (no key) cut or rewrote signed records, wound the tip back and let the
        # chain link new records after it: a head signed over that would make the rewrite verify
        raise _relinked(hseq)
    if mine is not None and (mine.seq, mine.hash) == (hseq, hhash) and mine.first is not None:
        first = mine.first, mine.rotation  # the same head (so the same chain, record 1 included)
    else:  # another signer's head since, or this writer's first signature (record 1 unknown): one lookup
        first, at_mine = _first(c, mine.seq if mine is not None else 1)
        if mine is not None and at_mine != mine.hash and not _rotated_since(first, mine):
            if not _another_database(first, mine):
                # the head this writer signed last is gone from the chain: the same cut and relink, after an
                # earlier signed head row (a copy the DBA kept) was put back in the database
                raise _relinked(mine.seq)
            log.warning(
                "the audit head file's last head (record %d) is not in this database's chain, which was never "
                "rotated and begins with another record 1: taken for a new database at this URL; this writer "
                "signs on (`codemoat audit verify` checks the head file)",
                mine.seq,
            )
    now = int((time.time() if now is None else now) * 1_000_000)
    k = max(1, checkpoint_every)
    due = list(range((last_cp // k + 1) * k, t_seq + 1, k))
    got = {s: known[s] for s in due if known and s in known}
    if len(got) < len(due):
        got.update(dict(c.execute(_HASHES, {"seqs": [s for s in due if s not in got]}).all()))
    cps = []
    for s in due:
        if s not in got:
            raise AuditUnavailable(f"audit log tampered: record {s} is missing (run `codemoat audit verify`)")
        cps.append(checkpoint_row(signer, s, got[s], last_cp, now, "periodic"))
        last_cp = s
    if at_tip and last_cp != t_seq:
        cps.append(checkpoint_row(signer, t_seq, t_hash, last_cp, now, reason))
        last_cp = t_seq
    if cps:
        c.execute(_INSERT_CP, cps)
    row = signed_head_row(signer, t_seq, t_hash, last_cp, now)
    run(c, _INSERT_HEAD if h is None else _UPDATE_HEAD, row)
    return t_seq, row, Mine(t_seq, t_hash, *first)


def _head_and_tip(c: sa.Connection, kind: str, tip_row: tuple[int, str] | None, cover: tuple[int, str] | None):
    """(the signed head row or None, the tip row) as `sign_tip` reads them, the head row locked (`kind`); None
    when another signer holds it and `kind` is "skip"."""
    h = run(c, _HEAD_SQL[kind]).fetchone()
    if h is None and kind != "sqlite" and c.execute(_HEAD_EXISTS).first() is not None:
        if kind == "skip":
            return None
        # the row this waited on was deleted and written anew (`audit rotate` while this replica served):
        # the new chain's head, not a missing one
        h = run(c, _HEAD_SQL[kind]).fetchone()
    if tip_row is not None:
        t = tip_row
    elif cover is not None:
        t = c.execute(_TIP_AND, {"seq": cover[0]}).first()
    else:
        t = c.execute(_TIP).first()
    if t is None:
        raise AuditUnavailable("audit log tampered: the chain's tip row is missing (run `codemoat audit verify`)")
    return h, t


def _hash_at(c: sa.Connection, seq: int, known: dict[int, str] | None) -> str | None:
    """Record `seq`'s hash: from `known` (the batch just written), else one lookup by its number."""
    if known and seq in known:
        return known[seq]
    row = run(c, _HASH_AT, {"seq": seq}).fetchone()
    return None if row is None else row[0]


_FIRST = sa.text("SELECT seq, hash, kind, detail FROM audit_records WHERE seq IN (1, :seq)")


def rotation_number(kind: str | None, detail: str | None) -> int:
    """Which rotation started the chain whose record 1 this is: `audit rotate` numbers its rotation record one
    past the rotated chain's (detail `rotation`); 0 for a chain never rotated, or rotated before records
    were numbered."""
    if kind != "rotation":
        return 0
    try:
        n = json.loads(detail or "{}").get("rotation")
    except (ValueError, AttributeError, TypeError, RecursionError):
        return 0
    return n if type(n) is int and n > 0 else 0


def _first(c: sa.Connection, seq: int) -> tuple[tuple[str | None, int], str | None]:
    """Record 1's hash and rotation number ((None, 0) when there is none), and record `seq`'s hash."""
    rows = {r[0]: r for r in run(c, _FIRST, {"seq": seq}).fetchall()}
    one, at = rows.get(1), rows.get(seq)
    return ((None, 0) if one is None else (one[1], rotation_number(one[2], one[3]))), (None if at is None else at[1])


def _rotated_since(first: tuple[str | None, int], mine: Mine) -> bool:
    """Whether the chain was started again (`audit rotate`, by any replica) after the head `mine` was signed:
    record 1 is now another rotation record than the one that head's chain began with, and a later one (its
    number is higher). No clocks: a rotating host whose clock is behind the replicas' is still a rotation.
    A DBA who puts back an older chain whole (its rotation record and a signed head of it, from an archive)
    is not taken for one: that rotation's number is not past the one this writer's chain had."""
    return first[0] != mine.first and first[1] > mine.rotation


def _signed_before(c: sa.Connection, mine: Mine | None) -> bool:
    """Whether this chain had a signed head, by the head file: the last head read back from it (`mine`,
    restored) was signed over a chain that began with this record 1. A writer that stayed up knows it saw
    a head (`head_expected`); one restarted after the DBA deleted the head row and the checkpoints of a
    short log knows it from here. One lookup, made only when no head row is found."""
    if mine is None or not mine.restored or mine.first is None:
        return False
    return _first(c, 1)[0][0] == mine.first


def _another_database(first: tuple[str | None, int], mine: Mine) -> bool:
    """Whether the head `mine`, read back from the head file after a restart, may be of another database at
    this URL (one created anew, the old one's head file left): the chain's record 1 is not the one that
    head's chain began with (or that one is unknown: a head file written before it was kept) and is no
    rotation record (`rotation_number` 0), so the chain was never rotated. The head file is named after
    the URL, not the database, and nothing in a new database tells it from a replaced one: then the writer
    signs on, as it did before it read the file. A chain that begins with a rotation record is not new: an
    older rotated chain put back whole (records and a signed head of it) stops it as it stops a writer
    that stayed up."""
    return mine.restored and first[0] != mine.first and first[1] == 0


def _relinked(seq: int) -> AuditUnavailable:
    return AuditUnavailable(
        f"audit log tampered: record {seq} no longer matches the signed head that names it (run `codemoat audit verify`)"
    )


class HeadFile:
    """The signed head's copy outside the database: two fixed 512-byte slots, written in place.

    A rename per signature costs milliseconds on some filesystems; an in-place write does not. The
    slot written is the one holding the older head, or this record's head signed before (read first:
    several processes may write one file), so the file holds the newest two records' heads and a
    write torn by a crash leaves the other. Beside the head, what its signer remembers of the chain
    then (`Mine`: record 1's hash `first` and its `rotation` number), which a restarted writer reads back
    (`last_signed`)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()  # the writer thread, the head timer and close() may meet here
        self._closer: weakref.finalize | None = None

    def _slot_for(self, seq: int) -> int:
        seqs = []
        for slot in (0, 1):
            try:
                seq_ = json.loads(os.pread(self._fd, HEAD_SLOT, slot * HEAD_SLOT))["seq"]
            except (ValueError, KeyError, TypeError):
                return slot  # blank or damaged: written first
            if type(seq_) is not int:  # {"seq": null} or text someone wrote there: damaged, not a failed append
                return slot
            seqs.append(seq_)
        if seq in seqs:  # the same record signed again (a shutdown checkpoint): the older head stays
            return seqs.index(seq)
        return 0 if seqs[0] <= seqs[1] else 1

    def write(self, head_row: dict[str, Any], mine: Mine | None = None) -> None:
        """Write `head_row` (with record 1 as its signer read it, `mine`, when given) over the older slot."""
        if mine is not None:
            head_row = {**head_row, "first": mine.first, "rotation": mine.rotation}
        data = json.dumps(head_row, separators=(",", ":")).encode()
        data = data.ljust(HEAD_SLOT - 1) + b"\n"
        with self._lock:
            try:
                if self._fd is None:
                    from ..paths import open_own  # never through a link or into a FIFO put at its name

                    self._fd = open_own(self.path, "audit head file", error=OSError)
                    # a copy collected without close() closes its descriptor; not at exit, where a log's own
                    # close may still write the head after the finalizers ran
                    self._closer = weakref.finalize(self, os.close, self._fd)
                    self._closer.atexit = False
                if os.fstat(self._fd).st_size < 2 * HEAD_SLOT:  # a new (or rotated) file: both slots, no blank one
                    os.pwrite(self._fd, data, HEAD_SLOT)
                    os.pwrite(self._fd, data, 0)
                    return
                os.pwrite(self._fd, data, self._slot_for(head_row["seq"]) * HEAD_SLOT)
            except OSError as e:  # the database copy is authoritative; a missing file copy only weakens verify
                log.warning("could not write the audit head file %s: %s", self.path, e)

    def last_signed(self) -> Mine | None:
        """The newest head in the file (by its time: the file holds heads this host's writers signed), as the
        `Mine` a writer restarted since starts from; None when the file holds none. A head written before
        record 1 was kept beside it has `first` None: record 1 unknown (`_another_database`). A file that
        cannot be read, or a damaged slot: one warning, and that file or slot is not used (the writer
        then remembers nothing until it signs, as before it read the file)."""
        from ..paths import read_own

        try:
            raw = read_own(self.path, "audit head file", limit=4 * HEAD_SLOT, error=ValueError)
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as e:
            log.warning("the audit head file cannot be read back (%s): this writer remembers no head of its own", e)
            return None
        heads, damaged = [], []
        for i in range(0, len(raw), HEAD_SLOT):
            part = raw[i : i + HEAD_SLOT]
            if not part.strip(b"\x00 \n"):
                continue  # never written
            try:
                d = json.loads(part)
                h = SignedHead.from_mapping(d)
                first, rotation = d.get("first"), d.get("rotation", 0)
                if not (first is None or isinstance(first, str)) or type(rotation) is not int or rotation < 0:
                    raise ValueError
            except ValueError:
                damaged.append(i // HEAD_SLOT)
                continue
            heads.append((h.ts_us, h.seq, Mine(h.seq, h.hash, first, rotation, restored=True)))
        if damaged:
            log.warning("the audit head file %s is damaged (slot %s): this writer does not use it", self.path, damaged[0])
        return max(heads, key=lambda x: x[:2])[2] if heads else None

    def close(self) -> None:
        """Close the file's descriptor (a later `write` opens it again)."""
        with self._lock:
            if self._closer is not None:
                self._closer()
            self._fd = self._closer = None
