"""Quotas as a pure unit: sliding-window rates with exact Retry-After, daily tokens, alarm throttling."""

from __future__ import annotations

import pytest

from codemoat.audit.quota import Quotas, seconds_to_midnight
from codemoat.errors import RateLimited

T = 1_800_000_000.0  # a fixed instant, 08:00 UTC


def test_requests_per_minute_sliding_window():
    q = Quotas(requests_per_minute=3)
    for dt in (0, 10, 20):
        q.check("alice", "tok_a", now=T + dt)
    with pytest.raises(RateLimited) as e:
        q.check("alice", "tok_a", now=T + 30)
    assert e.value.retry_after == pytest.approx(30)  # the request at T leaves the window at T+60
    q.check("bob", "tok_b", now=T + 30)  # others are not affected
    q.check("alice", "tok_a", now=T + 60.5)  # the window slid


def test_user_limit_spans_tokens():
    q = Quotas(requests_per_minute=2)
    q.check("alice", "tok_1", now=T)
    q.check("alice", "tok_2", now=T + 1)
    with pytest.raises(RateLimited, match="this user"):
        q.check("alice", "tok_3", now=T + 2)


def test_tokens_per_day_resets_at_utc_midnight():
    q = Quotas(tokens_per_day=100)
    q.check("alice", "tok_a", now=T)
    q.add_tokens("alice", "tok_a", 100, now=T)
    with pytest.raises(RateLimited, match="daily token quota") as e:
        q.check("alice", "tok_a", now=T + 5)
    assert e.value.retry_after == pytest.approx(seconds_to_midnight(T + 5))
    q.check("bob", "tok_b", now=T + 5)
    q.check("alice", "tok_a", now=T + seconds_to_midnight(T) + 1)  # the next day


def test_refused_requests_do_not_count():
    q = Quotas(requests_per_minute=1)
    q.check("alice", "tok_a", now=T)
    for dt in range(1, 5):
        with pytest.raises(RateLimited):
            q.check("alice", "tok_a", now=T + dt)
    q.check("alice", "tok_a", now=T + 60.01)
    assert q.refused == 4


def test_throttle_from_an_alarm_expires():
    import time

    q = Quotas()
    assert not q.active
    q.throttle("mallory", rpm=1, seconds=3600)
    assert q.active
    now = time.time()
    q.check("mallory", "tok_m", now=now)
    with pytest.raises(RateLimited, match="throttled by a distillation alarm"):
        q.check("mallory", "tok_m", now=now + 1)
    q.check("alice", "tok_a", now=now + 1)
    q._throttle["mallory"] = (1, time.time() - 1)  # the hour is over
    q.check("mallory", "tok_m", now=now + 2)


def test_a_clock_set_back_does_not_lock_anyone_out():
    """Was: the per-minute window holds wall-clock times, so after the clock was set back an hour (NTP stepping a
    drifted clock) the window's times were an hour ahead and every request was refused, `Retry-After` ~3,660 s, until
    the clock caught up. Now a window whose times are ahead of the clock starts again (at most a minute forgotten)."""
    q = Quotas(requests_per_minute=2)
    q.check("alice", "t1", now=10_000.0)
    q.check("alice", "t1", now=10_001.0)
    with pytest.raises(RateLimited):
        q.check("alice", "t1", now=10_002.0)
    q.check("alice", "t1", now=10_002.0 - 3600)  # an hour back: admitted
    q.check("alice", "t1", now=10_003.0 - 3600)
    with pytest.raises(RateLimited) as e:  # and the limit holds from there
        q.check("alice", "t1", now=10_004.0 - 3600)
    assert e.value.retry_after <= 60


def test_requests_whose_times_arrive_out_of_order_keep_the_window():
    """A reviewer, on the fix above: concurrent requests can reach the window in another order than their times were
    taken, and one a few milliseconds older than the newest cleared the whole window: twenty requests in 0.1 s all
    passed a limit of 2 a minute. Now only a window more than CLOCK_STEP_S ahead of the clock starts again, and
    without an explicit `now` the time is read once the request holds the window's lock."""
    q = Quotas(requests_per_minute=2)
    admitted = 0
    for i in range(20):
        try:
            q.check("u", "t", now=100 + (i // 2) * 0.01 + (0.005 if i % 2 == 0 else 0))
            admitted += 1
        except RateLimited:
            pass
    assert admitted == 2
    q2 = Quotas(requests_per_minute=2)
    q2.check("u", "t")
    q2.check("u", "t")
    with pytest.raises(RateLimited):
        q2.check("u", "t")
