"""The trust layer wired into the app: audit every request, quotas, secrets, egress guard, metrics, admin API.

`install(app, settings)` (called by `create_app`) adds:

* an ASGI middleware that writes exactly one audit record per API request, after its response
  has finished (streams included); health and metrics probes are not recorded. Before handling
  it checks that the audit log can be written, and refuses with 503 if not; a complete
  (non-streamed) response is held until its record is written, and replaced by a 503 if that
  fails, so nothing is served unaudited. A request cut off by a disconnect or by shutdown is
  recorded as 499, and shutdown waits (up to 15 s) for those records;
* with `policy.secrets = "block"`, a screen of every string in each POST body before any route
  sees it (400 in the caller's protocol, audited with the kinds found, never the values);
  `screen_prompt(text, settings, request)` gives routes the same check and the redacted text;
* `app.state.check_quota(request, principal)`, called by the auth dependency (429 + Retry-After);
* the egress guard (loopback, `policy.egress_allow`, `app.state.egress_allow`, the database host);
* `GET /metrics` (Prometheus) and the admin API under `/admin/api/` (scope `admin`);
* the distillation alarms, fed by every successful request.

Handlers fill `request.state.usage` (protocol, model, prompt/completion tokens, repos, snippets,
prompt_text, completion_text, event); the text is kept only with `audit.retain_text`, redacted.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.engine import make_url

from .. import paths
from ..accounts import Principal
from ..audit import egress
from ..audit.alarms import AlarmPolicy, Alarms
from ..audit.log import AuditLog, AuditUnavailable, check_kind, head_file_for, parse_since
from ..audit.metrics import CONTENT_TYPE, Metrics
from ..audit.quota import Quotas
from ..audit.redact import find_secrets, redact, screen
from ..config import Settings
from ..db import open_db
from ..errors import CodemoatError
from .auth import require

log = logging.getLogger("codemoat.audit")

UNAUDITED = frozenset({"/health", "/metrics", "/v1/health"})
_CHAT_ROUTES = ("/chat/completions", "/api/chat")


class Trust:
    """What the trust layer keeps for one app (`app.state.trust`)."""

    def __init__(self, app: FastAPI, settings: Settings):
        self.app = app
        self.settings = settings
        url = settings.database_url or paths.db_url()
        accounts = getattr(app.state, "accounts", None)
        if settings.database_url is None and accounts is not None and getattr(accounts, "engine", None) is not None:
            url = accounts.engine.url.render_as_string(hide_password=False)
        self.db_url = url
        self.log = AuditLog(open_db(url), checkpoint_every=settings.audit.checkpoint_every, head_file=head_file_for(url, paths.home()))
        self.log.signer  # load or create the signing key now: a key problem should stop start-up, not a request
        self.quotas = Quotas(settings.policy.requests_per_minute, settings.policy.tokens_per_day)
        self.quotas.seed(self.log)
        self.alarms = Alarms(AlarmPolicy(throttle_rpm=int(getattr(settings.audit, "alarm_throttle_rpm", 0) or 0)))
        self.alarms.seed(self.log)  # each user's own baseline survives a restart
        self.metrics = Metrics(self.live)
        self.in_flight = 0
        # Audit I/O gets its own threads, so that it never queues behind other blocking work.
        self.limiter = anyio.CapacityLimiter(4)
        self.guard = egress.EgressGuard(
            allow=self._static_allow(url), extra=lambda: getattr(app.state, "egress_allow", None) or (),
            on_refuse=self._egress_refused,
        )

    def _static_allow(self, url: str) -> list[str]:
        allow = list(self.settings.policy.egress_allow)
        host = self.settings.server.host
        if host and not egress.is_loopback(host) and egress.parse_rule(host).net is None:
            allow.append(host)  # our own interface, by name: binding resolves it
        u = make_url(url)
        if u.host:  # a PostgreSQL server holding the shared state
            allow.append(f"{u.host}:{u.port or 5432}" if ":" not in u.host else f"[{u.host}]:{u.port or 5432}")
        return allow

    def live(self) -> dict[str, Any]:
        holder = getattr(self.app.state, "holder", None)
        info = dict(getattr(holder, "info", {}) or {})
        depth = getattr(self.app.state, "queue_depth", None)
        if callable(depth):
            depth = depth()
        if depth is None:  # the service's admission line (server.max_concurrent slots)
            depth = getattr(getattr(self.app.state, "service", None), "waiting", None)
        if depth is None:
            depth = max(0, self.in_flight - self.settings.server.max_concurrent)
        lease_state, lease_left = info.get("lease_state"), info.get("lease_seconds_left")
        keeper = getattr(holder, "keeper", None)  # the vault's LeaseKeeper, for a leased license
        if keeper is not None:
            try:
                d = keeper.describe()
                lease_state, lease_left = lease_state or d.get("state"), d.get("seconds_left", lease_left)
            except Exception as e:  # a scrape must not fail because the lease is in flux
                log.debug("lease state unavailable: %s", e)
        if lease_state is None and info.get("license_mode"):
            lease_state = str(info["license_mode"])  # offline: no lease to keep
        return {
            "loaded": bool(getattr(holder, "loaded", False)),
            "model_state": getattr(holder, "state", None),
            "queue_depth": depth,
            "in_flight": self.in_flight,
            "lease_state": lease_state,
            "expires_at": info.get("expires_at", info.get("license_expires_at")),
            "lease_seconds_left": lease_left,
        }

    def _egress_refused(self, event: str, destination: str) -> None:
        self.metrics.egress_blocked.inc()
        try:
            self.log.append("egress_blocked", detail={"event": event, "destination": destination})
            self.metrics.audit_records.labels("egress_blocked").inc()
        except AuditUnavailable:
            pass  # logged by the audit log; the refusal itself stands

    def shutdown(self) -> None:
        egress.disarm(self.guard)
        try:
            self.log.checkpoint("shutdown")
        except Exception as e:  # the server is going down anyway; say so
            log.error("could not sign the shutdown checkpoint of the audit log: %s", e)

    # -- one request's record -----------------------------------------------------------
    def write(self, scope: dict, status: int, seconds: float, note: str | None) -> None:
        """Append the request's record; raises `AuditUnavailable`."""
        state = scope.get("state") or {}
        usage: dict[str, Any] = state.get("usage") or {}
        principal: Principal | None = state.get("principal")
        route_obj = scope.get("route")
        route = getattr(route_obj, "path", None) or scope.get("path", "")[:200]
        client = scope.get("client")
        prompt_text = usage.get("prompt_text") or ""
        completion_text = usage.get("completion_text") or ""
        detail: dict[str, Any] = {"method": scope.get("method")}
        secrets = set(usage.get("secrets") or ())
        if prompt_text:
            secrets.update(f.kind for f in find_secrets(prompt_text))
        if secrets:
            detail["secrets"] = sorted(secrets)
            for k in secrets:
                self.metrics.secrets.labels(k).inc()
        if usage.get("event"):
            detail["event"] = str(usage["event"])[:32]
        if note:
            detail["note"] = note
        retain = self.settings.audit.retain_text
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        self.log.append(
            "request",
            user=principal.user if principal else None,
            token_id=principal.token_id if principal else None,
            route=route,
            protocol=usage.get("protocol") or state.get("protocol"),
            model=usage.get("model"),
            repos=list(usage.get("repos") or []),
            snippets=list(usage.get("snippets") or []),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_ms=seconds * 1000,
            status=status,
            client=f"{client[0]}" if client else None,
            prompt_text=redact(prompt_text)[0] if retain and prompt_text else None,
            completion_text=redact(completion_text)[0] if retain and completion_text else None,
            detail=detail,
        )
        try:  # the record is written; what follows must not turn the response into an error
            self.metrics.audit_records.labels("request").inc()
            self.metrics.observe(route if route_obj is not None else "unmatched", usage.get("protocol") or "", status, seconds,
                                 prompt_tokens, completion_tokens)
            if principal is not None and (200 <= status < 300 or status == 499):  # 499: what was generated before the hang-up
                self.quotas.add_tokens(principal.user, principal.token_id, completion_tokens)
                kind = "event" if usage.get("event") else ("chat" if route.endswith(_CHAT_ROUTES) else "completion")
                alert = self.alarms.observe(principal.user, kind=kind, prompt_text=prompt_text,
                                            completion_tokens=completion_tokens, event=usage.get("event"))
                if alert is not None:
                    self._raise_alert(alert)
        except Exception:
            log.exception("after auditing %s", route)

    def _raise_alert(self, alert) -> None:
        rpm = self.alarms.policy.throttle_rpm
        self.log.append("alert", user=alert.user, detail={
            "alarm": "distillation", "reasons": alert.reasons, "signals": alert.signals,
            "throttled_rpm": rpm or None,
        })
        self.metrics.alerts.inc()
        self.metrics.audit_records.labels("alert").inc()
        log.warning("distillation alarm for user %s: %s", alert.user, ", ".join(alert.reasons))
        if rpm:
            self.quotas.throttle(alert.user, rpm, 3600)


