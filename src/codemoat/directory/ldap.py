"""LDAP: find a user, check a password by binding as them, read their groups (nested included).

Every value a caller supplies is escaped per RFC 4515 before it enters a filter
(`ldap3.utils.conv.escape_filter_chars`): a user name `*)(uid=*` finds no one. An empty password
is refused before any bind, since LDAP treats a bind with a DN and no password as an anonymous
bind that *succeeds* (RFC 4513 §5.1.2, "unauthenticated authentication"). Passwords are never
stored or logged. TLS: `ldaps://` or StartTLS, verified against `ca_file`.

Connections: two pools of at most `ldap_pool_size` each, a connection used by one thread at a
time. The service pool holds connections bound as the service account (searches); the check pool
holds connections used only to check passwords, re-bound as each user signing in (never used to
search, so a user's identity never reaches a query). Re-binding an open connection spares a TCP
(and TLS) handshake per sign-in; a connection that fails is dropped and the next use opens another.
A sign-in reads only the groups above the user (one search per nesting level), not every group.
"""

from __future__ import annotations

import math
import queue
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..config import DirectorySettings
from ..paths import read_secret
from ..errors import CodemoatError, Unauthorized

# nested groups are followed this many levels up (a cycle in the directory cannot loop forever)
MAX_NESTING = 10


class DirectoryError(CodemoatError):
    """A configuration or directory problem, in one line."""


class DirectoryUnavailable(DirectoryError):
    """The directory cannot be reached (or timed out): fail closed, say so in one line."""

    status = 503
    code = "directory_unavailable"


@dataclass(frozen=True)
class DirUser:
    name: str
    dn: str
    groups: frozenset[str] = frozenset()  # directory group names, nested memberships included
    disabled: bool = False


@dataclass
class Snapshot:
    """Every user the directory lists, as one sync reads them."""

    users: dict[str, DirUser] = field(default_factory=dict)


def _attr(entry, name: str) -> list[str]:
    vals = entry["attributes"].get(name, [])
    return [str(v) for v in (vals if isinstance(vals, list) else [vals])]


