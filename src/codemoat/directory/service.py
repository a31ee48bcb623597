"""What the CLI and the server do with the directory: a sync (with its audit records and its
failure remembered), a sign-in that mints a self-service token, and the fail-closed gate.

    keeper = DirectoryKeeper(settings, engine, audit)
    report = keeper.sync()                       # DirectoryUnavailable: remembered, re-raised
    token, info = keeper.login("alice", pw)      # groups synced for alice first, then a token
    keeper.gate(principal)                       # Unauthorized once the directory is too stale
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..accounts import Accounts, Principal
from ..config import Settings
from ..errors import Unauthorized
from .sync import SyncReport, last_success, managed_users, record_failure
from .sync import sync as apply_sync
from .ldap import DirectoryError, LdapDirectory, Snapshot

log = logging.getLogger("codemoat.directory")


class DirectoryKeeper:
    def __init__(self, settings: Settings, engine, audit=None, directory: LdapDirectory | None = None):
        self.settings = settings
        self.cfg = settings.directory
        self.engine = engine
        self.audit = audit
        self.directory = directory or (LdapDirectory(self.cfg) if self.cfg.ldap_url else None)
        self.oidc = None
        if self.cfg.oidc_issuer:
            from .oidc import OidcClient

            self.oidc = OidcClient(self.cfg, engine)
        self.accounts = Accounts(engine)
        self._managed = managed_users(engine)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- sync -----------------------------------------------------------------------
    def sync(self, dry_run: bool = False) -> SyncReport:
        if self.directory is None:
            raise DirectoryError("no LDAP directory configured (directory.ldap_url): there is nothing to sync from")
        try:
            snap = self.directory.snapshot()
        except DirectoryError as e:
            if not dry_run:
                record_failure(self.engine, str(e))
                if self.audit is not None:
                    self.audit.append("directory", route="directory sync", detail={"action": "sync_failed", "error": str(e)})
            raise
        rep = apply_sync(self.engine, snap, self.cfg, audit=self.audit, dry_run=dry_run)
        self._managed = managed_users(self.engine)
        return rep

    def start(self) -> None:
        """Sync every `sync_interval_s` on a background thread (serve); failures are logged and audited."""
        if not self.cfg.sync_interval_s or self._thread is not None or self.directory is None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    rep = self.sync()
                    if rep.changes:
                        log.info(
                            "directory sync: %d added, %d regrouped, %d disabled, %d enabled",
                            len(rep.added),
                            len(rep.updated),
                            len(rep.disabled),
                            len(rep.enabled),
                        )
                except DirectoryError as e:
                    log.warning(
                        "directory sync failed (directory users keep their last-known groups for at most %d s): %s",
                        self.cfg.max_staleness_s,
                        e,
                    )
                except Exception:
                    log.exception("directory sync")
                self._stop.wait(self.cfg.sync_interval_s)

        self._thread = threading.Thread(target=loop, name="directory-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.directory is not None:
            self.directory.close()

    # -- fail closed ----------------------------------------------------------------
    def stale_for(self) -> float | None:
        """Seconds since the directory was last read whole (None: never)."""
        last = last_success(self.engine)
        return None if last is None else time.time() - last

    def gate(self, principal: Principal) -> None:
        """Refuse a directory user's request once the directory has been unreachable longer than
        `max_staleness_s`: their groups may have changed and we can no longer tell."""
        confirmed = self._managed.get(principal.user)
        if confirmed is None or not self.cfg.max_staleness_s:
            return
        # the directory last vouched for this user at a full sync or at their own sign-in
        age = time.time() - max(confirmed, last_success(self.engine) or 0.0)
        if age > self.cfg.max_staleness_s:
            raise Unauthorized(
                f"the company directory has not been reachable for over {self.cfg.max_staleness_s} s; "
                "directory accounts are refused until it is (fail closed)"
            )

    # -- sign-in ----------------------------------------------------------------------
    def login(self, username: str, password: str, token_name: str | None = None) -> tuple[str, dict[str, Any]]:
        """Check the password with the directory, mirror this user's groups now, and mint a token
        with the scopes those groups allow and `token_ttl_days` of life. The secret is returned once."""
        if self.directory is None:
            raise DirectoryError(
                "no LDAP directory configured (directory.ldap_url): sign in through the browser (OpenID Connect)"
            )
        return self.issue_token(self.directory.authenticate(username, password), token_name, how="ldap")

    def login_oidc(self, state: str, code: str) -> tuple[str, dict[str, Any]]:
        """The OpenID Connect callback: a checked ID token's user, mirrored, and their own token."""
        if self.oidc is None:
            raise DirectoryError("OpenID Connect sign-in is not configured (directory.oidc_issuer)")
        return self.issue_token(self.oidc.finish(state, code), None, how="oidc")

    def issue_token(self, user, token_name: str | None, how: str) -> tuple[str, dict[str, Any]]:
        """Mirror `user`'s groups now and mint their token (scopes from admin_groups, token_ttl_days)."""
        apply_sync(self.engine, Snapshot({user.name: user}), self.cfg, audit=self.audit, partial=True)
        self._managed = managed_users(self.engine)
        groups = sorted(self.accounts.groups_of(user.name))
        scopes = ["complete", "chat"] + (["admin"] if set(groups) & set(self.cfg.admin_groups) else [])
        expires = time.time() + self.cfg.token_ttl_days * 86400
        name = token_name or f"login-{user.name}-{int(time.time())}"
        info, secret = self.accounts.create_token(name, user=user.name, scopes=tuple(scopes), expires_at=expires)
        if self.audit is not None:
            self.audit.append(
                "directory",
                user=user.name,
                token_id=info.id,
                route="login",
                detail={"action": "login", "via": how, "scopes": scopes, "expires_at": int(expires)},
            )
        return secret, {
            "user": user.name,
            "token_id": info.id,
            "name": name,
            "groups": groups,
            "scopes": scopes,
            "expires_at": expires,
        }
