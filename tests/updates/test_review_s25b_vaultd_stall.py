"""vaultd takes a new model version in itself (`relay_updates`), a load as slow as a serve's: the stall bound
it tells `update apply` by is the `update.swap_stall_s` setting, as a serve's is (a reviewer, session 25: it
kept the built-in 300 s, so a model slower than that to load from vaultd's disk was given up on and failed)."""

from __future__ import annotations

import pytest

from codemoat.cli.vaultd_cmd import relay_updates
from codemoat.config import load_settings
from codemoat.updates.handoff import STALL_ENV, STALL_S


@pytest.mark.parametrize("configured", [None, 600.0])
def test_vaultd_listener_stalls_after_the_configured_seconds(configured, monkeypatch):
    monkeypatch.delenv(STALL_ENV, raising=False)
    settings = load_settings(**({"update.swap_stall_s": configured} if configured else {}))
    listener = relay_updates(object(), [], settings)  # the daemon is reached only once a swap is asked for
    assert listener is not None
    try:
        assert listener.stall_s == (configured or STALL_S)
    finally:
        listener.close()