class AuditMiddleware:
    """Pure ASGI: one audit record per API request, written after the response (see module doc)."""

    def __init__(self, app, trust: Trust):
        self.app = app
        self.trust = trust

    async def __call__(self, scope, receive, send):
        t = self.trust
        if scope["type"] == "lifespan":
            return await self.app(scope, self._drain_before_shutdown(receive), send)
        if scope["type"] != "http" or scope.get("path") in UNAUDITED:
            return await self.app(scope, receive, send)
        if not t.log.known_writable and not await anyio.to_thread.run_sync(t.log.check_writable, limiter=t.limiter):
            t.metrics.audit_failures.inc()
            return await self._refuse(scope, receive, send)
        usage = scope.setdefault("state", {}).setdefault("usage", {})
        t0 = time.perf_counter()
        if t.settings.policy.secrets == "block" and scope.get("method") == "POST":
            # Screen the whole body here, whatever the protocol, so that the block policy holds even
            # for a route that does not call `screen_prompt` itself.
            receive, kinds, kinds_message = await _screen_body(receive)
            if kinds:
                usage["secrets"] = kinds
                principal = await anyio.to_thread.run_sync(_caller, scope, limiter=t.limiter)
                if principal is not None:
                    scope["state"]["principal"] = principal
                try:
                    await anyio.to_thread.run_sync(t.write, scope, 400, time.perf_counter() - t0, "refused: secret in the request",
                                                   limiter=t.limiter)
                except AuditUnavailable:
                    return await self._refuse(scope, receive, send)
                from starlette.requests import Request as StarletteRequest

                from . import errors

                msg = kinds_message
                return await errors.render(StarletteRequest(scope), 400, msg, "secret_detected")(scope, receive, send)
        status = 500
        held: dict | None = None
        streaming = False
        written = False
        refused = False

        async def record(note: str | None = None) -> bool:
            nonlocal written
            written = True
            try:
                with anyio.CancelScope(shield=True):  # a client that went away is still audited
                    await anyio.to_thread.run_sync(t.write, scope, status, time.perf_counter() - t0, note, limiter=t.limiter)
                return True
            except AuditUnavailable:
                t.metrics.audit_failures.inc()
                return False

        async def send_wrapper(message):
            nonlocal status, held, streaming, refused
            if message["type"] == "http.response.start":
                status = message["status"]
                held = message
                return
            if message["type"] == "http.response.body" and not streaming and held is not None:
                if not message.get("more_body", False):  # the whole response: record it before it leaves
                    if not await record():
                        refused = True
                        return await self._refuse(scope, receive, send)
                    start, held = held, None
                    await send(start)
                    return await send(message)
                streaming = True
                start, held = held, None
                await send(start)
            if not refused:
                await send(message)

        t.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as e:
            if not written:
                cancelled = isinstance(e, anyio.get_cancelled_exc_class())
                if cancelled and not streaming:
                    status = 499  # as nginx logs it: the client went away, or the server is stopping
                elif not streaming:  # nothing reached the client; the server answers 500
                    status = 500
                await record("cancelled (client gone or server stopping)" if cancelled else f"{type(e).__name__} while handling")
            raise
        finally:
            t.in_flight -= 1
        if not written:
            if held is not None:  # a start without a body (not ASGI-conformant, but finish it properly)
                if not await record():
                    return await self._refuse(scope, receive, send)
                await send(held)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:  # a stream that ended (or a client that went away mid-stream)
                await record()

    def _drain_before_shutdown(self, receive):
        """Hold the lifespan's shutdown until requests still in flight (cancelled by the server
        stopping) have written their records, at most 15 s."""

        async def wrapped():
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                with anyio.move_on_after(15):
                    while self.trust.in_flight > 0:
                        await anyio.sleep(0.05)
                if self.trust.in_flight:
                    log.error("%d requests still in flight at shutdown: their audit records may be missing", self.trust.in_flight)
            return message

        return wrapped

    async def _refuse(self, scope, receive, send) -> None:
        from starlette.requests import Request as StarletteRequest

        from . import errors

        why = self.trust.log.failure or "unknown error"
        log.error("refusing %s: the audit log cannot be written (%s)", scope.get("path"), why)
        resp = errors.render(StarletteRequest(scope), 503, "service unavailable: the audit log cannot be written, "
                             "and codemoat serves nothing it cannot audit", "audit_unavailable")
        await resp(scope, receive, send)


