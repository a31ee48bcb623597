"""The vendor's record of each TPM attestation key: bound to its certified EK, and its clock's floor.

Provisioning a TPM machine is two messages (credential protection, `tpmcred`):

    vendor:   challenge(identity)  -> {"kind": "codemoat-tpm-challenge", credential, secret}
    machine:  activate(attestor, challenge) -> {"kind": "codemoat-tpm-activation", secret}
    vendor:   confirm(activation)  -> the AK is bound: licenses may now name it

The vendor first checks the EK certificate chains to a TPM manufacturer CA it trusts
(`tpm-ek-ca.pem` in the vendor folder) and that the AK's public area is a restricted, fixedTPM
signing key; the secret comes back only from the chip that holds that EK with that AK loaded.
`require_bound` refuses to license a TPM identity whose AK was not bound this way.

The same row keeps the highest (resetCount, clock) a verified quote showed (`advance`): in the
vendor database, so a key server restart or a second key server process does not forget it, and
a restored TPM state (a vTPM snapshot) is refused however long ago it was last seen.

A quote whose clockInfo.safe is NO says the chip may have reported a higher clock before (TPM 2.0
Part 1 §36.5, Part 2 §10.11.1: it lost power before the clock was saved), so its clock does not
order it after the floor. Such a quote is accepted only from a boot the floor has not seen: a reset
count strictly above the floor's (a TPM Reset follows every power loss), which then becomes the
floor with `unsafe_reset` set to it, so the rest of that boot's quotes (still safe = NO until the
chip saves its clock) go on as usual. The same reset count with safe = NO is what a chip whose state
was put back, or whose reset count was lost with the power, shows: refused like a rollback.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from .. import paths
from ..db import fast_execute
from .codec import VaultError

EK_CA_FILE = "tpm-ek-ca.pem"
CHALLENGE_KIND, ACTIVATION_KIND = "codemoat-tpm-challenge", "codemoat-tpm-activation"
CHALLENGE_TTL = 7 * 86400  # a challenge sent to a customer stays answerable for a week

_meta = sa.MetaData()
tpm_keys_t = sa.Table(
    "vault_tpm_keys",
    _meta,
    sa.Column("ak_id", sa.String(64), primary_key=True),
    sa.Column("machine_id", sa.String(40)),
    sa.Column("ek_id", sa.String(64)),
    sa.Column("secret_hash", sa.String(64)),
    sa.Column("challenged_at", sa.Integer),
    sa.Column("bound_at", sa.Integer),
    sa.Column("reset_count", sa.BigInteger),
    sa.Column("clock", sa.BigInteger),
    sa.Column("seen_at", sa.Integer),
    sa.Column("unsafe_reset", sa.BigInteger),
)

# SET's right-hand sides read the row as it was (SQLite and PostgreSQL alike).
_ADVANCE = sa.text(
    "UPDATE vault_tpm_keys SET reset_count = :r, clock = :c, seen_at = :now, "
    "unsafe_reset = CASE WHEN reset_count = :r THEN unsafe_reset END WHERE ak_id = :ak AND "
    "(reset_count IS NULL OR reset_count < :r OR (reset_count = :r AND clock <= :c))"
)
# clockInfo.safe = NO: a boot not seen yet, or more of the one already accepted that way
_ADVANCE_UNSAFE = sa.text(
    "UPDATE vault_tpm_keys SET reset_count = :r, clock = :c, seen_at = :now, unsafe_reset = :r WHERE ak_id = :ak AND "
    "(reset_count IS NULL OR reset_count < :r OR (reset_count = :r AND unsafe_reset = :r AND clock <= :c))"
)
_LAST = sa.text("SELECT reset_count, clock FROM vault_tpm_keys WHERE ak_id = :ak")


@functools.lru_cache(maxsize=4096)  # the key server names an AK at every lease
def key_id(der_hex: str) -> str:
    return hashlib.sha256(bytes.fromhex(der_hex)).hexdigest()


def trust_ca(root: Path, pem: bytes) -> int:
    """Add TPM manufacturer CA certificates (PEM: roots and intermediates) to the vendor's trust file."""
    from .tpmcred import load_ca_bundle

    n = len(load_ca_bundle(pem))
    with open(root / EK_CA_FILE, "ab") as f:
        f.write(pem if pem.endswith(b"\n") else pem + b"\n")
    return n