class _Pool:
    """At most `size` connections, each lent to one thread at a time; one that failed is dropped."""

    def __init__(self, size: int, connect: Callable[[], object], wait_s: float, what: str):
        self._slots = threading.BoundedSemaphore(size)
        self._free: queue.LifoQueue = queue.LifoQueue()
        self._connect, self._wait_s, self._what = connect, wait_s, what
        self.opened = 0  # connections opened so far (tests and the bench read it)

    @contextmanager
    def lend(self) -> Iterator:
        if not self._slots.acquire(timeout=self._wait_s):
            raise DirectoryUnavailable(f"the directory's {self._what} connections were all busy for {self._wait_s:g} s")
        try:
            try:
                conn = self._free.get_nowait()
            except queue.Empty:
                conn = self._connect()
                self.opened += 1
            ok = False
            try:
                yield conn
                ok = True
            finally:
                if ok and not conn.closed:
                    self._free.put(conn)
                else:
                    _drop(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        while True:
            try:
                _drop(self._free.get_nowait())
            except queue.Empty:
                return


def _drop(conn) -> None:
    try:
        conn.unbind()
    except Exception:  # already broken: nothing to tell the server
        pass


class LdapDirectory:
    """One LDAP directory, used from many threads (pooled connections, see the module's docstring)."""

    def __init__(self, cfg: DirectorySettings):
        if not cfg.ldap_url:
            raise DirectoryError("no directory configured: set directory.ldap_url")
        self.cfg = cfg
        self._timeout = max(1, math.ceil(cfg.timeout_s))  # ldap3 packs socket timeouts as whole seconds
        self.service_pool = _Pool(cfg.ldap_pool_size, self._service_conn, cfg.timeout_s, "service")
        self.check_pool = _Pool(cfg.ldap_pool_size, self._open, cfg.timeout_s, "sign-in")

    # -- connections -----------------------------------------------------------
    def _server(self):
        import ldap3

        tls = None
        if self.cfg.ca_file or self.cfg.ldap_url.startswith("ldaps://") or self.cfg.start_tls:
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.cfg.ca_file)
        return ldap3.Server(self.cfg.ldap_url, connect_timeout=self._timeout, get_info=ldap3.NONE, tls=tls)

    def _password(self) -> str:
        f = self.cfg.bind_password_file
        return read_secret(f, "directory.bind_password_file") if f else ""

    def _bind(self, dn: str | None, password: str):
        """A bound connection, or DirectoryUnavailable / Unauthorized (wrong credentials)."""
        import ldap3
        from ldap3.core import exceptions as lx

        bind = ldap3.AUTO_BIND_TLS_BEFORE_BIND if self.cfg.start_tls else ldap3.AUTO_BIND_NO_TLS
        try:
            return ldap3.Connection(
                self._server(),
                user=dn,
                password=password,
                auto_bind=bind,
                receive_timeout=self._timeout,
                raise_exceptions=True,
                read_only=True,
            )
        except (lx.LDAPInvalidCredentialsResult, lx.LDAPBindError) as e:
            raise Unauthorized("directory sign-in failed: wrong user name or password") from e
        except lx.LDAPException as e:
            raise DirectoryUnavailable(f"directory {self.cfg.ldap_url} is unreachable: {type(e).__name__}") from None

    def _service_conn(self):
        try:
            return self._bind(self.cfg.bind_dn, self._password())
        except Unauthorized:
            raise DirectoryError("the directory refused the service account (directory.bind_dn / bind_password_file)") from None

    def _open(self):
        """An open connection, not yet bound (TLS started when configured): the check pool re-binds it per user."""
        import ldap3
        from ldap3.core import exceptions as lx

        conn = ldap3.Connection(self._server(), receive_timeout=self._timeout, raise_exceptions=True, read_only=True)
        try:
            conn.open()
            if self.cfg.start_tls:
                conn.start_tls()
        except lx.LDAPException as e:
            raise DirectoryUnavailable(f"directory {self.cfg.ldap_url} is unreachable: {type(e).__name__}") from None
        return conn

    def check_password(self, dn: str, password: str) -> None:
        """Unauthorized unless the directory accepts `password` for `dn` (a bind as that user)."""
        from ldap3.core import exceptions as lx

        if not password:  # never an "unauthenticated" bind (RFC 4513 §5.1.2), whoever calls this
            raise Unauthorized("directory sign-in failed: a user name and a password are both needed")
        for attempt in (1, 2):
            try:
                with self.check_pool.lend() as conn:
                    conn.rebind(user=dn, password=password)
                return
            except (lx.LDAPInvalidCredentialsResult, lx.LDAPBindError) as e:
                raise Unauthorized("directory sign-in failed: wrong user name or password") from e
            except lx.LDAPSASLPrepError:  # a password no directory can hold (control characters): wrong, not an outage
                raise Unauthorized("directory sign-in failed: wrong user name or password") from None
            except lx.LDAPException as e:  # a pooled connection the server dropped: once more on a fresh one
                if attempt == 2:
                    raise DirectoryUnavailable(f"directory {self.cfg.ldap_url} is unreachable: {type(e).__name__}") from None

    def _search(self, base: str, flt: str, attrs: list[str], scope: str | None = None) -> list:
        from ldap3.core import exceptions as lx

        for attempt in (1, 2):
            try:
                with self.service_pool.lend() as conn:
                    try:
                        kw = {"search_scope": scope} if scope else {}
                        conn.search(base, flt, attributes=attrs, paged_size=1000, **kw)
                    except lx.LDAPNoSuchObjectResult:
                        return []
                    out = [e for e in conn.response if e.get("type") == "searchResEntry"]
                    cookie = _cookie(conn)
                    while cookie:
                        conn.search(base, flt, attributes=attrs, paged_size=1000, paged_cookie=cookie, **kw)
                        out += [e for e in conn.response if e.get("type") == "searchResEntry"]
                        cookie = _cookie(conn)
                return out
            except lx.LDAPException as e:  # the connection was dropped (and so is it): one fresh one, then give up
                if attempt == 2:
                    raise DirectoryUnavailable(f"directory {self.cfg.ldap_url} is unreachable: {type(e).__name__}") from None
        return []

    # -- users ---------------------------------------------------------------------
    def find(self, username: str) -> DirUser | None:
        """The enabled or disabled user named `username` (escaped into the filter), or None."""
        from ldap3.utils.conv import escape_filter_chars

        if not _text(username):
            return None
        flt = self.cfg.user_filter.replace("{username}", escape_filter_chars(username))
        hits = self._search(self.cfg.user_base, flt, [self.cfg.user_attr])
        if len(hits) != 1:
            return None  # none, or an ambiguous filter: never pick one of several
        dn = hits[0]["dn"]
        names = _attr(hits[0], self.cfg.user_attr)
        return DirUser(names[0] if names else username, dn, self._groups_of(dn), self._is_disabled(dn))

    def authenticate(self, username: str, password: str, before_bind: Callable[[str], None] | None = None) -> DirUser:
        """The user, once the directory accepted their password; Unauthorized otherwise.
        `before_bind` gets the directory's own name for the user before the password is tried (many
        typed names find one user: `bob`, ` bob`, `BOB`, full-width letters): a throttle keys on it."""
        if not username or not password:
            raise Unauthorized("directory sign-in failed: a user name and a password are both needed")
        if not (_text(username) and _text(password)):  # a lone surrogate: no directory holds it (ldap3 raised)
            raise Unauthorized("directory sign-in failed: wrong user name or password")
        user = self.find(username)
        if user is None:
            raise Unauthorized("directory sign-in failed: wrong user name or password")
        if before_bind is not None:
            before_bind(user.name)
        self.check_password(user.dn, password)
        if user.disabled:
            raise Unauthorized("directory sign-in failed: this account is disabled in the directory")
        return user

    def _is_disabled(self, dn: str) -> bool:
        if not self.cfg.disabled_filter:
            return False
        import ldap3

        return bool(self._search(dn, self.cfg.disabled_filter, [], scope=ldap3.BASE))

    # -- groups --------------------------------------------------------------------
    def _all_groups(self) -> dict[str, tuple[str, set[str]]]:
        """group DN (lower-cased) -> (name, member DNs lower-cased)."""
        rows = self._search(self.cfg.group_base, self.cfg.group_filter, [self.cfg.group_name_attr, self.cfg.group_member_attr])
        out = {}
        for e in rows:
            names = _attr(e, self.cfg.group_name_attr)
            out[e["dn"].lower()] = (names[0] if names else e["dn"], {m.lower() for m in _attr(e, self.cfg.group_member_attr)})
        return out

    @staticmethod
    def _closure(groups: dict[str, tuple[str, set[str]]]) -> dict[str, set[str]]:
        """member DN -> names of every group it is in, directly or through nested groups."""
        parents: dict[str, set[str]] = {}
        for gdn, (_, members) in groups.items():
            for m in members:
                parents.setdefault(m, set()).add(gdn)
        memo: dict[str, set[str]] = {}

        def up(dn: str, depth: int) -> set[str]:
            if dn in memo:
                return memo[dn]
            found = set(parents.get(dn, ()))
            if depth < MAX_NESTING:
                for g in list(found):
                    found |= up(g, depth + 1)
            memo[dn] = found
            return found

        return {m: {groups[g][0] for g in up(m, 0) if g in groups} for m in parents}

    def _groups_of(self, dn: str) -> frozenset[str]:
        """`dn`'s groups, nested ones included: one search per level up, for the groups naming any DN
        of the level below as a member (DNs escaped per RFC 4515), at most MAX_NESTING levels."""
        from ldap3.utils.conv import escape_filter_chars

        attr, seen, names = self.cfg.group_member_attr, set(), set()
        level = {dn.lower()}
        for _ in range(MAX_NESTING + 1):
            if not level:
                break
            ors = "".join(f"({attr}={escape_filter_chars(d)})" for d in sorted(level))
            hits = self._search(self.cfg.group_base, f"(&{self.cfg.group_filter}(|{ors}))", [self.cfg.group_name_attr])
            level = set()
            for e in hits:
                gdn = e["dn"].lower()
                if gdn not in seen:
                    seen.add(gdn)
                    level.add(gdn)
                    got = _attr(e, self.cfg.group_name_attr)
                    names.add(got[0] if got else e["dn"])
        return frozenset(names)

    def snapshot(self) -> Snapshot:
        """Every user with their nested groups and disabled flag: three searches, whatever the size."""
        attr = self.cfg.user_attr
        users = self._search(self.cfg.user_base, self.cfg.users_filter, [attr])
        disabled = set()
        if self.cfg.disabled_filter:
            flt = f"(&{self.cfg.users_filter}{self.cfg.disabled_filter})"
            disabled = {e["dn"].lower() for e in self._search(self.cfg.user_base, flt, [])}
        member_of = self._closure(self._all_groups())
        snap = Snapshot()
        for e in users:
            names = _attr(e, attr)
            if not names:
                continue
            dn = e["dn"]
            snap.users[names[0]] = DirUser(names[0], dn, frozenset(member_of.get(dn.lower(), ())), dn.lower() in disabled)
        return snap

    def close(self) -> None:
        self.service_pool.close()
        self.check_pool.close()


def _text(s: str) -> bool:
    """Whether `s` is Unicode text (no lone surrogate, as Python makes of undecodable bytes): what LDAP can carry."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _cookie(conn):
    """The paged-results cookie of the last search (RFC 2696), empty at the last page."""
    return conn.result.get("controls", {}).get("1.2.840.113556.1.4.319", {}).get("value", {}).get("cookie")
