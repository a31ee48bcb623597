"""When a writer signs the audit head, and signing it: the half of `AuditLog` that anchors the chain.

An `AuditLog` (`audit.log`) links every record as it writes it; this mixin decides when the tip is
signed and signs it. It keeps what this process knows: the newest record it wrote (`_last_seq`) and
the newest it knows to be signed (`_signed_seq`, by itself or by another replica), and since when a
record has been left unsigned (`_unsigned_since`). The head is due after `sign_every` records or
once `sign_interval_ms` has passed with a record unsigned (`_sign_due`); on SQLite it is signed in
the records' own transaction, on PostgreSQL right after it (`_sign_after`), and otherwise by the
timer thread (`audit.timer`) or at shutdown (`checkpoint`, `close`). The SQL that locks the head
row and signs the checkpoints and the head is `audit.heads.sign_tip`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from . import signing
from .chain import head, tip
from .heads import AuditUnavailable, HeadFile, Mine, sign_tip, signed_head_row, tail_allowance
from .timer import HeadTimer

log = logging.getLogger("codemoat.audit")


class HeadSigning:
    """Signing the chain's tip for an `AuditLog`: the schedule, the head row, the head file's copy."""

    engine: Engine
    _lock: threading.Lock

    def _init_signing(
        self,
        signer: signing.Signer | None,
        checkpoint_every: int,
        sign_every: int,
        sign_interval_ms: float,
        head_file: Path | None,
    ) -> None:
        self._signer = signer
        self.checkpoint_every = max(1, checkpoint_every)
        self.sign_every = max(1, sign_every)  # 1: every append returns with its record signed
        self.sign_interval = max(0.001, sign_interval_ms / 1000)
        self._head_copy = HeadFile(head_file) if head_file is not None else None
        self._signed_seq = 0  # the newest record this process knows to be signed
        self._last_seq = 0  # the newest record this process wrote
        self._seen_head = False  # a signed head was seen: a missing one was deleted
        self._mine: Mine | None = None  # the last head this process signed, and the chain's record 1 then
        self._mine_read = False  # the head file's last head was read back (`_last_head`)
        self._unsigned_since: float | None = None  # when this process first left a record unsigned
        # (seq, hash) of the last record of a batch committed and served whose head could not be signed (PostgreSQL,
        # `sign_every = 1`): the next signature must find it in the chain, and nothing is appended before it (`_flush`)
        self._owed: tuple[int, str] | None = None
        # record 1 of the chain (hash, rotation number) as this writer found it before its first append, when it had
        # not signed since it started: a `cover` check then tells a rotation since from a cut (`sign_tip`)
        self._first_seen: tuple[str | None, int] | None = None
        self._timer = HeadTimer(self)

    @property
    def signer(self) -> signing.Signer:
        if self._signer is None:
            self._signer = signing.load_signer()
        return self._signer

    @property
    def tail_allowance(self) -> int:
        return tail_allowance(self.sign_every, self.engine.dialect.name)

    def _sign_after(self, seq: int, hash_: str) -> dict[str, Any] | None:
        """Sign after records up to `seq` (whose hash is `hash_`) were committed: a database error leaves them
        for the timer (they are written; the request is served), a tampered log stops the writer. With
        `sign_every = 1` the head signed must hold record `seq` (`sign_tip`'s `cover`), and a database error is
        raised: the writer owes that head (`AuditLog._flush`)."""
        try:
            if self.sign_every == 1:
                return self._sign(wait=True, min_tail=self._min_tail(), cover=(seq, hash_))
            return self._sign(wait=False, min_tail=self._min_tail())
        except DBAPIError as e:
            if self.sign_every == 1:
                raise
            log.warning("could not sign the audit head after record %d: %s", seq, str(e).splitlines()[0])
            return None

    def _min_tail(self) -> int:
        """Sign a tail this long or longer: `sign_every`, or any once the interval has passed."""
        since = self._unsigned_since
        return 1 if since is not None and time.monotonic() - since >= self.sign_interval else self.sign_every

    def _sign_due(self, seq: int) -> bool:
        if seq <= self._signed_seq:  # the chain was rotated by another process: it starts again
            self._signed_seq = 0
        since = self._unsigned_since
        return seq - self._signed_seq >= self.sign_every or (since is not None and time.monotonic() - since >= self.sign_interval)

    def _last_head(self) -> Mine | None:
        """The last head this writer signed: in memory, or until it signs, the newest in its head file (read
        once). A writer restarted after a DBA cut signed records, relinked the chain over them and put back
        an earlier head row then refuses its first signature, as one that stayed up refuses its next."""
        if self._mine is None and not self._mine_read:
            self._mine_read = True
            if self._head_copy is not None:
                self._mine = self._head_copy.last_signed()
        return self._mine

    def _signed(self, seq: int | None, head_row: dict[str, Any] | None, mine: Mine | None = None) -> None:
        """Note that records up to `seq` are signed (by this process when `head_row`, remembered as `mine`,
        as `sign_tip` read it in the signature's transaction; or by another)."""
        if mine is not None:
            self._mine = mine
        if seq is not None and seq >= self._signed_seq:
            self._signed_seq, self._seen_head = seq, self._seen_head or seq > 0
            if seq >= self._last_seq:
                self._unsigned_since = None

    def _sign(
        self, *, wait: bool = True, min_tail: int = 1, reason: str | None = None, cover: tuple[int, str] | None = None
    ) -> dict[str, Any] | None:
        """Sign the tip in a transaction of its own (the new head row, or None when nothing was signed). A head
        owed for records served before it (`_owed`) is their `cover` unless another is given, and is paid once
        a signature at the tip passes that check (a head at the tip holds them, or the chain was rotated)."""
        owed = self._owed if cover is None else None
        for attempt in range(10):
            try:
                with self.engine.begin() as c:
                    signed, head_row, mine = sign_tip(
                        c,
                        self.signer,
                        checkpoint_every=self.checkpoint_every,
                        min_tail=min_tail,
                        reason=reason,
                        wait=wait,
                        head_expected=self._seen_head,
                        allowance=self.tail_allowance,
                        mine=self._last_head(),
                        cover=cover or owed,
                        first_seen=self._first_seen,
                    )
                self._signed(signed, head_row, mine)
                if owed is not None and signed is not None and min_tail <= 1 and self._owed == owed:
                    self._owed = None
                return head_row
            except IntegrityError:  # two replicas wrote the first head at once: the other one's stands
                if not wait:
                    return None
            except DBAPIError as e:
                if "locked" not in str(e).lower() or attempt == 9:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AuditUnavailable("audit log busy: could not sign the head after 10 attempts")

    def _signed_head(self, seq: int, hash_: str, last_cp: int, ts_us: int) -> dict[str, Any]:
        return signed_head_row(self.signer, seq, hash_, last_cp, ts_us)

    def sign(self, reason: str | None = None) -> int | None:
        """Sign the head at the chain's tip now (with a `reason`, a checkpoint there too); the seq signed."""
        with self._lock:
            try:
                head_row = self._sign(reason=reason)
            except DBAPIError as e:
                raise AuditUnavailable(f"audit log cannot be signed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
            mine = self._mine  # that head's, as `_signed` noted it
        if head_row is not None:
            self._write_head_file(head_row, mine)
        return self._signed_seq

    def checkpoint(self, reason: str = "shutdown") -> int | None:
        """Sign a checkpoint and the head at the chain's tip (at shutdown); None when there is nothing new."""
        with self._lock:
            with self.engine.connect() as c:
                h = c.execute(sa.select(head.c.last_checkpoint).where(head.c.id == 1)).first()
                t = c.execute(sa.select(tip.c.seq).where(tip.c.id == 1)).scalar()
            if not t or (h is not None and h.last_checkpoint == t):
                return None
        self.sign(reason)
        return t

    def _write_head_file(self, head_row: dict[str, Any], mine: Mine | None = None) -> None:
        """Write `head_row` to the head file, with record 1 as this writer read it when it signed that head
        (`mine`, default the last it noted; left out when that is another head's)."""
        if self._head_copy is not None:
            mine = self._mine if mine is None else mine
            if mine is not None and (mine.seq, mine.hash) != (head_row["seq"], head_row["hash"]):
                mine = None
            self._head_copy.write(head_row, mine)

    def _left_unsigned(self, seq: int) -> None:
        """Records up to `seq` are committed: start the interval when they are the first left unsigned."""
        if self._signed_seq < seq and self._unsigned_since is None:
            self._unsigned_since = time.monotonic()
            self._timer.arm()