def _trusted_cas(root: Path) -> list[Any]:
    from .tpmcred import load_ca_bundle

    try:
        return load_ca_bundle((root / EK_CA_FILE).read_bytes())
    except FileNotFoundError:
        raise VaultError(
            "this vendor trusts no TPM manufacturer CA yet: add one with `codemoat vendor tpm trust-ca FILE`"
        ) from None


def challenge(vendor: Any, identity: dict[str, Any]) -> dict[str, Any]:
    """Check the identity's EK certificate and AK, and make the credential only that chip can activate."""
    from .tpmcred import ak_name, make_credential, verify_ek_cert

    t = identity.get("tpm")
    if not t:
        raise VaultError("the machine identity has no TPM block (run `codemoat machine-id --tpm` on the machine)")
    if not isinstance(t.get("ak_public"), str):
        raise VaultError(
            "the machine identity lacks the AK's public area: run `codemoat machine-id --tpm` again (newer codemoat)"
        )
    verify_ek_cert(t.get("ek_cert"), t.get("ek") or "", _trusted_cas(vendor.root))
    name = ak_name(t["ak_public"], t["ak"])
    secret = os.urandom(32)
    blob, enc = make_credential(t["ek"], name, secret)
    ak, now = key_id(t["ak"]), int(time.time())
    values = {
        "machine_id": identity["id"],
        "ek_id": key_id(t["ek"]),
        "secret_hash": hashlib.sha256(secret).hexdigest(),
        "challenged_at": now,
    }
    with vendor.engine.begin() as c:
        row = c.execute(sa.select(tpm_keys_t).where(tpm_keys_t.c.ak_id == ak).with_for_update()).first()
        if row is None:
            c.execute(tpm_keys_t.insert().values(ak_id=ak, **values))
        else:
            if (row.machine_id, row.ek_id) != (values["machine_id"], values["ek_id"]):
                values["bound_at"] = None  # a binding proves one AK-EK pair: another pair must be proven anew
            c.execute(tpm_keys_t.update().where(tpm_keys_t.c.ak_id == ak).values(**values))
    return {
        "kind": CHALLENGE_KIND,
        "version": 1,
        "machine_id": identity["id"],
        "ak_id": ak,
        "credential": blob.hex(),
        "secret": enc.hex(),
    }


def _doc(text_or_path: str | dict, kind: str, what: str) -> dict[str, Any]:
    if isinstance(text_or_path, dict):
        d: Any = text_or_path
    else:
        src = text_or_path.strip()
        if not src.startswith("{") and not os.path.lexists(src):
            raise VaultError(f"{what} {text_or_path[:80]!r} is neither a readable file nor JSON")
        try:  # only a regular file of at most 1 MiB: a FIFO or /dev/zero is refused, not read for good
            d = json.loads(src if src.startswith("{") else paths.read_regular(src, what, 1 << 20, VaultError))
        except (UnicodeDecodeError, ValueError):
            raise VaultError(f"{what} {text_or_path[:80]!r} is neither a readable file nor JSON") from None
    fields = ("machine_id", "ak_id", "credential", "secret") if kind == CHALLENGE_KIND else ("machine_id", "ak_id", "secret")
    if not isinstance(d, dict) or d.get("kind") != kind or not all(isinstance(d.get(k), str) for k in fields):
        raise VaultError(f"{what} is not a {kind} document")
    return d


def activate(attestor: Any, machine_id: str, tpm_block: dict[str, Any], challenge_doc: str | dict) -> dict[str, Any]:
    """The machine's answer: the secret its TPM releases from the vendor's credential."""
    ch = _doc(challenge_doc, CHALLENGE_KIND, "TPM challenge")
    if ch["machine_id"] != machine_id or ch["ak_id"] != key_id(tpm_block["ak"]):
        raise VaultError(f"the TPM challenge is for machine {ch['machine_id']}, not this one ({machine_id})")
    try:
        blob, enc = bytes.fromhex(ch["credential"]), bytes.fromhex(ch["secret"])
    except ValueError:
        raise VaultError("the TPM challenge is malformed") from None
    if not 0 < len(blob) <= 512 or not 0 < len(enc) <= 512:
        raise VaultError("the TPM challenge is malformed")
    with attestor as a:
        secret = a.activate_credential(blob, enc)
    return {"kind": ACTIVATION_KIND, "version": 1, "machine_id": machine_id, "ak_id": ch["ak_id"], "secret": secret.hex()}


