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
import threading
import time
import weakref
from typing import Any

log = logging.getLogger("codemoat.accounts")

EVERY_S = 0.25  # under `store.VERIFIED_TTL`: an entry in use is looked up again before it expires
ACTIVE_S = 300.0  # keep a token verified this long after its last request
MAX_TOKENS = 512  # looked up per round at most (the most recently used; the others on their requests' path)


class TokenKeeper:
    """One daemon thread per `Accounts`, started by a token's use (`touch`), ended by idleness or `stop`."""

    def __init__(self, accounts: Any):
        self._ref = weakref.ref(accounts)
        self._lock = threading.Lock()
        self._used: dict[str, float] = {}  # token hash -> when it was last used (time.time())
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def touch(self, digest: str, now: float) -> None:
        """The token of hash `digest` was used at `now` (cheap: no I/O, a thread at most once)."""
        self._used[digest] = now
        if self._thread is None and not self._stop.is_set():
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=_run, args=(self._ref, self), name="token-keeper", daemon=True)
                    self._thread.start()

    def recent(self, now: float) -> dict[str, float]:
        """The tokens used within `ACTIVE_S` (at most `MAX_TOKENS`, the latest), each with its last use."""
        items = list(self._used.items())  # a copy: requests touch on the event loop meanwhile
        for d, t in items:
            if now - t > ACTIVE_S:
                self._used.pop(d, None)
        live = sorted(((d, t) for d, t in items if now - t <= ACTIVE_S), key=lambda x: -x[1])
        return dict(live[:MAX_TOKENS])

    def stop(self) -> None:
        self._stop.set()


def _run(ref: weakref.ref, keeper: TokenKeeper) -> None:
    logged = 0.0  # when a failure was last logged: once a minute while the database fails (4 rounds a second)
    while not keeper._stop.wait(EVERY_S):
        used = keeper.recent(time.time())
        if not used:
            with keeper._lock:
                if not keeper.recent(time.time()):
                    keeper._thread = None  # idle: the next use starts another
                    return
            continue
        acc = ref()
        if acc is None:
            return
        try:
            acc.refresh_verified(used)
        except Exception as e:  # noqa: BLE001 - a database that fails here fails the request path too, with its answer
            if time.monotonic() - logged >= 60:
                logged = time.monotonic()
                log.warning(
                    "token refresh failed (requests look their tokens up): %s",
                    str(e).splitlines()[0] if str(e) else type(e).__name__,
                )
        del acc  # no strong reference while waiting