def _caller(scope) -> Principal | None:
    """Who sent a request refused before authentication (for its audit record), if the token is valid."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    scheme, _, value = headers.get("authorization", "").partition(" ")
    secret = value.strip() if scheme.lower() == "bearer" else headers.get("x-api-key")
    accounts = getattr(scope.get("app").state, "accounts", None) if scope.get("app") is not None else None
    if not secret or accounts is None:
        return None
    try:
        return accounts.authenticate(secret)
    except Exception:
        return None


async def _screen_body(receive):
    """Read the request body, find secrets in its text (every string of a JSON body), and give back
    a `receive` that replays the body to the app."""
    chunks, more = [], True
    while more:
        m = await receive()
        if m["type"] != "http.request":
            break
        chunks.append(m.get("body", b""))
        more = m.get("more_body", False)
    body = b"".join(chunks)
    kinds, message = await anyio.to_thread.run_sync(_scan_body, body)  # off the event loop: prompts can be long
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay, sorted(kinds), message


def _scan_body(body: bytes) -> tuple[set[str], str]:
    try:
        texts = list(_strings(json.loads(body))) if body else []
    except (ValueError, RecursionError):  # not JSON, or nested past the decoder's limit: screen it as text
        texts = [body.decode("utf-8", "replace")]
    kinds: set[str] = set()
    message = ""
    for text in texts:
        found = find_secrets(text)
        if found and not message:
            try:
                screen(text, "block")
            except CodemoatError as e:  # the same one-line message screen_prompt gives
                message = str(e)
        kinds.update(f.kind for f in found)
    return kinds, message


def _strings(doc) -> Any:
    """Every string in a JSON document, without recursion (bodies can nest as deep as the decoder allows)."""
    todo = [doc]
    while todo:
        d = todo.pop()
        if isinstance(d, str):
            yield d
        elif isinstance(d, dict):
            todo.extend(reversed(list(d.values())))
        elif isinstance(d, list):
            todo.extend(reversed(d))


def check_quota(request: Request, principal: Principal) -> None:
    """Admit the request under the caller's quotas or raise `RateLimited` (429 with Retry-After)."""
    trust: Trust | None = getattr(request.app.state, "trust", None)
    if trust is not None and trust.quotas.active:
        trust.quotas.check(principal.user, principal.token_id)


