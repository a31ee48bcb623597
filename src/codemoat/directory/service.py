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

import sqlalchemy as sa

from ..accounts import Accounts, Principal
from ..accounts.store import users
from ..config import Settings
from ..errors import Unauthorized
from .sync import SyncReport, directory_users, is_oidc, last_success, managed_users, record_failure
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
        self.device = None
        if self.cfg.oidc_issuer:
            from .oidc import OidcClient

            from .device import DeviceFlow

            self.oidc = OidcClient(self.cfg, engine)
            self.device = DeviceFlow(self.oidc, engine, self.cfg.device_code_ttl_s)
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
        """Sync every `sync_interval_s` on a background thread (serve); failures are logged and audited.
        Warns when `admin_groups` names an OpenID provider's groups directly (no `group_map`)."""
        if self.oidc is not None and self.cfg.admin_groups and not self.cfg.group_map:
            log.warning(
                "directory.admin_groups %s names the OpenID provider's groups directly (no directory.group_map): "
                "where users may create groups there, anyone who makes one of that name gets the admin scope; "
                "map the provider's admin group in directory.group_map",
                self.cfg.admin_groups,
            )
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
    def login(self, username: str, password: str, token_name: str | None = None, before_bind=None) -> tuple[str, dict[str, Any]]:
        """Check the password with the directory, mirror this user's groups now, and mint a token
        with the scopes those groups allow and `token_ttl_days` of life. The secret is returned once.
        `before_bind(name)`: see `LdapDirectory.authenticate` (the sign-in throttle)."""
        if self.directory is None:
            raise DirectoryError(
                "no LDAP directory configured (directory.ldap_url): sign in through the browser (OpenID Connect)"
            )
        return self.issue_token(self.directory.authenticate(username, password, before_bind), token_name, how="ldap")

    def login_oidc(self, state: str, code: str, binding: str | None = None) -> tuple[str, dict[str, Any]]:
        """The OpenID Connect callback: a checked ID token's user, mirrored, and their own token."""
        if self.oidc is None:
            raise DirectoryError("OpenID Connect sign-in is not configured (directory.oidc_issuer)")
        return self.issue_token(self.oidc.finish(state, code, "api", binding), None, how="oidc")

    def login_device(self, device_code: str) -> tuple[str, dict[str, Any]]:
        """A device-code poll (RFC 8628) that the provider approved: the user's own token."""
        if self.device is None:
            raise DirectoryError("OpenID Connect sign-in is not configured (directory.oidc_issuer)")
        user, name = self.device.poll(device_code)
        return self.issue_token(user, name, how="device")

    def console_signin(self, state: str, code: str, binding: str | None, ttl_s: float) -> tuple[str, dict[str, Any]]:
        """The console's OpenID Connect callback: an admin-only token that lives as long as a console
        session (it backs the session; its secret is never shown). Users outside `admin_groups` are refused."""
        if self.oidc is None:
            raise DirectoryError("OpenID Connect sign-in is not configured (directory.oidc_issuer)")
        user = self.oidc.finish(state, code, "console", binding)
        return self.issue_token(user, None, how="oidc-console", console_ttl_s=ttl_s)

    def _owns_name(self, user, how: str) -> None:
        """Refuse an OpenID sign-in whose user name belongs to someone else here: the claim naming the
        user (`preferred_username` by default) is not unique at most providers and often chosen by the
        user (OpenID Connect Core §5.7), so it must not take over a hand-made local account, a name
        that another subject at the provider signed in with first (`sub` is what identifies), nor a name
        the LDAP directory holds, unless the operator says both are one directory (`oidc_shares_ldap_names`)."""
        if not is_oidc(user.dn):
            return  # LDAP: the configured directory is the authority on its names (a full sync adopts them too)
        with self.engine.connect() as c:
            bound = c.execute(sa.select(directory_users.c.dn).where(directory_users.c.name == user.name)).first()
            local = c.execute(sa.select(users.c.name).where(users.c.name == user.name)).first()
        if local is None:
            return  # no such account (never made, or removed by an admin to hand the name over)
        if bound is None:
            why = f"{user.name} is an account made here, not one from the directory"
        elif is_oidc(bound.dn):
            if bound.dn == user.dn:
                return
            why = f"the user name {user.name} belongs to another identity at the provider"
        elif self.cfg.oidc_shares_ldap_names:
            return  # the operator's word: the provider and the LDAP directory name the same people
        else:
            why = f"the user name {user.name} belongs to the LDAP directory (directory.oidc_shares_ldap_names is off)"
        if self.audit is not None:
            self.audit.append("directory", user=user.name, route="login", detail={"action": "refused", "via": how, "why": why})
        raise Unauthorized(f"sign-in refused: {why} (ask an admin)")

    def issue_token(
        self, user, token_name: str | None, how: str, console_ttl_s: float | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Mirror `user`'s groups now and mint their token (scopes from admin_groups, token_ttl_days);
        with `console_ttl_s`: an admin-only token for a console session, refused to non-admins."""
        self._owns_name(user, how)
        apply_sync(self.engine, Snapshot({user.name: user}), self.cfg, audit=self.audit, partial=True)
        self._managed = managed_users(self.engine)
        groups = sorted(self.accounts.groups_of(user.name))
        admin = bool(set(groups) & set(self.cfg.admin_groups))
        if console_ttl_s is not None:
            if not admin:
                if self.audit is not None:
                    self.audit.append(
                        "directory", user=user.name, route="console sign-in", detail={"action": "refused", "via": how}
                    )
                raise Unauthorized(f"{user.name} is not in an admin group ({', '.join(self.cfg.admin_groups) or 'none set'})")
            scopes, expires = ["admin"], time.time() + console_ttl_s
            name = f"console-{user.name}-{int(time.time())}"
        else:
            scopes = ["complete", "chat"] + (["admin"] if admin else [])
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
