"""Admission to generation: at most `limit` requests at once (`server.max_concurrent`), shared fairly.

A first-come-first-served semaphore let one user who opened many requests hold every place and put
everyone else's behind all of theirs (a flood of 1,000 requests from a contractor kept the payments
team waiting until 936 of them had run). Here a freed place goes to the waiting request of the user
who holds the fewest places; among one user's requests, and among equals, the first to arrive. The
batched engine admits to its slots by the same rule (`engines.batch.Batcher._next`). A user with
`max_waiting_per_user` requests waiting gets 429 for the next (`server.max_waiting_per_user`): a flood
holds no more than that many connections and prepared prompts in the queue. A request still waiting at
its deadline (`server.max_queue_wait_s`) gets `Overloaded` (503 with Retry-After in its protocol's shape).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from ..errors import Overloaded, RateLimited


class FairSlots:
    """An asyncio semaphore of `limit` places whose waiters are woken by how many places their user holds."""

    def __init__(self, limit: int, max_waiting_per_user: int = 0):
        self.limit, self.max_waiting_per_user = limit, max_waiting_per_user
        self.busy = 0
        self.held: Counter[str | None] = Counter()
        self._waiters: list[tuple[str | None, asyncio.Future]] = []

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def check(self, who: str | None) -> None:
        """RateLimited when `who` already has `max_waiting_per_user` requests waiting (checked again on acquire)."""
        cap = self.max_waiting_per_user
        if cap and sum(1 for w, _ in self._waiters if w == who) >= cap:
            raise RateLimited(
                f"{cap} of your requests are already waiting for a place on this server (server.max_waiting_per_user)"
            )

    async def acquire(self, who: str | None, deadline: float | None = None) -> None:
        """A place for `who`; `Overloaded` if none is free by `deadline` (`time.monotonic()`; None: no limit)."""
        if self.busy < self.limit and not self._waiters:
            self._take(who)
            return
        self.check(who)
        entry = (who, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            if deadline is None:
                await entry[1]
            else:  # not wait_for: on 3.11 it swallows a hang-up that comes with the place (the place stayed taken)
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await entry[1]
        except BaseException as e:  # cancelled (the client left), or waited too long: give back a place handed over meanwhile
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif entry[1].done() and not entry[1].cancelled():
                self.release(who)
            if isinstance(e, TimeoutError):
                raise Overloaded() from None
            raise

    def release(self, who: str | None) -> None:
        self.busy -= 1
        self.held[who] -= 1
        if self.held[who] <= 0:
            del self.held[who]
        self._wake()

    def _take(self, who: str | None) -> None:
        self.busy += 1
        self.held[who] += 1

    def _wake(self) -> None:
        while self.busy < self.limit and self._waiters:
            at = min(range(len(self._waiters)), key=lambda i: self.held[self._waiters[i][0]])  # the first among equals
            who, fut = self._waiters.pop(at)
            if fut.done():  # cancelled while waiting
                continue
            self._take(who)
            fut.set_result(None)
