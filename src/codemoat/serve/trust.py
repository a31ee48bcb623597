"""The trust layer wired into the app: what it keeps, and how one request becomes one audit record.

`install(app, settings)` (called by `create_app`) puts a `Trust` in `app.state.trust` and adds:

* the audit middleware (`auditing.py`): one record per API request, 503 when it cannot audit;
* with `policy.secrets = "block"`, the secret screen (`screen.py`) inside it: authenticated POST
  bodies holding a secret get 400 (the prompt a route assembles is screened by `prompts.screen_text`);
* `app.state.check_quota(request, principal)`, called by the auth dependency (429 + Retry-After);
* the egress guard (loopback, `policy.egress_allow`, `app.state.egress_allow`, the database host);
* the metrics, admin and OpenAPI routes (`admin.py`);
* the distillation alarms, fed by every successful request.

Handlers fill `request.state.usage` (a `Usage`); its text is kept only with `audit.retain_text`,
redacted. Requests without a valid token are tallied per source (`failures.py`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.routing import iter_route_contexts
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from .. import paths
from ..accounts import Principal
from ..audit import egress
from ..audit.alarms import AlarmPolicy, Alarms
from ..audit.heads import sign_every_for
from ..audit.log import AuditLog, AuditUnavailable, head_file_for, verified_file_for
from ..audit.metrics import Metrics
from ..audit.quota import Quotas
from ..audit.redact import redact
from ..config import Settings
from ..db import open_db
from ..errors import CodemoatError
from ..usage import UsageStore
from ..usage.metrics import UsageCollector
from . import admin
from .auditing import AuditMiddleware
from .auth import principal_of
from .failures import FailureTally, Tally
from .doubtstore import DoubtStore, folder_for
from .late import LateRecords
from .screen import SecretScreen
from .usage import method_name, usage_of

log = logging.getLogger("codemoat.audit")

_CHAT_ROUTES = ("/chat/completions", "/api/chat")
UNMATCHED = "unmatched"  # the route of a request no route matched (its path is never stored)


def _text_chars(scope: dict, fields: dict[str, Any]) -> int:
    """The characters of text a kept record holds: its request's prompt and answer, and the record's texts."""
    usage = usage_of(scope.setdefault("state", {}))
    texts = (usage.prompt_text, usage.completion_text, fields.get("prompt_text"), fields.get("completion_text"))
    return sum(len(t) for t in texts if isinstance(t, str))


class Trust:
    """What the trust layer keeps for one app (`app.state.trust`)."""

    def __init__(self, app: FastAPI, settings: Settings):
        self.app = app
        self.settings = settings
        accounts = getattr(app.state, "accounts", None)
        shared = getattr(accounts, "engine", None)  # the accounts' database, migrated once, when it is one
        engine = shared if shared is not None else open_db(settings.database_url or paths.db_url())
        self.db_url = engine.url.render_as_string(hide_password=False)
        self.log = AuditLog(
            engine,
            checkpoint_every=settings.audit.checkpoint_every,
            sign_every=sign_every_for(settings.audit.sign_every, engine),  # signatures batched on PostgreSQL
            sign_interval_ms=settings.audit.sign_interval_ms,
            head_file=head_file_for(self.db_url, paths.home()),
            verified_file=verified_file_for(self.db_url, paths.home()),
        )  # verify remembers the head it accepted
        self.signer = self.log.signer  # loaded (or created) now: a key problem stops start-up, not a request
        # the daily token budget lives in the shared database: replicas spend one budget between them
        self.quotas = Quotas(settings.policy.requests_per_minute, settings.policy.tokens_per_day, engine=engine)
        self.quotas.seed(self.log)
        self.usage = UsageStore(engine)  # completions and editor events for usage reports and the console
        self.alarms = Alarms(AlarmPolicy(throttle_rpm=int(getattr(settings.audit, "alarm_throttle_rpm", 0) or 0)))
        self.alarms.seed(self.log)  # each user's own baseline survives a restart
        self.metrics = Metrics(self.live)
        self.metrics.registry.register(UsageCollector(engine))  # acceptance, active users: the usage tables at scrape time
        self.unauthenticated = FailureTally()
        self._templates: list | None = None
        self.in_flight = 0
        # delivered streams' records the log did not take (looked up first: one may be in the chain after all)
        self.late = LateRecords(
            self.log.append_async,
            written=self.log.written_already,
            written_as=self.log.written_as,
            fingerprint=self.log.fingerprint,
            on_withheld=lambda: self.metrics.audit_records.labels("withheld").inc(),
            # PostgreSQL: refused answers' doubts on disk, and those a server that ended left (`serve.doubtstore`)
            store=DoubtStore(folder_for(paths.home(), self.db_url)) if self.log.commits_unconfirmed else None,
            withheld_for=self.log.withheld_for,
        )
        # Audit I/O gets its own threads, so that it never queues behind other blocking work.
        self.limiter = anyio.CapacityLimiter(4)
        self.guard = egress.EgressGuard(
            allow=self._static_allow(self.db_url),
            extra=lambda: getattr(app.state, "egress_allow", None) or (),
            on_refuse=self._egress_refused,
        )

    def _static_allow(self, url: str) -> list[str]:
        allow = list(self.settings.policy.egress_allow)
        for entry in allow:  # a mistyped entry stops the start, in one line: it would only be warned of and ignored
            try:
                egress.parse_rule(entry)
            except ValueError as e:
                raise CodemoatError(f"policy.egress_allow: {e} (use host, host:port, [v6]:port, an address or a CIDR)") from None
        host = self.settings.server.host
        if host and not egress.is_loopback(host) and egress.parse_rule(host).net is None:
            allow.append(host)  # our own interface, by name: binding resolves it
        u = make_url(url)
        if u.host:  # a PostgreSQL server holding the shared state
            allow.append(f"{u.host}:{u.port or 5432}" if ":" not in u.host else f"[{u.host}]:{u.port or 5432}")
        return allow

    def live(self) -> dict[str, Any]:
        """The gauges read at scrape time: model, admission line, lease and license."""
        holder = self.app.state.holder
        lic = holder.status.license  # refreshed each second by the license watch
        service = getattr(self.app.state, "service", None)
        return {
            "loaded": bool(holder.loaded),
            "model_state": holder.state,
            "queue_depth": service.waiting if service is not None else 0,
            "in_flight": self.in_flight,
            "lease_state": (lic.lease_state or lic.license_mode) if lic else None,
            "expires_at": lic.license_expires_at if lic else None,
            "lease_seconds_left": lic.lease_seconds_left if lic else None,
            "engine_slots": self._engine_slots(holder),
            "tokenizer": self._tokenizer(holder),
        }

    @staticmethod
    def _tokenizer(holder: Any) -> dict[str, int] | None:
        """What the server's tokeniser took from its caches (`engines.tokcache`, `engines.tokgrow`), or None: texts
        found unchanged, looked up and not found, and long texts tokenised from where they grew or whole."""
        try:
            engine = holder.get() if holder.loaded else None
        except Exception:
            return None
        vocab = getattr(engine, "front", engine)
        cache = getattr(vocab, "__dict__", {}).get("_token_cache")
        growth = getattr(vocab, "__dict__", {}).get("_token_growth")
        if cache is None and growth is None:
            return None
        out = {"hits": cache.hits, "misses": cache.misses} if cache is not None else {}
        if growth is not None:
            out.update(grown=growth.grown, whole=growth.whole)
        return out

    @staticmethod
    def _engine_slots(holder: Any) -> dict[str, int] | None:
        """A batching engine's slot use (total, busy, waiting), or None."""
        try:
            return holder.get().health().get("slots") if holder.loaded else None
        except Exception:  # unloaded or restarting between the check and the read
            return None

    def route_of(self, scope: dict) -> str:
        """The template of the route a request went to, or would have gone to had a layer in front
        not answered it (the secret screen, the body limit); `UNMATCHED` for none. Never the raw path."""
        route = getattr(scope.get("route"), "path", None)
        if route is None:
            if self._templates is None:  # every route is added by now
                self._templates = [
                    (r.path_regex, r.path)
                    for r in (c.route for c in iter_route_contexts(self.app.routes))
                    if hasattr(r, "path_regex")
                ]
            route = next((path for regex, path in self._templates if regex.match(scope.get("path", ""))), None)
        return route or UNMATCHED

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
            self._tallies(self.unauthenticated.drain())
            self.log.checkpoint("shutdown")
        except Exception as e:  # the server is going down anyway; say so
            log.error("could not sign the shutdown checkpoint of the audit log: %s", e)
        try:  # on a machine with a TPM, the chip signs one too, with its monotonic counter
            from ..audit.tpm_checkpoint import maybe_take

            maybe_take(self.log)
        except Exception as e:
            log.error("could not take the TPM checkpoint of the audit log: %s", e)
        try:  # its threads (writer, head timer, probe) stop and its head file's descriptor closes with the app
            self.log.close()
        except Exception as e:
            log.error("could not close the audit log: %s", e)

    # -- one request's record -----------------------------------------------------------
    def write(
        self, scope: dict, status: int, seconds: float, note: str | None = None, late_ok: bool = False, withheld: bool = False
    ) -> None:
        """Append the request's record (or, without a valid token, tally it); raises `AuditUnavailable`.
        `late_ok`: the answer was delivered (a stream), so a record the log does not take is kept (`late`).
        `withheld`: the answer goes out only if its record is written (a 503 replaces it otherwise), so a record
        whose append failed is looked up later, in case it is in the chain all the same (`LateRecords.doubt`)."""
        record, ended = self._record(scope, status, seconds, note)
        if ended:
            self._tallies(ended)
        if record is not None:
            fields, after = record
            try:
                self.log.append("request", **fields)
            except (AuditUnavailable, DBAPIError) as e:
                self._unwritten(scope, fields, after, e, late_ok, withheld)
                raise
            after()

    def _unwritten(self, scope: dict, fields: dict, after: Any, why: BaseException, late_ok: bool, withheld: bool) -> None:
        if late_ok:
            self.late.keep(fields, after, why, _text_chars(scope, fields))
        elif withheld and self.log.commits_unconfirmed:
            self.late.doubt(fields)

    async def write_async(
        self, scope: dict, status: int, seconds: float, note: str | None = None, late_ok: bool = False, withheld: bool = False
    ) -> None:
        """`write` from the event loop. An authenticated request's record goes to the audit log's writer
        thread, which commits it with those of concurrent requests and wakes this loop once for them all
        (`AuditLog.append_async`); naming a caller (a database query), tallies and redacting retained text
        still run in a worker thread."""
        state = scope.setdefault("state", {})
        usage = usage_of(state)
        if state.get("principal") is None or (self.settings.audit.retain_text and (usage.prompt_text or usage.completion_text)):
            await anyio.to_thread.run_sync(self.write, scope, status, seconds, note, late_ok, withheld, limiter=self.limiter)
            return
        record, ended = self._record(scope, status, seconds, note)
        if ended:
            await anyio.to_thread.run_sync(self._tallies, ended, limiter=self.limiter)
        fields, after = record
        try:
            await self.log.append_async("request", then=after, **fields)
        except (AuditUnavailable, DBAPIError) as e:
            self._unwritten(scope, fields, after, e, late_ok, withheld)
            raise

    def _record(
        self, scope: dict, status: int, seconds: float, note: str | None
    ) -> tuple[tuple[dict[str, Any], Any] | None, list[Tally]]:
        """((the record's fields, what follows its writing) or None when only tallied, the tallies ended)."""
        state = scope.setdefault("state", {})
        usage = usage_of(state)
        principal: Principal | None = state.get("principal")
        if principal is None and status != 401:  # a valid token on a request no route authenticated (404, 413)
            principal = state["principal"] = principal_of(scope)
        route = self.route_of(scope)
        client = scope.get("client")
        source = f"{client[0]}" if client else None
        protocol = usage.protocol or state.get("protocol")
        if principal is None:
            alone, ended = self.unauthenticated.observe(source, status, route)
        else:
            alone, ended = True, self.unauthenticated.due()
        if not alone:  # counted, to be recorded in its source's tally
            self.metrics.observe(route, protocol or "", status, seconds, 0, 0)
            return None, ended
        detail: dict[str, Any] = {"method": method_name(scope.get("method"))}
        secrets = usage.secrets  # found where the prompt was screened (prompts.screen_text) or by the secret screen
        if secrets:
            detail["secrets"] = sorted(secrets)
            for k in secrets:
                self.metrics.secrets.labels(k).inc()
        if usage.event:
            detail["event"] = usage.event
        if usage.adapter:
            detail["adapter"] = usage.adapter
        if note or usage.note:
            detail["note"] = note or usage.note
        retain = self.settings.audit.retain_text
        also = None  # a completion, chat or editor event becomes a usage row (others: nothing), in the record's transaction
        if principal is not None:
            user, ms = principal.user, seconds * 1000
            also = lambda c: self.usage.record(user, route, status, ms, usage, conn=c)  # noqa: E731
        fields = dict(
            also=also,
            ts=time.time(),  # now, as the log would stamp it; a kept record is looked up by it (`late`)
            user=principal.user if principal else None,
            token_id=principal.token_id if principal else None,
            route=route,
            protocol=protocol,
            model=usage.model,
            repos=list(usage.repos),
            snippets=list(usage.snippets),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            latency_ms=seconds * 1000,
            status=status,
            client=source,
            prompt_text=redact(usage.prompt_text)[0] if retain and usage.prompt_text else None,
            completion_text=redact(usage.completion_text)[0] if retain and usage.completion_text else None,
            detail=detail,
        )
        return (fields, lambda: self._after(principal, state, route, protocol, status, seconds, usage)), ended

    def _after(
        self, principal: Principal | None, state: dict, route: str, protocol: str | None, status: int, seconds: float, usage
    ) -> None:
        """What follows a request's written record: metrics, its quota, the distillation alarms."""
        try:  # the record is written; what follows must not turn the response into an error
            self.metrics.audit_records.labels("request").inc()
            self.metrics.observe(route, protocol or "", status, seconds, usage.prompt_tokens, usage.completion_tokens)
            if principal is not None and state.get("quota_reserved") and not (200 <= status < 300 or status == 499):
                self.quotas.add_tokens(principal.user, principal.token_id, 0)  # gives the reserved token back
            if principal is not None and (200 <= status < 300 or status == 499):  # 499: what was generated before the hang-up
                self.quotas.add_tokens(principal.user, principal.token_id, usage.completion_tokens)
                kind = "event" if usage.event else ("chat" if route.endswith(_CHAT_ROUTES) else "completion")
                alert = self.alarms.observe(
                    principal.user,
                    kind=kind,
                    prompt_text=usage.prompt_text,
                    completion_tokens=usage.completion_tokens,
                    event=usage.event,
                )
                if alert is not None:
                    self._raise_alert(alert)
        except Exception:
            log.exception("after auditing %s", route)

    def _tallies(self, tallies: list[Tally]) -> None:
        """One record per source for the requests without a valid token that were only counted."""
        for t in tallies:
            try:
                self.log.append("unauthenticated", client=t.source, detail=t.detail())
                self.metrics.audit_records.labels("unauthenticated").inc()
            except AuditUnavailable as e:
                log.error("could not record %d requests without a valid token from %s: %s", t.count, t.source, e)

    def _raise_alert(self, alert) -> None:
        rpm = self.alarms.policy.throttle_rpm
        self.log.append(
            "alert",
            user=alert.user,
            detail={
                "alarm": "distillation",
                "reasons": alert.reasons,
                "signals": alert.signals,
                "throttled_rpm": rpm or None,
            },
        )
        self.metrics.alerts.inc()
        self.metrics.audit_records.labels("alert").inc()
        log.warning("distillation alarm for user %s: %s", alert.user, ", ".join(alert.reasons))
        if rpm:
            self.quotas.throttle(alert.user, rpm, 3600)


