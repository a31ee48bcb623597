"""The company directory as the source of truth for who may read which code.

    d = LdapDirectory(settings.directory)
    user = d.authenticate("alice", password)      # DirUser(name, dn, groups) or DirectoryError
    report = sync(accounts, d.snapshot(), settings.directory, store=SyncState(engine))

`ldap` talks to the server (service bind, escaped filters, user bind to check a password, group
membership with nesting); `sync` mirrors users and memberships into `accounts` and disables, at
once, every directory user who left or was disabled; `state` remembers which users the directory
manages and when it was last read, so an unreachable directory fails closed after
`max_staleness_s`. `oidc` signs people in through the company's OpenID provider (browser code
flow with PKCE, bound to the browser that started it); `device` relays RFC 8628 device codes for
`codemoat login`; `login_client` is the CLI's side of it.
"""

from .ldap import DirectoryError, DirectoryUnavailable, DirUser, LdapDirectory, Snapshot
from .sync import SyncReport, sync

__all__ = ["DirUser", "DirectoryError", "DirectoryUnavailable", "LdapDirectory", "Snapshot", "SyncReport", "sync"]
