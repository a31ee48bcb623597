"""The key server's logic (no HTTP): challenges, proof of machine key possession, floating seats.

A lease is two calls. `challenge(license_id, client_nonce)` returns a fresh random server nonce, valid once
for `NONCE_TTL` seconds, signed together with the license id and the client's own random `client_nonce`
(`CHALLENGE_DOMAIN`): a client signs a lease request only over a nonce the key server gave *it*, so a
proxy cannot hand it the nonce of a lease it kept and then that lease. `lease(request)` takes the nonce
back, signed with the machine's Ed25519 key together with the license and machine ids, checks the
license (exists, not revoked, in its dates, names this machine), takes or renews one of its N seats, and answers
with the content key wrapped to that machine's X25519 key under a context that includes the
nonce, a TTL, and an Ed25519 signature of the key server over the whole answer. A replayed
answer carries a nonce the client did not ask for; an edited one fails the signature; a
replayed request carries a spent nonce. Seats are counted inside one database transaction that
first bumps the license row (its write lock), so concurrent requests cannot oversubscribe.

Refusals are signed too (`refusal`): the code, the message, the server's time and the request's
license id, machine id and nonce (the challenge's `client_nonce`), so a client acts on a refusal —
"revoked" unloads the model at once — only when the key server said it about this very request;
anything else (a proxy's error page, an edited or replayed refusal) counts as "unreachable".

A machine bound to a TPM (its license entry has a "tpm" block) also sends a TPM2_Quote by its
attestation key over the license's PCRs, whose qualifyingData is SHA-256 over `QUOTE_DOMAIN` and
the signed request (so the quote is as fresh as the nonce); the key is released only when the
quote verifies (`tpmwrap.verify_quote`), its PCR digest is the policy's, and the TPM's reset count
and clock have not gone backwards (the highest seen per AK is kept in the vendor database, so a
restart forgets nothing); the answer's keys are then wrapped to the chip's unwrap key.
Each such refusal is signed like any other and appended to the vendor's `attestation.jsonl`.

Each serving process (an instance: several replicas may share one machine and its key) makes an
Ed25519 key of its own at start and names its public key in every request (`instance`), with a
second signature by it (`instance_signature`, under `INSTANCE_DOMAIN`); the seats themselves, one per
(machine, instance), are `seats.py`'s.

The server keeps no state for a challenge: a challenge names a license on this server or is refused,
and its nonce carries its license binding and expiry under a MAC of the key server's own key
(`nonces.NonceStore`), so a flood of challenges for a known license id writes nothing and evicts no
genuine client's nonce, several key server processes (`codemoat keyserver --workers N`, or N servers
behind a balancer on one PostgreSQL) accept each other's challenges, and a restart forgets none. A
request's signatures are checked first, so a forged request cannot burn a client's nonce or add a spent
row; the nonce is then spent (a row in the vendor database, once across processes), and stays spent when the lease
is refused after that (bad quote, revoked, seats exhausted, TPM rollback): a genuine one is answered
once. The spend is the seat transaction's first statement, and an attested request's quote or SNP report
is checked after it, in that transaction: a replay costs at most the Ed25519 check, never an attestation
check, and a lease is one commit. A replay of a nonce this process saw spent (`NonceStore.seen_spent`) is
refused before any database read or signature check. The seat transactions of one vendor database are
taken in turn (`db.writer_lock`: across processes too, for an SQLite file), so a worker waits for another's
commit in the kernel rather than in SQLite's polling busy handler.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..db import fast_execute, writer_lock
from .clock import Clock
from .codec import LeaseDenied, VaultError, b64d, b64e, canonical, ed_public, sign, verify, wrap, x_public
from .license import key_context
from .nonces import NonceStore, mac_key
from .seats import live_seats, release_seat, take_seat
from .snpbind import SnpLeaseRefused, verify_snp
from .tpmbind import advance_on
from .tpmwrap import QuoteRefused, verify_quote, wrap_p256
from .vendor import Vendor
from .vendor_crl import revoked_machines

NONCE_TTL = 60.0
DOC_TTL = 2.0  # seconds a process keeps a license document before reading it again
# A quote this much older (TPM clock, ms) than the newest seen, in the same boot and with a safe clock, is
# accepted without moving the floor: two serving processes on one machine quote one after the other, and
# their requests may reach the key server (or two of its workers) in the other order.
REORDER_MS = 10_000
MAX_ID = 128  # longest license id, machine id or nonce a request may carry
REQUEST_DOMAIN = b"codemoat-lease-request-v1"
ANSWER_DOMAIN = b"codemoat-lease-v1"
REFUSAL_DOMAIN = b"codemoat-lease-refusal-v1"
CHALLENGE_DOMAIN = b"codemoat-lease-challenge-v1"
REFUSAL_FIELDS = ("code", "message", "license_id", "machine_id", "nonce", "server_time")
REQUEST_FIELDS = ("license_id", "machine_id", "nonce", "client_time")
INSTANCE_DOMAIN = b"codemoat-lease-instance-v1"
RELEASE_DOMAIN = b"codemoat-lease-release-v1"
# The instance's signature on a release has a domain of its own: one over the same fields for a
# lease (a renewal held back on the way, nonce unspent) must not give that instance's seat back.
RELEASE_INSTANCE_DOMAIN = b"codemoat-lease-release-instance-v1"
QUOTE_DOMAIN = b"codemoat-lease-quote-v1"
ATTEST_LOG = "attestation.jsonl"


# Plain SQL (portable between SQLite and PostgreSQL): a lease is a hot path.
_LICENSE_STATE = sa.text("SELECT revoked_at, expires, not_before, seats, lease_ttl, grace FROM vault_licenses WHERE id = :lid")


# pcr_mismatch and tampered (a tamper event, before or after a reboot) end serving at once, like a
# revocation: only the registered AK's signature shows them. unknown_ak does not: the quote is outside the
# machine's signature, so a proxy could name any AK in a genuine request and get this refusal signed for
# it (a copied home on another chip gains nothing: its keys are wrapped to the registered chip).
TERMINAL = ("revoked", "expired", "unknown_license", "wrong_machine", "not_yet_valid", "pcr_mismatch", "tampered")


def request_message(req: dict[str, Any]) -> bytes:
    """The signed bytes of a request: its fields, and the instance when it names one."""
    fields = {k: req[k] for k in REQUEST_FIELDS}
    if "instance" in req:
        fields["instance"] = req["instance"]
    return canonical(fields)


def quote_data(req: dict[str, Any], message: bytes | None = None) -> bytes:
    """The qualifyingData a TPM quotes for a lease request: binds the quote to its nonce and ids
    (`message`: the request's `request_message`, when the caller has it already)."""
    return hashlib.sha256(QUOTE_DOMAIN + b"\x00" + (message or request_message(req))).digest()


def _bad_nonce() -> LeaseDenied:
    return LeaseDenied("bad_nonce", "nonce is unknown, spent or expired: ask for a new challenge", 401)


def _wrong_machine(lid: str, mid: str) -> LeaseDenied:
    return LeaseDenied("wrong_machine", f"license {lid} does not name machine {mid}")


def _short(v: Any) -> str | None:
    """`v` when it is an id or nonce a request may carry: 1 to `MAX_ID` printable characters (no NUL, which
    PostgreSQL refuses in any text parameter: a 500 for an unsigned challenge; no control characters)."""
    return v if isinstance(v, str) and 0 < len(v) <= MAX_ID and v.isprintable() else None


@dataclass
class _Licensed:
    doc: dict[str, Any]
    machines: dict[str, dict[str, Any]]
    file_id: str
    customer_id: str
    revoked_machines: dict[str, str]  # machine id -> reason (`codemoat vendor revoke --machine`)


class KeyServer:
    """Vendor-side lease state over the vendor database; thread-safe."""

    def __init__(self, vendor: Vendor, clock: Clock | None = None):
        self.vendor = vendor
        self.clock = clock or Clock()
        self.nonces = NonceStore(vendor.engine, self.clock, mac_key(vendor.keyserver_key.private_bytes_raw()))
        self._seat_lock = writer_lock(vendor.engine)  # lease transactions in turn, across processes too
        self._docs: dict[str, tuple[_Licensed, float]] = {}  # license id -> (its facts, when read)
        self._keys: dict[str, bytes] = {}
        self._wm: dict[str, bytes] = {}
        self._attest_lock = threading.RLock()
        self._ed_keys: dict[str, Any] = {}

    # -- nonces -------------------------------------------------------------
    def challenge(self, license_id: Any, client_nonce: Any = None) -> dict[str, Any]:
        """A fresh nonce for a license this server knows, signed with the license id and the caller's
        `client_nonce` (the nonce of a lease a proxy kept, handed to a client as if fresh, fails that
        signature); it writes nothing, for any caller."""
        if _short(license_id) is None:
            raise LeaseDenied("bad_request", f"license_id must be a string of 1 to {MAX_ID} printable characters", 400)
        lic = self._licensed(license_id)
        nonce = self.nonces.issue(lic.doc["id"], NONCE_TTL)  # an HMAC: no write, no lock a flood could hold
        body = {"nonce": nonce, "expires_in": NONCE_TTL, "license_id": lic.doc["id"], "client_nonce": _short(client_nonce)}
        return {**body, "signature": b64e(sign(self.vendor.keyserver_key, CHALLENGE_DOMAIN, canonical(body)))}

    def refusal(self, err: LeaseDenied, req: Any) -> dict[str, Any]:
        """The signed body of a refusal, bound to the request's ids and nonce (`client_nonce` for a challenge)."""
        req = req if isinstance(req, dict) else {}
        body = {
            "code": err.code,
            "message": str(err),
            "license_id": _short(req.get("license_id")),
            "machine_id": _short(req.get("machine_id")),
            "nonce": _short(req.get("nonce")) or _short(req.get("client_nonce")),
            "server_time": int(self.clock.time()),
        }
        return {"error": body, "signature": b64e(sign(self.vendor.keyserver_key, REFUSAL_DOMAIN, canonical(body)))}

    def _spend_nonce(self, c: sa.Connection, nonce: str, license_id: str) -> None:
        """Spend `nonce` in the caller's transaction (atomic across processes), else `bad_nonce`."""
        if not self.nonces.spend_on(c, nonce, license_id):
            raise _bad_nonce()

    # -- license facts ------------------------------------------------------
    def _licensed(self, license_id: str) -> _Licensed:
        """The license as the vendor database holds it, re-read every `DOC_TTL` seconds: a reprovision
        (a new TPM unwrap key under the same PCR values) reaches every key server process that soon."""
        got = self._docs.get(license_id)
        now = time.monotonic()
        if got is None or now - got[1] > DOC_TTL:
            row = self.vendor.license_row(license_id)
            if row is None:
                raise LeaseDenied("unknown_license", f"no license {license_id} on this key server", 404)
            doc = json.loads(row.document)["license"]
            if doc.get("mode") != "lease":  # an offline license carries its key: no challenge, no lease, no seat
                raise LeaseDenied("unknown_license", f"license {license_id} is not a lease license: no leases for it", 404)
            machines = {m["id"]: m for m in doc["machines"]}
            revoked = revoked_machines(self.vendor.engine, machines)
            got = (_Licensed(doc, machines, row.file_id, row.customer_id, revoked), now)
            self._docs[license_id] = got
        return got[0]

    def _machine_key(self, b64: str) -> Any:
        """A licensed machine's Ed25519 key, parsed once (licenses name a bounded set of machines)."""
        key = self._ed_keys.get(b64)
        if key is None:
            key = self._ed_keys[b64] = ed_public(b64, "machine key")
        return key

    def _content_key(self, file_id: str) -> bytes:
        key = self._keys.get(file_id)
        if key is None:
            key = self._keys[file_id] = self.vendor.content_key(file_id)
        return key

    def _watermark_key(self, customer_id: str) -> bytes:
        key = self._wm.get(customer_id)
        if key is None:
            key = self._wm[customer_id] = self.vendor.customer_by_id(customer_id).watermark_secret
        return key

    # -- leases -------------------------------------------------------------
    def _signed(self, req: Any, kind: str, domain: bytes) -> tuple[_Licensed, dict[str, Any], bytes]:
        """A `kind` ("lease", "release") request's license, machine entry and signed bytes, once its shape holds,
        its nonce is not one this process saw spent (a replay: no database read, no signature check) and the
        licensed machine's key signed it under `domain`; else `LeaseDenied`."""
        if (
            not isinstance(req, dict)
            or not all(_short(req.get(k)) for k in REQUEST_FIELDS[:3])
            or type(req.get("client_time")) is not int  # signed, and a number: not true/false, a string or a list
            or not isinstance(req.get("signature"), str)
        ):
            raise LeaseDenied("bad_request", f"{kind} request is malformed", 400)
        lid, mid = req["license_id"], req["machine_id"]
        if self.nonces.seen_spent(lid, req["nonce"]):
            raise _bad_nonce()
        lic = self._licensed(lid)
        entry = lic.machines.get(mid)
        if entry is None:
            raise _wrong_machine(lid, mid)
        msg = request_message(req)  # signed twice (machine, instance) and quoted: made once
        try:
            sig = b64d(req["signature"], "request signature")
            verify(self._machine_key(entry["ed25519"]), sig, domain, msg, f"{kind} request")
        except VaultError:
            raise LeaseDenied("bad_signature", f"{kind} request is not signed by the licensed machine's key", 401) from None
        return lic, entry, msg

    def lease(self, req: Any) -> dict[str, Any]:
        """Check a signed lease request and answer with a signed, wrapped lease (or raise `LeaseDenied`)."""
        lic, entry, msg = self._signed(req, "lease", REQUEST_DOMAIN)
        lid, mid = req["license_id"], req["machine_id"]
        inst = self._instance(req, INSTANCE_DOMAIN, msg)
        if mid in lic.revoked_machines:
            raise LeaseDenied("revoked", f"machine {mid} was revoked by the vendor: {lic.revoked_machines[mid]}")
        now = self.clock.time()
        # One transaction spends the nonce (its first write: the write lock before any read), checks an attested
        # request's quote or report, reads the license's state, takes the seat and issues the next nonce, so a
        # revocation or another machine's allocation cannot slip in between, and a replay (the nonce already
        # spent) costs no attestation check. A refusal after the nonce is spent commits the spend alone.
        refused: LeaseDenied | None = None
        with self._seat_lock, self.vendor.engine.begin() as c:
            self._spend_nonce(c, req["nonce"], lid)
            try:
                info = None
                if entry.get("tpm") is not None:
                    entry, info = self._attested(lid, mid, req, quote_data(req, msg))
                if entry.get("snp") is not None:  # an SEV-SNP guest: its report over this request, or nothing
                    try:
                        verify_snp(self.vendor.root, entry["snp"], req.get("snp"), quote_data(req, msg))
                    except SnpLeaseRefused as e:
                        raise self._attest_refused(req, e.code, str(e)) from None
                if info is not None:  # the TPM clock floor, in the same transaction (one commit per lease)
                    self._tpm_floor(c, lid, mid, entry["tpm"]["ak"], info)
                revoked_at, expires, not_before, seats, lease_ttl, grace = fast_execute(
                    c, _LICENSE_STATE, {"lid": lid}
                ).fetchone()
                if revoked_at:
                    raise LeaseDenied("revoked", f"license {lid} was revoked")
                if now >= expires:
                    raise LeaseDenied("expired", f"license {lid} has expired")
                if now < not_before:
                    raise LeaseDenied("not_yet_valid", f"license {lid} is not valid yet")
                ttl = min(lease_ttl, max(1, int(expires - now)))
                per_machine = (lic.doc.get("lease") or {}).get("max_seats_per_machine")  # signed by the vendor
                used = take_seat(c, lid, mid, inst, seats, now, ttl, grace, per_machine)
                # The nonce for this machine's next renewal: one round trip per heartbeat, still server-chosen.
                next_nonce = self.nonces.issue_on(c, lid, ttl + grace + NONCE_TTL)
            except LeaseDenied as e:
                refused = e
        self.nonces.remember_spent(lid, req["nonce"])
        if refused is not None:
            raise refused
        # One wrap carries both keys: the content key, then the watermark key when the license has one.
        secret = self._content_key(lic.file_id)
        if lic.doc.get("watermark"):
            secret += self._watermark_key(lic.customer_id)
        ctx = key_context("lease-keys", lid, b64d(req["nonce"]))
        tpm = entry.get("tpm")
        if tpm is not None:  # only that chip, with the policy's PCR values, can unwrap
            keys = wrap_p256(tpm["unwrap"], secret, ctx)
        else:
            keys = wrap(x_public(entry["x25519"], "machine x25519 key"), secret, ctx)
        body = {
            "license_id": lid,
            "machine_id": mid,
            "nonce": req["nonce"],
            "server_time": int(now),
            "ttl": ttl,
            "grace": grace,
            "seats": seats,
            "seats_used": used,
            "keys": keys,
            "next_nonce": next_nonce,
        }
        if tpm is not None:  # the policy the keys are sealed under (new values after a reprovision)
            body["tpm"] = {"unwrap": tpm["unwrap"], "policy": tpm["policy"]}
        return {"lease": body, "signature": b64e(sign(self.vendor.keyserver_key, ANSWER_DOMAIN, canonical(body)))}

    def _attested(self, lid: str, mid: str, req: dict[str, Any], qdata: bytes) -> tuple[dict[str, Any], Any]:
        """The machine entry and the quote's facts, once the quote holds; else a refusal, recorded vendor-side."""
        for attempt in (0, 1):
            entry = self._licensed(lid).machines.get(mid)
            if entry is None:  # the vendor took the machine off the license since the first lookup
                raise _wrong_machine(lid, mid)
            if entry.get("tpm") is None:  # now bound to its software keys: the lease a first lookup would give
                return entry, None
            try:
                info = verify_quote(entry["tpm"], req.get("quote"), qdata)
                break
            except QuoteRefused as e:
                if attempt == 0 and e.code in ("pcr_mismatch", "tampered", "unknown_ak"):
                    self._docs.pop(lid, None)  # the vendor may have reprovisioned since this was cached
                    continue
                raise self._attest_refused(req, e.code, str(e)) from None
        return entry, info

    def _attest_refused(self, req: dict[str, Any], code: str, message: str) -> LeaseDenied:
        """The refusal of a request whose quote or report did not hold, recorded vendor-side once per nonce:
        the nonce was spent before the check, in the transaction that commits with this refusal, so the same
        signed request replayed (its quote edited: the quote is outside the machine's signature) is `bad_nonce`,
        neither checked nor recorded again."""
        self._record_refusal(req["license_id"], req["machine_id"], code, message)
        return LeaseDenied(code, message)

    def _tpm_floor(self, c: sa.Connection, lid: str, mid: str, ak: str, info: Any) -> None:
        """Refuse a TPM whose (resetCount, clock) is below the highest seen for its AK. The floor is the
        vendor database's (`tpmbind.advance_on`): a key server restart or a second process forgets nothing."""
        last = advance_on(c, ak, mid, info.reset_count, info.clock, info.safe)
        if last is not None and info.safe and info.reset_count == last[0] and last[1] - info.clock <= REORDER_MS:
            return  # a request overtaken by a later one of the same boot: not a rollback
        if last is not None:
            if (info.reset_count, info.clock) >= last:  # only the safe flag stands in the way
                msg = (
                    f"TPM clock is not safe (clockInfo.safe = NO: it may have gone back) and its reset count "
                    f"{info.reset_count} is not above the {last[0]} already seen: a restored TPM state, or a "
                    "power loss the chip did not count; a clean reboot, or the vendor binding the chip again, clears it"
                )
            else:
                msg = (
                    f"TPM reset count or clock went backwards ({info.reset_count}/{info.clock} after "
                    f"{last[0]}/{last[1]}): a restored or replayed TPM state"
                )
            self._record_refusal(lid, mid, "tpm_rollback", msg)
            raise LeaseDenied("tpm_rollback", msg)

    def _record_refusal(self, lid: str, mid: str, code: str, message: str) -> None:
        line = json.dumps(
            {"time": int(time.time()), "license_id": lid, "machine_id": mid, "code": code, "message": message},
            separators=(",", ":"),
        )
        with self._attest_lock, open(self.vendor.root / ATTEST_LOG, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    @staticmethod
    def _instance(req: dict[str, Any], domain: bytes, msg: bytes) -> str:
        """The serving process a request speaks for ("" when it names none, one seat per machine):
        its Ed25519 public key, proven by a second signature over the same request under `domain`
        (`INSTANCE_DOMAIN` for a lease, `RELEASE_INSTANCE_DOMAIN` for a release)."""
        if "instance" not in req:
            return ""
        inst = req["instance"]
        try:
            if _short(inst) is None:
                raise VaultError("instance is not a key")
            pub = ed_public(inst, "instance key")
            verify(pub, b64d(req.get("instance_signature"), "instance signature"), domain, msg, "instance")
        except VaultError:
            raise LeaseDenied("bad_signature", "lease request is not signed by the instance key it names", 401) from None
        return inst

    def release(self, req: Any) -> dict[str, Any]:
        """Give a seat back (a server shutting down); authenticated like a lease request."""
        _, _, msg = self._signed(req, "release", RELEASE_DOMAIN)
        lid, mid = req["license_id"], req["machine_id"]
        inst = self._instance(req, RELEASE_INSTANCE_DOMAIN, msg)  # only the instance's own key gives its seat back
        with self._seat_lock, self.vendor.engine.begin() as c:
            self._spend_nonce(c, req["nonce"], lid)
            release_seat(c, lid, mid, inst)
        self.nonces.remember_spent(lid, req["nonce"])
        return {"released": True}

    def live_leases(self, license_id: str) -> int:
        """Seats of the license held now (leases not yet expired)."""
        with self.vendor.engine.connect() as c:
            return live_seats(c, license_id, self.clock.time())
