"""`codemoat login` without a password: the device authorization grant (RFC 8628), relayed.

    flow = DeviceFlow(oidc_client, engine, ttl_s=300)
    start = flow.start(name=None)         # {device_code, user_code, verification_uri, interval, expires_in}
    user, name = flow.poll(device_code)   # DirUser once the provider said yes; else DeviceError(code)

The CLI never talks to the provider: the server asks the provider's device authorization endpoint
for a code (as its own confidential client), hands the CLI a device code of its own (kept as a
SHA-256 only), and on each poll asks the provider's token endpoint, checks the ID token like the
browser flow does, and then mints the developer's token. Errors are RFC 8628 §3.5's:
`authorization_pending`, `slow_down` (polled before `interval` passed: the interval grows by 5 s),
`expired_token` (past `device_code_ttl_s`, which is at most the provider's own expiry: a phished
code dies soon), `access_denied`; a code that already gave a token is `invalid_grant`. Each check
that changes state is one conditional UPDATE, so two replicas (or two racing polls) cannot both win.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import Engine

from ..errors import CodemoatError, Overloaded, RateLimited
from .ldap import DirectoryUnavailable, DirUser
from .oidc import OidcClient, could_be_ours, meta, stored_hash

GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SLOW_DOWN_STEP_S = 5  # RFC 8628 §3.5: "the interval MUST be increased by 5 seconds"
DEFAULT_INTERVAL_S = 5  # RFC 8628 §3.2: when the provider names none

table = sa.Table(
    "device_pending",
    meta,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("idp_code", sa.String(512)),
    sa.Column("nonce", sa.String(64)),
    sa.Column("name", sa.String(128)),
    sa.Column("interval", sa.Integer),
    sa.Column("last_poll", sa.Float),
    sa.Column("expires_at", sa.Float),
    sa.Column("used_at", sa.Float),
    sa.Column("client", sa.String(64)),  # the address that started it (None: started before d005)
    sa.Index("ix_device_pending_expires_at", "expires_at"),
    sa.Index("ix_device_pending_client", "client"),
)


class DeviceError(CodemoatError):
    """An RFC 8628 token-endpoint error: `code` is the OAuth error name the client acts on."""

    status = 400

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class DeviceUnsupported(CodemoatError):
    """The provider has no device authorization endpoint: sign in through the browser instead."""

    status = 404
    code = "device_flow_unsupported"


@dataclass(frozen=True)
class DeviceStart:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


class DeviceFlow:
    def __init__(self, oidc: OidcClient, engine: Engine, ttl_s: int):
        self.oidc = oidc
        self.engine = engine
        self.ttl_s = ttl_s

    def supported(self) -> bool:
        return bool(self.oidc.metadata().get("device_authorization_endpoint"))

    def start(self, name: str | None = None, client: str | None = None) -> DeviceStart:
        """Ask the provider for a user code; keep its device code behind one of ours. Anyone may ask (no token yet),
        so the unfinished codes are bounded as the browser sign-in's are, before the provider is asked: RateLimited
        past `oidc_pending_per_address` from `client`, Overloaded past `oidc_pending_max` in all."""
        client = (client or "unknown")[:64]
        self._bound(client)
        url = self.oidc.metadata().get("device_authorization_endpoint")
        if not url:
            raise DeviceUnsupported(
                f"the OpenID provider {self.oidc.issuer} has no device flow: sign in through the browser instead"
            )
        import httpx

        nonce = secrets.token_urlsafe(32)
        try:
            r = self.oidc.request(
                "POST",
                url,
                auth=(self.oidc.cfg.oidc_client_id, self.oidc._secret()),
                data={"client_id": self.oidc.cfg.oidc_client_id, "scope": "openid profile groups", "nonce": nonce},
            )
        except httpx.HTTPError as e:
            raise DirectoryUnavailable(f"OpenID provider {self.oidc.issuer} is unreachable: {type(e).__name__}") from None
        body = self.oidc.answer(r, "the device authorization request")
        codes = body.get("device_code"), body.get("user_code")
        if r.status_code != 200 or not all(isinstance(c, str) and 0 < len(c) <= 512 for c in codes):
            raise DeviceError("server_error", f"the OpenID provider refused a device code: {self.oidc.error_of(r)}")
        now = time.time()
        try:  # the provider's numbers, kept within the server's own bounds
            expires_in = int(min(self.ttl_s, int(body.get("expires_in") or self.ttl_s)))
            interval = min(max(int(body.get("interval") or DEFAULT_INTERVAL_S), 1), self.ttl_s)
        except (TypeError, ValueError, OverflowError):
            raise DeviceError(
                "server_error", "the OpenID provider's device code has an expiry or interval that is not a number"
            ) from None
        ours = secrets.token_urlsafe(32)
        with self.engine.begin() as c:
            c.execute(table.delete().where(table.c.expires_at < now - 3600))  # the long dead go on the way
            c.execute(
                table.insert().values(
                    id_hash=stored_hash(ours),
                    idp_code=body["device_code"],
                    nonce=nonce,
                    name=name,
                    interval=interval,
                    last_poll=now,
                    expires_at=now + expires_in,
                    used_at=None,
                    client=client,
                )
            )
        return DeviceStart(
            ours,
            body["user_code"],
            _text(body.get("verification_uri") or body.get("verification_url")) or "",
            _text(body.get("verification_uri_complete")),
            expires_in,
            interval,
        )

    def _bound(self, client: str) -> None:
        cfg, now = self.oidc.cfg, time.time()
        live = sa.and_(table.c.expires_at > now, table.c.used_at.is_(None))
        with self.engine.connect() as c:
            mine = c.execute(sa.select(sa.func.count()).where(live, table.c.client == client)).scalar_one()
            if mine >= cfg.oidc_pending_per_address:
                raise RateLimited(
                    f"too many unfinished device codes from {client} (directory.oidc_pending_per_address = "
                    f"{cfg.oidc_pending_per_address}): finish one, or start again once they expire",
                    retry_after=60,
                )
            if c.execute(sa.select(sa.func.count()).where(live)).scalar_one() >= cfg.oidc_pending_max:
                raise Overloaded(
                    f"too many unfinished device codes on this server (directory.oidc_pending_max = "
                    f"{cfg.oidc_pending_max}): start again in a few minutes"
                )

    def poll(self, device_code: str) -> tuple[DirUser, str | None]:
        """The signed-in user once the provider approved this code; an RFC 8628 `DeviceError` until then."""
        if not could_be_ours(device_code):
            raise DeviceError("invalid_grant", "unknown device code")
        key = stored_hash(device_code)
        now = time.time()
        with self.engine.begin() as c:
            row = c.execute(sa.select(table).where(table.c.id_hash == key)).first()
            if row is None:
                raise DeviceError("invalid_grant", "unknown device code (start again: codemoat login)")
            if row.used_at is not None:
                raise DeviceError("invalid_grant", "this device code was already used")
            if row.expires_at <= now:
                raise DeviceError("expired_token", "the device code expired (start again: codemoat login)")
            # one poll per interval, enforced in one statement (replicas share it)
            won = c.execute(
                table.update().where(table.c.id_hash == key, table.c.last_poll <= now - row.interval + 0.05).values(last_poll=now)
            ).rowcount
            if not won:
                c.execute(
                    table.update().where(table.c.id_hash == key).values(interval=row.interval + SLOW_DOWN_STEP_S, last_poll=now)
                )
        if not won:  # raised after the commit: the longer interval is kept
            raise DeviceError("slow_down", f"polled too fast: wait {row.interval + SLOW_DOWN_STEP_S} s between polls")
        r = self.oidc.token_request({"grant_type": GRANT, "device_code": row.idp_code, "client_id": self.oidc.cfg.oidc_client_id})
        try:
            body = self.oidc.answer(r, "the device code's token request")
        except DirectoryUnavailable:
            body = {}
        if r.status_code != 200:
            err = str(body.get("error", "server_error"))
            if err == "slow_down":
                with self.engine.begin() as c:
                    c.execute(table.update().where(table.c.id_hash == key).values(interval=row.interval + SLOW_DOWN_STEP_S))
            if err in ("access_denied", "expired_token", "invalid_grant"):
                with self.engine.begin() as c:
                    c.execute(table.update().where(table.c.id_hash == key).values(expires_at=now))
            if err not in ("authorization_pending", "slow_down", "access_denied", "expired_token"):
                raise DeviceError("invalid_grant", f"the OpenID provider refused the device code: {err}")
            raise DeviceError(err, _MESSAGES[err])
        with self.engine.begin() as c:  # the first poll to get here wins; any other is a second use
            won = c.execute(table.update().where(table.c.id_hash == key, table.c.used_at.is_(None)).values(used_at=now)).rowcount
        if not won:
            raise DeviceError("invalid_grant", "this device code was already used")
        id_token = body.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise DeviceError("invalid_grant", "the OpenID provider sent no ID token")
        claims = self.oidc.check_id_token(id_token, row.nonce, nonce_required=False)
        return self.oidc.user_from(claims), row.name


_MESSAGES = {
    "authorization_pending": "waiting for you to approve the code in the browser",
    "slow_down": "polled too fast",
    "access_denied": "the sign-in was refused in the browser",
    "expired_token": "the device code expired (start again: codemoat login)",
}