def screen_prompt(text: str, settings: Settings, request: Request | None = None) -> str:
    """The prompt with secrets redacted; raises `SecretInPrompt` (400) when `policy.secrets == "block"`.

    With `request`, the kinds found (never the values) go into its audit record, refused or not."""
    redacted, findings = redact(text)
    if findings and request is not None:
        usage = getattr(request.state, "usage", None)
        if usage is None:
            usage = request.state.usage = {}
        usage["secrets"] = sorted({f.kind for f in findings} | set(usage.get("secrets") or ()))
    if findings and settings.policy.secrets == "block":
        screen(text, "block")  # raises SecretInPrompt with the kinds and lines
    return redacted


def _admin_routes(app: FastAPI, trust: Trust) -> None:
    admin = Depends(require("admin"))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(trust.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/admin/api/audit")
    async def audit_records(request: Request, _p=admin, since: str | None = None, kind: str | None = None,
                            user: str | None = None, after_seq: int = 0, limit: int = 100):
        limit = max(1, min(limit, 1000))
        start = parse_since(since)
        check_kind(kind)

        def read():
            return list(trust.log.records(since=start, kind=kind, user=user, after_seq=after_seq, limit=limit,
                                          newest_first=after_seq == 0))
        return {"records": await anyio.to_thread.run_sync(read)}

    @app.get("/admin/api/audit/verify")
    async def audit_verify(request: Request, _p=admin):
        rep = await anyio.to_thread.run_sync(trust.log.verify)
        return JSONResponse(rep.to_dict(), status_code=200 if rep.ok else 409)

    @app.get("/admin/api/alerts")
    async def alerts(request: Request, _p=admin, limit: int = 100):
        def read():
            return list(trust.log.records(kind="alert", limit=max(1, min(limit, 1000)), newest_first=True))
        profiles = {u: trust.alarms.signals(u) for u in trust.alarms.users()}
        return {"alerts": await anyio.to_thread.run_sync(read), "profiles": profiles}

    @app.get("/admin/api/users")
    async def users(request: Request, _p=admin):
        rows = await anyio.to_thread.run_sync(request.app.state.accounts.list_users)
        for r in rows:
            r["generated_tokens_today"] = trust.quotas.used_today(user=r["name"])
            r["throttled_rpm"] = trust.quotas.throttled(r["name"])
        return {"users": rows, "limits": {"requests_per_minute": trust.quotas.rpm, "tokens_per_day": trust.quotas.tpd}}

    @app.get("/admin/api/tokens")
    async def tokens(request: Request, _p=admin):
        rows = await anyio.to_thread.run_sync(request.app.state.accounts.list_tokens)
        return {"tokens": [dict(asdict(t), active=t.active) for t in rows]}

    @app.get("/admin/api/outbound")
    async def outbound(request: Request, _p=admin):
        from ..audit.outbound import read_outbound

        return {"outbound": await anyio.to_thread.run_sync(read_outbound)}


def install(app: FastAPI, settings: Settings) -> None:
    """Wire the trust layer into `app` (see the module docstring)."""
    trust = Trust(app, settings)
    app.state.trust = trust
    app.state.check_quota = check_quota
    app.state.screen_prompt = lambda text, request=None: screen_prompt(text, settings, request)
    previous = getattr(app.state, "on_shutdown", None)

    def on_shutdown() -> None:
        try:
            if previous is not None:
                previous()
        finally:
            trust.shutdown()

    app.state.on_shutdown = on_shutdown
    _admin_routes(app, trust)
    app.add_middleware(AuditMiddleware, trust=trust)
    egress.arm(trust.guard)
    log.info("trust layer on: audit log %s, egress allow-list %s", trust.db_url.split("@")[-1], trust.guard.allow)
