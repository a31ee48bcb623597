"""Keep recently used API tokens verified while their editors pause, so the request after a pause does not look
its token up in the database before the engine sees it.

`Accounts.authenticate` trusts a lookup for `store.VERIFIED_TTL` (0.5 s), so that a revocation made elsewhere
(another replica, the CLI) takes effect within that time. An editor pauses longer than that between keystrokes,
so its next completion looked its token up on the event loop first: 0.5-0.9 ms before the engine had the request
(helper A's strace, session 12), a sixth of a small model's time to first token.

While tokens are in use (a request within `ACTIVE_S`), this thread looks the recently used ones up again every
`EVERY_S` (under the TTL), all of them in two queries, and `Accounts.refresh_verified` remembers each for another
TTL counted from before that lookup. So the bound is the one the request path keeps: a token revoked, expired or
whose user was disabled, here or elsewhere, is refused within `VERIFIED_TTL`; a lookup that fails or is slow
leaves the entries to expire, and the request path looks the token up itself, as before. At most `MAX_TOKENS`
tokens, the most recently used. An idle server stops after `ACTIVE_S`. Only `codemoat serve` starts one
(`Accounts.keep_fresh`); the thread holds a weak reference, as `audit.probe.WritableKeeper` does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..keeper import Keeper, first_line

log = logging.getLogger("codemoat.accounts")

EVERY_S = 0.25  # under `store.VERIFIED_TTL`: an entry in use is looked up again before it expires
ACTIVE_S = 300.0  # keep a token verified this long after its last request
MAX_TOKENS = 512  # looked up per round at most (the most recently used; the others on their requests' path)


class TokenKeeper(Keeper):
    """One daemon thread per `Accounts`, started by a token's use (`touch`), ended by idleness or `stop`."""

    def __init__(self, accounts: Any):
        super().__init__(accounts, "token-keeper", EVERY_S)
        self._used: dict[str, float] = {}  # token hash -> when it was last used (time.time())
        self._logged = 0.0  # when a failure was last logged: once a minute while the database fails (4 rounds a second)

    def touch(self, digest: str, now: float) -> None:
        """The token of hash `digest` was used at `now` (cheap: no I/O, a thread at most once)."""
        self._used[digest] = now
        self.start()

    def recent(self, now: float) -> dict[str, float]:
        """The tokens used within `ACTIVE_S` (at most `MAX_TOKENS`, the latest), each with its last use."""
        items = list(self._used.items())  # a copy: requests touch on the event loop meanwhile
        for d, t in items:
            if now - t > ACTIVE_S:
                self._used.pop(d, None)
        live = sorted(((d, t) for d, t in items if now - t <= ACTIVE_S), key=lambda x: -x[1])
        return dict(live[:MAX_TOKENS])

    def pending(self) -> dict[str, float]:
        return self.recent(time.time())

    def round(self, acc: Any, used: dict[str, float]) -> None:
        acc.refresh_verified(used)

    def failed(self, error: Exception) -> None:  # a database that fails here fails the request path too, with its answer
        if time.monotonic() - self._logged >= 60:
            self._logged = time.monotonic()
            log.warning("token refresh failed (requests look their tokens up): %s", first_line(error))
