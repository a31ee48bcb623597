"""Audit checkpoints signed by the TPM, against the chip's monotonic counter: a rolled-back log shows.

The software checkpoints and head (`audit.chain`) are signed with the machine's Ed25519 key, a
file: whoever can read it can rewrite the log and re-sign all of it, or put back an older copy of
the database and the head file, every signature valid. A machine with a TPM (`machine-id --tpm`)
adds a **TPM checkpoint**: the chip increments an NV counter (TPM_NT_COUNTER at
`attest.tpmcounters.AUDIT_NV_INDEX`; a counter never goes back, and a redefined one starts above every
value a counter on that chip ever held, TPM 2.0 Part 1 §37.2.2) and certifies it with its
attestation key (TPM2_NV_Certify) over SHA-256(`DOMAIN`, AK, seq, hash) of the log's signed head.
The result is appended as a record of kind `tpm_checkpoint` (so it is chained and signed like any
other), holding the named record, the counter value, the TPMS_ATTEST and its ECDSA signature.

`check` (run by `audit verify`) verifies each of this machine's TPM checkpoints (AK signature, the
counter's NV name, the data over the record it names, that record's hash), that the counter
values follow one another (a gap: checkpoints removed), and that the newest equals the chip's
counter now (read as a TPM2_NV_Certify by the AK over a fresh nonce: no other TPM can answer): a database put back to an older copy holds an older newest checkpoint than the chip
has signed since, and the report names both. A log holding none of the chip's checkpoints must
start with a rotation (else it was cut back to before its first one), and the NV index must be the
counter (`attest.tpm` checks its name: an ordinary index there could be written back). What it cannot stop: the service account can ask
the chip for a new checkpoint at run time (over a log it rewrote), and can lose the records after
the newest TPM checkpoint unnoticed; take them often (`codemoat audit tpm-checkpoint` on a timer;
the server takes one at shutdown, `appliance tamper-event` after its record).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import sqlalchemy as sa

from ..errors import CodemoatError
from .chain import head, records

KIND = "tpm_checkpoint"
DOMAIN = b"codemoat-audit-tpm-checkpoint-v1\x00"


def checkpoint_data(ak_id: str, seq: int, hash_: str) -> bytes:
    """The qualifyingData the chip certifies: which AK, which record, which hash."""
    return hashlib.sha256(DOMAIN + f"{ak_id}|{seq}|{hash_}".encode()).digest()


def _ak_id(ak_der_hex: str) -> str:
    return hashlib.sha256(bytes.fromhex(ak_der_hex)).hexdigest()[:16]


def _machine(machine: Any = None) -> Any:
    from ..vault.machine import MachineKey

    if machine is not None:
        return machine
    try:
        return MachineKey.load()
    except CodemoatError:
        return None  # no machine key here: nothing to sign with, nothing to check against


def take(log: Any, machine: Any = None) -> dict[str, Any] | None:
    """Have the TPM certify its incremented counter over the log's signed head, and append it as a
    `tpm_checkpoint` record; None when the log is empty. Raises CodemoatError without a TPM."""
    from ..vault.codec import b64e

    machine = _machine(machine)
    if machine is None or not machine.tpm:
        raise CodemoatError("this machine has no TPM set up (run `codemoat machine-id --tpm`): no TPM checkpoint")
    from ..attest.tpmcounters import AUDIT_NV_INDEX

    ak_id = _ak_id(machine.tpm["identity"]["ak"])
    log.sign()  # the chip certifies the chain's tip, not a signed head that trails it
    with log.engine.connect() as c:
        h = c.execute(sa.select(head.c.seq, head.c.hash).where(head.c.id == 1)).first()
    if h is None:
        return None
    with machine.attestor() as a:
        q, counter = a.audit_checkpoint(checkpoint_data(ak_id, h.seq, h.hash))
    detail = {
        "seq": h.seq,
        "hash": h.hash,
        "ak_id": ak_id,
        "nv_index": AUDIT_NV_INDEX,
        "counter": counter,
        "attest": b64e(q.attest),
        "r": b64e(q.r),
        "s": b64e(q.s),
    }
    rec = log.append(KIND, user="appliance", route="audit tpm-checkpoint", detail=detail)
    log.sign()  # the chip's checkpoint record under a signed head at once (signatures may be batched)
    return dict(detail, record=rec)


def maybe_take(log: Any) -> dict[str, Any] | None:
    """`take` when this machine has a TPM set up; otherwise nothing (a software-key machine)."""
    machine = _machine()
    if machine is None or not machine.tpm:
        return None
    return take(log, machine)


def check(engine: sa.Engine, machine: Any = None) -> tuple[list[tuple[int, str]], str | None]:
    """Problems (first record implicated, what) with this machine's TPM checkpoints, and a warning."""
    from ..attest.tpmcounters import AUDIT_NV_INDEX
    from ..vault.codec import VaultError, b64d
    from ..vault.tpmwrap import QuoteRefused, verify_nv_certify

    machine = _machine(machine)
    with engine.connect() as c:
        rows = c.execute(sa.select(records.c.seq, records.c.detail).where(records.c.kind == KIND).order_by(records.c.seq)).all()
        if machine is None or not machine.tpm:
            return [], (f"{len(rows)} TPM-signed checkpoints not checked: this machine has no TPM set up" if rows else None)
        ak = machine.tpm["identity"]["ak"]
        ak_id = _ak_id(ak)
        prev: tuple[int, int] | None = None  # (record, counter) of the last of this AK's checkpoints
        others = 0
        for seq, detail in rows:
            try:
                d = json.loads(detail)
                if d.get("ak_id") != ak_id:
                    others += 1
                    continue
                info = verify_nv_certify(
                    ak,
                    b64d(d["attest"], "TPM checkpoint"),
                    b64d(d["r"], "TPM checkpoint r"),
                    b64d(d["s"], "TPM checkpoint s"),
                    checkpoint_data(ak_id, d["seq"], d["hash"]),
                    AUDIT_NV_INDEX,
                )
                named, counter = int(d["seq"]), int(d["counter"])
            except (QuoteRefused, VaultError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
                # AttributeError, RecursionError: a detail that is not an object, or nested past the parser (a DBA's)
                return [(seq, f"the TPM checkpoint in record {seq} does not hold: {e}")], None
            if info.counter != counter or named >= seq:
                return [
                    (seq, f"the TPM checkpoint in record {seq} was edited (its fields disagree with what the TPM signed)")
                ], None
            got = c.execute(sa.select(records.c.hash).where(records.c.seq == named)).scalar()
            if got != d["hash"]:
                return [(named, f"record {named} no longer matches the TPM-signed checkpoint in record {seq}")], None
            if prev is not None and counter != prev[1] + 1:
                return [
                    (
                        prev[0] + 1,
                        f"the TPM checkpoint counter jumps from {prev[1]} (record {prev[0]}) to {counter} (record {seq}): "
                        "the TPM checkpoints in between were removed (the log was rolled back and written again)",
                    )
                ], None
            prev = (seq, counter)
    nonce = os.urandom(32)  # the chip certifies its counter over it: a TPM the TCTI names instead cannot answer
    try:
        with machine.attestor() as a:
            q = a.audit_counter(nonce)
        now = None if q is None else verify_nv_certify(ak, q.attest, q.r, q.s, nonce, AUDIT_NV_INDEX).counter
    except QuoteRefused as e:
        return [(1, f"the TPM that answered for the audit counter is not this machine's TPM, or not its counter: {e}")], None
    except CodemoatError as e:
        return [(1, f"cannot read the TPM's audit counter to check for a rollback: {e}")], None
    warning = f"{others} TPM checkpoints by other machines' TPMs not checked" if others else None
    if prev is None:
        if now:
            more = f"this TPM has signed {now} audit checkpoint(s) but this log holds none of them"
            with engine.connect() as c:
                first = c.execute(sa.select(records.c.kind).order_by(records.c.seq).limit(1)).scalar()
            if first != "rotation":  # cut back to before its first TPM checkpoint, or replaced: not a fresh start
                return [
                    (
                        1,
                        f"{more}, and it does not start with a rotation: it was rolled back to before its first TPM "
                        "checkpoint or replaced (a new log on purpose starts with `codemoat audit rotate`)",
                    )
                ], None
            return [], "; ".join(x for x in (warning, f"{more} (the log was rotated)") if x)
        return [], warning
    if now is None or now < prev[1]:
        return [
            (prev[0], f"the TPM's audit counter ({now}) is behind the log's newest TPM checkpoint ({prev[1]}): another TPM")
        ], None
    if now > prev[1]:
        return [
            (
                prev[0] + 1,
                f"the log was rolled back: the TPM's audit counter is at {now}, but the newest TPM-signed checkpoint "
                f"in the log (record {prev[0]}) holds {prev[1]} — {now - prev[1]} later checkpoint(s) are gone",
            )
        ], None
    return [], warning


def check_report(engine: sa.Engine, rep: Any) -> None:
    """Fold `check` into an `audit.verify.VerifyReport` that is otherwise OK."""
    problems, warning = check(engine)
    if problems:
        rep.ok = False
        rep.first_bad, rep.problem = min(problems, key=lambda p: p[0])
    if warning:
        rep.warning = f"{rep.warning}; {warning}" if rep.warning else warning