def check_quota(request: Request, principal: Principal) -> None:
    """Admit the request under the caller's quotas or raise `RateLimited` (429 with Retry-After)."""
    trust: Trust | None = getattr(request.app.state, "trust", None)
    if trust is not None and trust.quotas.active:
        trust.quotas.check(principal.user, principal.token_id)
        request.state.quota_reserved = True  # a shared daily budget holds one token for this request


def install(app: FastAPI, settings: Settings) -> None:
    """Wire the trust layer into `app` (see the module docstring)."""
    trust = Trust(app, settings)
    app.state.trust = trust
    app.state.check_quota = check_quota
    previous = getattr(app.state, "on_shutdown", None)

    def on_shutdown() -> None:
        try:
            if previous is not None:
                previous()
        finally:
            trust.shutdown()

    app.state.on_shutdown = on_shutdown
    # engine incidents (a crash: its signal, the restart) go into the audit chain
    app.state.holder.incidents.append(lambda kind, detail: trust.log.append(kind, model=detail.get("model"), detail=detail))
    app.include_router(admin.router)
    app.add_middleware(SecretScreen, policy=settings.policy.secrets)  # inside the audit middleware: its refusals are audited
    app.add_middleware(AuditMiddleware, trust=trust)
    egress.arm(trust.guard)
    log.info("trust layer on: audit log %s, egress allow-list %s", trust.db_url.split("@")[-1], trust.guard.allow)
