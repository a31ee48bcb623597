"""Waiting for another swap of the same serve to end is not a stall (updates.handoff, a reviewer's finding): a
second hand-off queued behind a long first swap kept stage "waiting" past the stall bound, fell silent, and its
`update apply` recorded a version failed that had never been tried. And the bound is a setting
(`update.swap_stall_s`), for models that take longer than five minutes to load from their disk."""

from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError

from codemoat.config import Settings
from codemoat.updates.handoff import STALL_S, Listener, _stall_s, hand_over, stage


def test_a_hand_off_waiting_behind_a_long_swap_is_vouched_for(tmp_path):
    release, first_in = threading.Event(), threading.Event()
    calls: list[str] = []

    def handle(chan):
        calls.append(chan)
        if chan == "model":
            first_in.set()
            for _ in range(30):  # a long swap that moves on: vouched for throughout
                stage(f"loading-{_}")
                if release.wait(0.1):
                    break
        return {"swapped": True, "version": "2"}

    ln = Listener(handle, home=tmp_path, progress_s=0.05, stall_s=0.5).start()
    got: dict = {}
    try:
        t = threading.Thread(target=lambda: got.update(model=hand_over("model", home=tmp_path, silence=1, timeout=60)))
        t.start()
        assert first_in.wait(30)
        # the adapter's hand-off waits behind the model's swap for ~3 s: six stall bounds, three silences
        (a,) = hand_over("adapter:fee", home=tmp_path, silence=1, timeout=60)
        t.join(60)
    finally:
        release.set()
        ln.close()
    assert a["ok"] is True and not a.get("lost"), a
    assert got["model"][0]["ok"] is True and calls == ["model", "adapter:fee"]


def test_the_stall_bound_is_a_setting_with_bounds(monkeypatch):
    monkeypatch.delenv("CODEMOAT_UPDATE_STALL_S", raising=False)
    assert Settings().update.swap_stall_s == STALL_S == _stall_s()
    assert _stall_s(Settings(update={"swap_stall_s": 600}).update.swap_stall_s) == 600
    for bad in (5, 10_000):
        with pytest.raises(ValidationError):
            Settings(update={"swap_stall_s": bad})
