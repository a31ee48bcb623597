"""Attacker's test: a client that hangs up at the moment a place of `server.max_concurrent` is handed to it.

With `server.max_queue_wait_s` set, the wait for a place ran under `asyncio.wait_for`, which on Python
3.11 swallows a cancellation that arrives together with the result (the place handed over in the same
loop step): `acquire` returned as if the client were still there, the place stayed taken, and the
request went on to generate for nobody (the server cancels a request's work once, when its client
goes). Without a deadline the same hang-up gave the place back. Both must behave alike.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from codemoat.errors import Overloaded
from codemoat.serve.admission import FairSlots


async def _hang_up_as_the_place_is_handed_over(deadline: float | None) -> tuple[str, int, dict]:
    slots = FairSlots(1)
    await slots.acquire("alice")
    waiter = asyncio.ensure_future(slots.acquire("bob", deadline))
    await asyncio.sleep(0)  # bob waits for the one place
    slots.release("alice")  # the place goes to bob...
    waiter.cancel()  # ...as bob's client hangs up, in the same loop step
    try:
        await waiter
        outcome = "acquired"
    except asyncio.CancelledError:
        outcome = "cancelled"
    return outcome, slots.busy, dict(slots.held)


@pytest.mark.parametrize("wait_s", [None, 60.0])
def test_a_hang_up_as_the_place_is_handed_over_gives_the_place_back(wait_s):
    deadline = None if wait_s is None else time.monotonic() + wait_s
    assert asyncio.run(_hang_up_as_the_place_is_handed_over(deadline)) == ("cancelled", 0, {})


def test_the_deadline_still_refuses_and_frees_nothing_it_did_not_take():
    async def go():
        slots = FairSlots(1)
        await slots.acquire("alice")
        with pytest.raises(Overloaded):
            await slots.acquire("bob", time.monotonic() + 0.05)
        assert slots.waiting == 0 and slots.busy == 1
        slots.release("alice")
        await slots.acquire("carol", time.monotonic() + 0.05)  # a free place is taken at once
        return slots.busy, dict(slots.held)

    assert asyncio.run(go()) == (1, {"carol": 1})
