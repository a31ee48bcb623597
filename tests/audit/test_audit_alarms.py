"""Distillation alarms on synthetic traffic: extraction is flagged, busy developers are not."""

from __future__ import annotations

import random

from codemoat.audit.alarms import AlarmPolicy, Alarms

T0 = 1_800_000_000.0
WORDS = (
    "user order invoice total price item cart session token cache query index parse render "
    "config client server request response handler value result error count limit offset"
).split()


def code_line(rng: random.Random) -> str:
    a, b, c = rng.sample(WORDS, 3)
    return rng.choice(
        [
            f"    {a}_{b} = self.{c}({a}, {b})",
            f"def {a}_{b}({c}, limit=10):",
            f"    if {a} is None: return {b}_{c}",
            f"    return [{a} for {a} in {b}s if {a}.{c}]",
        ]
    )


def make_file(rng: random.Random, n: int = 60) -> list[str]:
    return [code_line(rng) for _ in range(n)]


def editor_user(alarms, user, rng, *, per_hour, hours=2, files=6, accept=0.25, work_share=0.6, start=T0):
    """Typing in a handful of files: bursts of overlapping prompts, breaks, short completions, some accepted."""
    flagged = []
    corpus = [make_file(rng) for _ in range(files)]
    t, end = start, start + hours * 3600
    per_burst_minute = per_hour / 60 / work_share
    while t < end:
        burst = rng.uniform(3, 12) * 60
        f = rng.choice(corpus)
        cursor = rng.randrange(5, len(f) - 5)
        b_end = t + burst
        while t < b_end:
            if rng.random() < 0.3:
                f[cursor] = f[cursor] + rng.choice("abcdefg() ")
            if rng.random() < 0.1:
                cursor = min(len(f) - 1, cursor + 1)
            a = alarms.observe(
                user, t=t, kind="completion", prompt_text="\n".join(f[: cursor + 1]), completion_tokens=rng.randint(4, 40)
            )
            flagged.append(a)
            if rng.random() < accept:
                alarms.observe(user, t=t + 1, kind="event", event="select")
            t += rng.expovariate(per_burst_minute / 60)
        t += burst * (1 - work_share) / work_share * rng.uniform(0.5, 1.5)
    return [a for a in flagged if a]


def distiller(alarms, user, rng, *, per_hour, hours=2, tokens=(300, 512), start=T0, kind="completion"):
    flagged = []
    t, end = start, start + hours * 3600
    while t < end:
        prompt = "\n".join(code_line(rng) for _ in range(rng.randint(10, 40)))
        flagged.append(alarms.observe(user, t=t, kind=kind, prompt_text=prompt, completion_tokens=rng.randint(*tokens)))
        t += 3600 / per_hour * rng.uniform(0.5, 1.5)
    return [a for a in flagged if a]


def team(alarms, rng, n=6):
    for i in range(n):
        assert editor_user(alarms, f"dev{i}", rng, per_hour=rng.randint(40, 120)) == []


def test_fast_distiller_flagged_busy_developers_not():
    rng = random.Random(1)
    alarms = Alarms()
    team(alarms, rng)
    assert editor_user(alarms, "heavy", rng, per_hour=900, work_share=0.85) == []  # a very busy developer
    alerts = distiller(alarms, "mallory", rng, per_hour=1500)
    assert len(alerts) == 2  # one per hour (cooldown), not one per request
    a = alerts[0]
    assert a.user == "mallory" and set(a.reasons) >= {"volume", "novelty", "long_unaccepted"}, a
    assert a.signals["novelty"] > 0.9 and a.signals["accept_rate"] == 0


def test_slow_steady_distiller_flagged_without_volume():
    rng = random.Random(2)
    alarms = Alarms()
    team(alarms, rng)
    alerts = distiller(alarms, "slowpoke", rng, per_hour=150, hours=3)
    assert alerts and "volume" not in alerts[0].reasons
    assert set(alerts[0].reasons) == {"novelty", "sustained", "long_unaccepted"}


def test_heavy_chat_user_not_flagged():
    """Chat answers are long and questions differ, but a person takes breaks and chat has no accept events."""
    rng = random.Random(3)
    alarms = Alarms()
    team(alarms, rng)
    t, flagged = T0, []
    while t < T0 + 3 * 3600:
        for _ in range(rng.randint(5, 25)):  # a conversation
            flagged.append(
                alarms.observe(
                    "asker",
                    t=t,
                    kind="chat",
                    prompt_text="\n".join(code_line(rng) for _ in range(8)),
                    completion_tokens=rng.randint(200, 600),
                )
            )
            t += rng.uniform(20, 90)
        t += rng.uniform(10, 40) * 60
    assert [a for a in flagged if a] == []


