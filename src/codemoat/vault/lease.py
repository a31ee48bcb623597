"""The customer's side of a key lease: ask, prove, check the signed answer, and keep renewing.

Every request body is appended verbatim to `$CODEMOAT_HOME/outbound.jsonl` *before* it is sent
(and its answer's status after), so the customer can read everything that leaves the machine:
a license id, a machine id, a server nonce, the time and a signature; never code or prompts.

`leasekeeper.LeaseKeeper` renews the lease in the background and says when the model must go.

A refusal acts only when the key server signed it for this request (its license id, machine id and
nonce; a challenge carries a random `client_nonce` for that), and a lease request is signed only over a
nonce the key server signed for this client's own challenge (or handed out in a lease it signed), so a
lease a proxy kept cannot be answered to a later request. An unsigned, mis-signed or replayed
refusal — an on-path proxy answering "revoked" — is `Unreachable`: the model serves on through
TTL + grace as in any outage. Each signed server time raises this machine's clock floor.

On a machine bound to a TPM (its license entry has a "tpm" block) each lease request also carries
a quote by the chip's attestation key over the license's PCRs (`keyserver.quote_data`), and the
answer's keys are unwrapped with ECDH inside the chip, under the PCR policy the signed answer
names (so a reprovisioned policy needs no new license file).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..paths import outbound_log as outbound_path
from ..deadline import ANSWER_TIMEOUTS, DeadlinePassed, within
from ..errors import CodemoatError
from .clock import Clock, ClockGuard, iso
from .codec import VaultError, b64d, b64e, canonical, ed_public, public_raw, sign, unwrap, verify
from .container import content_key_id
from .keyserver import (
    ANSWER_DOMAIN,
    CHALLENGE_DOMAIN,
    INSTANCE_DOMAIN,
    REFUSAL_DOMAIN,
    RELEASE_DOMAIN,
    RELEASE_INSTANCE_DOMAIN,
    REQUEST_DOMAIN,
    LeaseDenied,
    quote_data,
    request_message,
)
from .license import License, key_context
from .machine import MachineKey
from .tpmwrap import quote_json, unwrap_p256

TIMEOUT_S = 5.0  # each connect, read and write of a key server request (httpx's timeout; not the whole answer)
MAX_ANSWER = 256 * 1024  # a key server answer is a few kB (a TPM policy included); a longer one is not read on
T = TypeVar("T")
_log_lock = threading.Lock()


_log_files: dict[Path, Any] = {}


def record_outbound(destination: str, method: str, body: str | None, status: int | None, rid: str) -> None:
    """Append one line to the customer's outbound log (what was sent, or the status it got).

    The line is flushed to the file before this returns, so a request is on record before it leaves."""
    line = json.dumps(
        {"id": rid, "time": iso(time.time()), "destination": destination, "method": method, "body": body, "status": status},
        ensure_ascii=False,
    )
    path = outbound_path()
    with _log_lock:
        f = _log_files.get(path)
        if f is not None and not f.closed and not _still_at(f, path):  # rotated or removed: a new file at the path
            f.close()
            f = None
        if f is None or f.closed:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            f = _log_files[path] = open(fd, "a", encoding="utf-8")
        f.write(line + "\n")
        f.flush()


def _still_at(f: Any, path: Path) -> bool:
    """Whether the file `f` holds open is still the one at `path` (an operator's logrotate moves it aside)."""
    try:
        a, b = os.fstat(f.fileno()), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Unreachable(VaultError):
    status = 503
    code = "keyserver_unreachable"


@dataclass
class Lease:
    content_key: bytes
    watermark_key: bytes | None
    ttl: int
    grace: int
    seats: int
    seats_used: int
    server_time: int
    sent_at: float  # monotonic time the request left: the lease runs from here

    @property
    def expires_at(self) -> float:
        return self.sent_at + self.ttl


class LeaseClient:
    """Talks to the key server named in a lease license, on behalf of this machine."""

    def __init__(
        self,
        lic: License,
        machine: MachineKey,
        *,
        clock: Clock | None = None,
        timeout: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        if lic.mode != "lease":
            raise VaultError("not a lease license")
        self.lic, self.machine, self.clock = lic, machine, clock or Clock()
        self.url, self.timeout = lic.lease["url"].rstrip("/"), TIMEOUT_S if timeout is None else timeout
        self.server_key = ed_public(lic.lease["server_key"], "key server public key")
        self._http = httpx.Client(timeout=timeout, transport=transport, trust_env=False)
        self._next_nonce: str | None = None
        # This process's own seat: a key made here, never stored, named in every request and
        # proven by a second signature (a crashed process's seat lapses after its TTL and grace).
        self._instance_key = Ed25519PrivateKey.generate()
        self.instance = b64e(public_raw(self._instance_key.public_key()))
        entry = next((m for m in lic.machines if m["id"] == machine.id), None)
        self.tpm: dict[str, Any] | None = entry.get("tpm") if entry else None

    def bounded(self, fn: Callable[[], T]) -> T:
        """fn() (`acquire`, `release`), or `Unreachable` when its answer is not complete within ANSWER_TIMEOUTS
        times the timeout: httpx's timeout bounds each read, and a tarpit must not hold serve's start or stop."""
        try:
            return within(self.timeout * ANSWER_TIMEOUTS, fn, f"key server at {self.url}")
        except DeadlinePassed as e:
            raise Unreachable(str(e)) from None

    @property
    def destination(self) -> str:
        """host:port of the key server, for the egress allow-list."""
        u = httpx.URL(self.url)
        return f"{u.host}:{u.port or (443 if u.scheme == 'https' else 80)}"

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, payload: dict[str, Any], nonce: str) -> dict[str, Any]:
        """POST `payload`; a refusal raises `LeaseDenied` only when signed for `nonce` and this
        license and machine, else `Unreachable`."""
        url = self.url + path
        body = json.dumps(payload, separators=(",", ":"))
        rid = uuid.uuid4().hex[:12]
        record_outbound(url, "POST", body, None, rid)
        try:
            # streamed and cut off at MAX_ANSWER: a proxy answering with an endless body at full speed filled
            # this process's memory (gigabytes in seconds) before any deadline could end the wait
            with self._http.stream("POST", url, content=body, headers={"content-type": "application/json"}) as r:
                status, raw = r.status_code, bytearray()
                for chunk in r.iter_bytes():
                    raw += chunk
                    if len(raw) > MAX_ANSWER:
                        raise Unreachable(f"key server at {self.url} answered {status} with over {MAX_ANSWER} bytes")
        except (httpx.HTTPError, Unreachable) as e:
            record_outbound(url, "POST", None, 0, rid)  # no whole answer (cut short, or too long): as no answer
            if isinstance(e, Unreachable):
                raise
            raise Unreachable(f"key server unreachable at {self.url}: {type(e).__name__}") from None
        record_outbound(url, "POST", None, status, rid)  # the answer's status once it is whole
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # nested past the decoder's limit too: not an answer, an outage
            raise Unreachable(f"key server at {self.url} answered {status} without JSON") from None
        if status != 200:
            raise self._refusal(data, status, nonce, payload.get("machine_id"))
        if not isinstance(data, dict):
            raise VaultError("key server answer is not a JSON object")
        return data

    def _refusal(self, data: Any, status: int, nonce: str, machine_id: str | None) -> VaultError:
        """`LeaseDenied` for a refusal the key server signed for this request (its nonce, this license,
        and `machine_id`: this machine's, or None for a challenge, which names none), else `Unreachable`."""
        err = data.get("error") if isinstance(data, dict) else None
        code = err.get("code") if isinstance(err, dict) and isinstance(err.get("code"), str) else "error"
        try:
            verify(
                self.server_key,
                b64d(data.get("signature"), "refusal signature"),
                REFUSAL_DOMAIN,
                canonical(err),
                "key server refusal",
            )
            bound = err.get("nonce") == nonce and err.get("license_id") == self.lic.id and err.get("machine_id") == machine_id
        except (VaultError, TypeError, ValueError):
            bound = False
        if not bound:
            return Unreachable(
                f"key server at {self.url} answered HTTP {status} ({code[:40]}) without a valid "
                "signature for this request: treated as unreachable"
            )
        if isinstance(err.get("server_time"), int):
            self._saw_time(err["server_time"])
        return LeaseDenied(code, f"key server refused the lease: {err.get('message', code)}", status)

    def _saw_time(self, t: int) -> None:
        """A time the key server signed: this machine's clock floor moves up to it."""
        try:
            ClockGuard(self.machine, self.clock).raise_floor(t)
        except VaultError:
            pass  # no clock record here (a machine key without one is refused by the license check)

    def _signed_request(self, nonce: str, domain: bytes) -> dict[str, Any]:
        req = {
            "license_id": self.lic.id,
            "machine_id": self.machine.id,
            "nonce": nonce,
            "client_time": int(self.clock.time()),
            "instance": self.instance,
        }
        msg = request_message(req)
        req["signature"] = b64e(sign(self.machine.ed25519, domain, msg))
        inst_domain = RELEASE_INSTANCE_DOMAIN if domain == RELEASE_DOMAIN else INSTANCE_DOMAIN
        req["instance_signature"] = b64e(sign(self._instance_key, inst_domain, msg))
        if self.tpm is not None and domain == REQUEST_DOMAIN:
            try:
                with self.machine.attestor() as a:
                    q = a.quote(self.tpm["policy"], quote_data(req), self.tpm["ak"])
            except VaultError:
                raise
            except CodemoatError as e:  # the TPM gone or refusing: a failed renewal, counted against TTL + grace
                raise VaultError(f"TPM: {e}") from None
            req["quote"] = quote_json(self.tpm["ak"], q)
        return req

    def _unwrap(self, wrapped: Any, context: bytes, tpm: Any) -> bytes:
        if self.tpm is None:
            return unwrap(self.machine.x25519, wrapped, context, "leased keys")
        if not isinstance(tpm, dict) or not isinstance(tpm.get("unwrap"), str) or not isinstance(tpm.get("policy"), dict):
            raise VaultError("key server answer names no TPM policy for a TPM-bound license")
        try:
            with self.machine.attestor() as a:
                a.unwrap_public(tpm["policy"], tpm["unwrap"])  # the persistent key when it is that one (attest.tpmraw)
                return unwrap_p256(lambda p: a.zgen(tpm["policy"], p), tpm["unwrap"], wrapped, context, "leased keys")
        except VaultError:
            raise
        except CodemoatError as e:
            raise VaultError(f"TPM: {e}") from None

    def _challenge(self) -> str:
        """A nonce the key server signed for this very challenge (our `client_nonce`, this license), else
        `Unreachable`: a proxy handing out the nonce of a lease it kept would then answer with that lease."""
        mine = b64e(secrets.token_bytes(18))
        ans = self._post("/v1/lease/challenge", {"license_id": self.lic.id, "client_nonce": mine}, mine)
        if "signature" not in ans and isinstance(ans.get("nonce"), str):  # the answer of a key server before 2026-12-07
            raise Unreachable(
                f"key server at {self.url} signs no challenge answers: it is older than this client (upgrade key servers "
                "before the servers that lease from them), or something on the way stripped the signature; treated as "
                "unreachable"
            )
        body = {k: v for k, v in ans.items() if k != "signature"}
        try:
            verify(
                self.server_key, b64d(ans.get("signature"), "challenge signature"), CHALLENGE_DOMAIN, canonical(body), "challenge"
            )
            bound = body.get("client_nonce") == mine and body.get("license_id") == self.lic.id
        except (VaultError, ValueError, RecursionError):  # canonical() refuses NaN
            bound = False
        if not bound:
            raise Unreachable(
                f"key server at {self.url} answered a challenge without a valid signature for it: treated as unreachable"
            )
        nonce = body.get("nonce")
        if not isinstance(nonce, str):
            raise VaultError("key server challenge has no nonce")
        return nonce

    def acquire(self) -> Lease:
        """Take or renew this machine's lease; raises `LeaseDenied`, `Unreachable` or `VaultError`.

        A renewal uses the nonce the previous answer handed out (one round trip); the first
        lease, or one after the server forgot that nonce (restart), asks for a challenge."""
        sent_at = self.clock.monotonic()
        nonce, self._next_nonce = self._next_nonce, None
        if nonce is None:
            nonce = self._challenge()
        try:
            ans = self._post("/v1/lease", self._signed_request(nonce, REQUEST_DOMAIN), nonce)
        except LeaseDenied as e:
            if e.code != "bad_nonce":
                raise
            nonce = self._challenge()
            ans = self._post("/v1/lease", self._signed_request(nonce, REQUEST_DOMAIN), nonce)
        body = ans.get("lease")
        if not isinstance(body, dict):
            raise VaultError("key server answer has no lease")
        verify(
            self.server_key, b64d(ans.get("signature"), "lease signature"), ANSWER_DOMAIN, canonical(body), "key server answer"
        )
        if body.get("nonce") != nonce or body.get("license_id") != self.lic.id or body.get("machine_id") != self.machine.id:
            raise VaultError("key server answer is for another request (replayed)")
        keys = self._unwrap(body.get("keys"), key_context("lease-keys", self.lic.id, b64d(nonce)), body.get("tpm"))
        key, wm = keys[:32], (keys[32:64] if len(keys) >= 64 else None)
        if content_key_id(key) != self.lic.model["key_id"]:
            raise VaultError("leased content key does not open the licensed model")
        if isinstance(body.get("next_nonce"), str):
            self._next_nonce = body["next_nonce"]
        lic_lease = self.lic.lease
        ttl = body.get("ttl")
        if not isinstance(ttl, int) or ttl <= 0:
            raise VaultError("key server answer has no valid TTL")
        server_time = body.get("server_time")
        if isinstance(server_time, int):
            self._saw_time(server_time)
        return Lease(
            key,
            wm,
            min(ttl, lic_lease["ttl"]),
            lic_lease["grace"],
            int(body.get("seats", 0)),
            int(body.get("seats_used", 0)),
            int(server_time or 0),
            sent_at,
        )

    def release(self) -> None:
        """Give the seat back (best effort: an unreachable server frees it when the lease expires)."""
        try:
            nonce, self._next_nonce = self._next_nonce, None
            nonce = nonce or self._challenge()
            try:
                self._post("/v1/lease/release", self._signed_request(nonce, RELEASE_DOMAIN), nonce)
            except LeaseDenied as e:
                if e.code != "bad_nonce":  # a key server restarted since: its nonce is forgotten
                    raise
                nonce = self._challenge()
                self._post("/v1/lease/release", self._signed_request(nonce, RELEASE_DOMAIN), nonce)
        except VaultError:
            pass
