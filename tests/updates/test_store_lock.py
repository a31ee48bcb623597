"""Two processes changing the update store at once (two serves confirming a pending version at their start,
`update apply` beside `update rollback`): each read state.json, changed it and renamed one fixed
state.json.tmp over it, so one rename failed (FileNotFoundError, which stopped that serve's start) and the
other process's change was lost. Found by reviewer V3 (133 and 166 of 300 writes failed in two looping
processes). Every read-change-write now holds an flock on updates/state.lock (`UpdateStore._locked`)."""

from __future__ import annotations

import subprocess
import sys

LOOP = """
import sys
from codemoat.updates.store import UpdateStore
s = UpdateStore()
for _ in range(int(sys.argv[1])):
    with s._locked():  # what apply, rollback, confirm, fail and reconcile hold
        st = s.state()
        st["n"] = st.get("n", 0) + 1
        s._write_state(st)
with s._locked():
    with s._locked():  # re-entrant in one object: apply calls reconcile
        pass
"""


def test_two_processes_changing_the_store_at_once_lose_nothing(machine, tmp_path):
    from codemoat.updates.store import UpdateStore

    n = 150
    procs = [
        subprocess.Popen([sys.executable, "-c", LOOP, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert UpdateStore(machine=machine).state()["n"] == 2 * n  # every change kept


def test_the_lock_file_is_not_followed_through_a_link(machine, tmp_path):
    """The negative: a link put at updates/state.lock (another local account's trick) is refused in one
    line, not followed to whatever it names."""
    import pytest

    from codemoat.errors import CodemoatError
    from codemoat.updates.store import UpdateStore

    s = UpdateStore(machine=machine)
    target = tmp_path / "elsewhere"
    target.write_text("")
    (s.root / "state.lock").symlink_to(target)
    with pytest.raises(CodemoatError, match="symbolic link"):
        s.confirm("model", "nothing")