def confirm(vendor: Any, activation_doc: str | dict) -> dict[str, Any]:
    """Bind the AK once the machine gave back the challenge's secret; each challenge is answered once."""
    act = _doc(activation_doc, ACTIVATION_KIND, "TPM activation")
    try:
        got = hashlib.sha256(bytes.fromhex(act["secret"])).hexdigest()
    except ValueError:
        raise VaultError("the TPM activation is malformed") from None
    now = int(time.time())
    with vendor.engine.begin() as c:
        row = c.execute(sa.select(tpm_keys_t).where(tpm_keys_t.c.ak_id == act["ak_id"]).with_for_update()).first()
        if row is None or row.machine_id != act["machine_id"] or row.secret_hash is None:
            raise VaultError(f"no open TPM challenge for machine {act['machine_id']}: run `codemoat vendor tpm challenge` first")
        if now - row.challenged_at > CHALLENGE_TTL:
            raise VaultError("the TPM challenge has expired: make a new one")
        if not hmac.compare_digest(got, row.secret_hash):
            raise VaultError(
                "the TPM activation does not match the challenge: the attestation key does not live in the TPM "
                "whose EK certificate was checked"
            )
        # A fresh binding also clears the clock floor: the vendor's way back for a chip whose clock went
        # backwards for a reason it accepts (a vTPM restored by its operator, a swtpm state lost).
        c.execute(
            tpm_keys_t.update()
            .where(tpm_keys_t.c.ak_id == act["ak_id"])
            .values(secret_hash=None, bound_at=now, reset_count=None, clock=None)
        )
    return {"machine_id": act["machine_id"], "ak_id": act["ak_id"], "bound_at": now}


def check_unwrap(identity: dict[str, Any]) -> None:
    """The identity's unwrap key (what licenses wrap keys to) is certified by its AK (TPM2_Certify):
    a key the chip made, under the identity's PCR policy. Without it a bound AK could sit beside an
    unwrap key made in software, and an offline license sealed to it would open on any machine."""
    from .tpmcred import unwrap_name
    from .tpmwrap import unwrap_certify_data, verify_certify

    from ..attest.tpm import TAMPER_NV_INDEX, TAMPER_PCR

    t = identity["tpm"]
    if TAMPER_PCR not in t["policy"]["pcrs"]:  # what machine-id's --pcrs requires, checked where it counts
        raise VaultError(
            f"machine {identity['id']}'s TPM policy leaves out the tamper PCR {TAMPER_PCR}, so a tamper event would "
            f"not end serving at once: run `codemoat machine-id --tpm` again (its --pcrs must include {TAMPER_PCR})"
        )
    latch = t["policy"].get("latch")
    if latch is None or latch["index"] != TAMPER_NV_INDEX:
        raise VaultError(
            f"machine {identity['id']}'s TPM policy names no tamper latch (NV index {TAMPER_NV_INDEX:#x}), so a reboot "
            "would undo a tamper event: run `codemoat machine-id --tpm` again (newer codemoat)"
        )
    up, uc = t.get("unwrap_public"), t.get("unwrap_certify")
    if not isinstance(up, str) or not isinstance(uc, dict):
        raise VaultError(
            f"machine {identity['id']}'s identity lacks its AK's certification of the TPM unwrap key: "
            "run `codemoat machine-id --tpm` again (newer codemoat)"
        )
    name = unwrap_name(up, t["unwrap"], t["policy"])
    try:
        attest, r, s = (bytes.fromhex(uc[k]) for k in ("attest", "r", "s"))
    except (KeyError, TypeError, ValueError):
        raise VaultError("the TPM unwrap key's certification is malformed") from None
    try:
        certified = verify_certify(t["ak"], attest, r, s, unwrap_certify_data(t["unwrap"]))
    except VaultError as e:
        raise VaultError(f"the TPM unwrap key is not certified by the attestation key: {e}") from None
    if certified != name:
        raise VaultError("the TPM unwrap key is not the one the attestation key certified: it is not in that chip")


def require_bound(engine: sa.Engine, identity: dict[str, Any]) -> None:
    """Refuse to license a TPM identity whose AK was not proven to live beside its certified EK, or
    whose unwrap key the AK has not certified."""
    t = identity.get("tpm")
    if not t:
        return
    with engine.connect() as c:
        row = c.execute(sa.select(tpm_keys_t).where(tpm_keys_t.c.ak_id == key_id(t["ak"]))).first()
    if row is None or row.bound_at is None or row.machine_id != identity["id"] or row.ek_id != key_id(t.get("ek") or ""):
        raise VaultError(
            f"machine {identity['id']}'s TPM attestation key is not bound to its EK: run `codemoat vendor tpm challenge` "
            "and `codemoat vendor tpm confirm` with the machine first"
        )
    check_unwrap(identity)
    check_crl_count(identity)