def test_scripted_chat_extraction_flagged():
    """A script sweeping chat around the clock: high volume, novel prompts, no breaks."""
    rng = random.Random(4)
    alarms = Alarms()
    team(alarms, rng)
    alerts = distiller(alarms, "sweeper", rng, per_hour=1200, kind="chat")
    assert alerts and set(alerts[0].reasons) == {"volume", "novelty", "sustained"}


def test_editor_heavy_user_with_no_accept_events_not_flagged():
    """Continue sends no acceptance events: a busy developer there must not be flagged for it."""
    rng = random.Random(5)
    alarms = Alarms()
    team(alarms, rng)
    assert editor_user(alarms, "continue-user", rng, per_hour=800, accept=0.0, work_share=0.9) == []


def test_own_baseline_counts():
    alarms = Alarms(AlarmPolicy(min_baseline=10))
    rng = random.Random(6)
    editor_user(alarms, "a", rng, per_hour=300, hours=3)
    s = alarms.signals("a", t=T0 + 3 * 3600)
    assert s["own_hourly_median"] > 100 and s["baseline"] >= s["own_hourly_median"]


def test_own_baseline_is_seeded_from_the_audit_log(audit_log):
    """After a restart a habitually heavy user keeps their baseline: 500 requests in an hour is their normal."""
    now = T0 + 10 * 3600
    for h in range(1, 6):  # five earlier hours of 50 records each (stand-ins for 500)
        for i in range(50):
            audit_log.append(user="heavy", status=200, ts=now - h * 3600 + i)
    audit_log.append(user="heavy", status=429, ts=now - 6 * 3600)  # refused requests do not count
    alarms = Alarms()
    assert alarms.seed(audit_log, now=now) == 5
    alarms.observe("heavy", t=now, prompt_text="x = 1")
    assert alarms.signals("heavy", t=now)["own_hourly_median"] == 50
    assert alarms.seed(audit_log, days=0, now=now) == 0


def _scan(events, users, user, t, window):
    """The signals' numbers counted from every event, as they were computed before the running sums."""
    reqs = [e for e in events if e[0] == user and e[2] != "select" and e[1] >= t - window]
    comps = [e for e in reqs if e[2] == "completion"]
    others = [sum(1 for e in events if e[0] == u and e[2] != "select" and e[1] >= t - window) for u in users if u != user]
    others = sorted(n for n in others if n)
    span = reqs[-1][1] - reqs[0][1] if len(reqs) > 1 else 0.0
    accepts = sum(1 for e in events if e[0] == user and e[2] == "select" and e[1] >= t - window)
    return {
        "requests": len(reqs),
        "team_median": (others[len(others) // 2] + others[(len(others) - 1) // 2]) / 2 if others else 0.0,
        "novelty": round(sum(e[3] for e in reqs) / len(reqs), 3) if reqs else 0.0,
        "span_s": round(span, 1),
        "active_minute_share": round(len({int(e[1] // 60) for e in reqs}) / max(1, int(span // 60) + 1), 3),
        "completions": len(comps),
        "mean_completion_tokens": round(sum(e[4] for e in comps) / len(comps), 1) if comps else 0.0,
        "accept_rate": round(accepts / len(comps), 4) if comps else 0.0,
    }


def test_running_sums_equal_a_scan_of_the_window():
    """The signals come from sums kept as requests arrive and leave the window (not from a walk over the
    window per evaluation, which grew with the traffic of the last hour): on random traffic of three users,
    across many windows, they equal a scan of every event."""
    rng = random.Random(7)
    window = 600
    alarms = Alarms(AlarmPolicy(window_s=window, every=10**9))  # never evaluated: the numbers are compared
    events: list[tuple] = []  # (user, t, kind, novel, completion tokens)
    users = ["a", "b", "c"]
    t = T0
    for i in range(3000):
        t += rng.expovariate(1 / 3)
        u = rng.choice(users)
        kind = rng.choice(["completion", "completion", "chat", "select", "view"])
        if kind in ("select", "view"):  # editor events: only acceptances count
            alarms.observe(u, t=t, kind="event", event=kind)
            if kind == "select":
                events.append((u, t, "select", False, 0))
            continue
        novel = rng.random() < 0.5  # a new line is novel; an empty prompt never is
        n = rng.randint(1, 300)
        alarms.observe(u, t=t, kind=kind, prompt_text=f"unique_line_{i} = {i}" if novel else "", completion_tokens=n)
        events.append((u, t, kind, novel, n))
        if i % 97 == 0:
            for who in users:
                s = alarms.signals(who, t=t)
                if s:
                    assert {k: s[k] for k in _scan(events, users, who, t, window)} == _scan(events, users, who, t, window)
    later = t + window / 2  # half the window has passed in silence: the oldest half has left it
    for who in users:
        s = alarms.signals(who, t=later)
        assert {k: s[k] for k in _scan(events, users, who, later, window)} == _scan(events, users, who, later, window)
