"""Signed heads a verifier remembers, so that a log never verifies as shorter, emptier or replaced.

The signed head and the head file only say where the log ends *now*; whoever can write the
database and `$CODEMOAT_HOME` can put back an older state with its own valid signatures (delete the
last records and restore the previous head, or empty everything). Transparency logs meet this with
clients that remember the last signed tree head they accepted and check every later one for
consistency with it (RFC 9162: signed tree heads, consistency proofs). Here the memory is a file `audit verify` keeps
(`chain.verified_file_for`, separate from the writer's head file) and any number of exported heads
an operator keeps off the machine (`codemoat audit head export`, then `audit verify --trusted-head`).

`check` holds the rule: a remembered head (seq n, hash h, last checkpoint c) is consistent with the
log when the log reaches record n, record n still hashes to h, and the checkpoint at c is still
there. Anything else is a rollback, and the problem says which.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .chain import SignedHead

FORMAT = "codemoat-audit-head-v1"


def load(path: Path, *, own: bool = False) -> SignedHead | None:
    """The head in `path` (the verifier's file or an exported one); None when there is no file.

    ValueError (one line) when it cannot be read or is not a signed head: a FIFO or device too, and,
    with `own` (the verifier's file in the home), a symbolic link."""
    from ..paths import read_own, read_regular

    try:
        raw = read_own(path, "signed head", error=ValueError) if own else read_regular(path, "signed head", 1 << 20, ValueError)
    except FileNotFoundError:
        return None
    except ValueError as e:
        if not own and not path.exists():
            return None
        raise e from None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise ValueError(f"{path} is not JSON (damaged?)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a codemoat audit head (format {FORMAT})")
    return SignedHead.from_mapping(doc)


def document(h: SignedHead, public_key: bytes | None) -> dict[str, Any]:
    """The JSON an exported or remembered head is kept as (nothing in it is secret)."""
    when = datetime.fromtimestamp(h.ts_us / 1_000_000, tz=UTC).isoformat(timespec="seconds")
    return {"format": FORMAT, **h.to_dict(), "time": when, "public_key": public_key.hex() if public_key else None}


def remember(path: Path, h: SignedHead, public_key: bytes | None, *, reset: bool = False) -> None:
    """Record `h` as the last verified head in `path` (atomically, mode 0600).

    Never moves backwards, even when two verifiers race, unless `reset` (a rotation started a new chain)."""
    from ..paths import open_own

    with os.fdopen(open_own(path.with_name(path.name + ".lock"), "lock file", error=OSError), "r+b") as lock:
        os.fchmod(lock.fileno(), 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not reset:
            try:
                old = load(path, own=True)
            except ValueError:
                old = None  # a damaged file was already reported by the verify that led here
            if old is not None and old.seq > h.seq:
                return
        tmp = path.with_name(path.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):  # a leftover, or a link put there: removed, never written through
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document(h, public_key), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def check(
    t: SignedHead,
    label: str,
    *,
    last: int,
    hash_at: dict[int, str],
    checkpoint_seqs: set[int],
    first_record: dict[str, Any] | None,
) -> tuple[int, str] | None:
    """(first bad record, problem) when the log is not a continuation of remembered head `t`."""
    when = datetime.fromtimestamp(t.ts_us / 1_000_000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    if t.seq > last:
        if last == 0:
            return 1, f"the log was emptied: {label} saw {t.seq} records (head signed {when}); the log now holds none"
        return last + 1, (
            f"the log was rolled back: {label} saw record {t.seq} (head signed {when}); the log now ends at record {last}"
        )
    if hash_at.get(t.seq) != t.hash:
        if first_record is not None and first_record["kind"] == "rotation":
            try:  # record 1 of a replaced log is whatever its writer put there
                d = json.loads(first_record["detail"] or "{}")
            except (TypeError, ValueError, RecursionError):
                d = None
            moved = d.get("records", "?") if isinstance(d, dict) else "?"
            return 1, (
                f"the log was rotated after {label} was taken (record 1 archives {moved} records): "
                "check that head against the archive, and take a new one"
            )
        return 1, f"the log was replaced or rewritten: record {t.seq} is not the one {label} saw (head signed {when})"
    if t.last_checkpoint and t.last_checkpoint not in checkpoint_seqs:
        return t.last_checkpoint, f"the signed checkpoint at record {t.last_checkpoint} that {label} saw was deleted"
    return None