def check_crl_count(identity: dict[str, Any]) -> None:
    """The counts the identity names for the CRL counter and the tamper latch are the ones its AK certified at
    `machine-id --tpm`. A start takes the CRL count as 'no CRL installed since' when the clock record has none
    (vault.crl): an identity edited to a higher count let a record from before the first install pass once a revoking
    install brought the chip up to it. A latch count ahead of the chip's (an unwrap key made for it: the chip makes
    any template) unwrapped after one tamper event and a reboot."""
    from ..attest.tpm import CRL_NV_INDEX, TAMPER_NV_INDEX
    from .tpmwrap import CRL_CERTIFY_DOMAIN, LATCH_CERTIFY_DOMAIN

    t = identity["tpm"]
    if t.get("crl") is not None:  # none: refused where the license entry is made (vault.license)
        _certified_count(identity, t["crl"], "crl_certify", CRL_NV_INDEX, CRL_CERTIFY_DOMAIN, "CRL counter")
    _certified_count(identity, t["policy"]["latch"], "latch_certify", TAMPER_NV_INDEX, LATCH_CERTIFY_DOMAIN, "tamper latch")


def _certified_count(identity: dict[str, Any], named: dict[str, Any], key: str, index: int, domain: bytes, what: str) -> None:
    from .tpmwrap import crl_certify_data, verify_nv_certify

    t, cc = identity["tpm"], identity["tpm"].get(key)
    if named["index"] != index or not isinstance(cc, dict):
        raise VaultError(
            f"machine {identity['id']}'s identity lacks its AK's certification of the TPM {what} ({index:#x}): "
            "run `codemoat machine-id --tpm` again (newer codemoat)"
        )
    try:
        attest, r, s = (bytes.fromhex(cc[k]) for k in ("attest", "r", "s"))
    except (KeyError, TypeError, ValueError):
        raise VaultError(f"the TPM {what}'s certification is malformed") from None
    cert = verify_nv_certify(t["ak"], attest, r, s, crl_certify_data(t["ak"], domain), index, f"the TPM {what}'s certification")
    if cert.counter != named["count"]:
        raise VaultError(
            f"machine {identity['id']}'s identity names {what} count {named['count']}, but its TPM certified "
            f"{cert.counter}: the identity was edited; run `codemoat machine-id --tpm` again and send its output unchanged"
        )


def advance_on(
    c: sa.Connection, ak_der_hex: str, machine_id: str, reset_count: int, clock: int, safe: bool = True
) -> tuple[int, int] | None:
    """Record a verified quote's (resetCount, clock) in the caller's transaction (the key server's
    seat transaction: one commit per lease); the last values seen when they went backwards (or when
    an unsafe clock did not come with a new boot), else None."""
    ak = key_id(ak_der_hex)
    p = {"ak": ak, "r": reset_count, "c": clock, "now": int(time.time())}
    for _ in range(3):
        if fast_execute(c, _ADVANCE if safe else _ADVANCE_UNSAFE, p).rowcount:
            return None
        last = fast_execute(c, _LAST, p).fetchone()
        if last is not None:
            return (last[0], last[1])
        try:  # a license issued before AKs were bound: start its record now
            with c.begin_nested():  # a savepoint: a concurrent insert does not abort the caller's transaction
                c.execute(
                    tpm_keys_t.insert().values(
                        ak_id=ak,
                        machine_id=machine_id,
                        reset_count=reset_count,
                        clock=clock,
                        seen_at=p["now"],
                        unsafe_reset=None if safe else reset_count,
                    )
                )
            return None
        except IntegrityError:
            continue  # another request inserted it first: compare against that
    raise VaultError("the TPM clock record could not be updated")


def advance(
    engine: sa.Engine, ak_der_hex: str, machine_id: str, reset_count: int, clock: int, safe: bool = True
) -> tuple[int, int] | None:
    """`advance_on` in a transaction of its own."""
    with engine.begin() as c:
        return advance_on(c, ak_der_hex, machine_id, reset_count, clock, safe)
