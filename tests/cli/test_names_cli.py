"""One rule for a group's name wherever a group is named."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


def test_a_group_the_accounts_accept_can_be_given_a_repository(tmp_path: Path):
    """Was (an outside tester): `users add u1 --groups eng@corp` (a directory's group) was accepted, but `index add
    --groups eng@corp` refused '@', so no repository could ever be readable by that group. Now the index names
    groups by the accounts' rule. The negative: a name outside it is still refused, by both, in one line."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("def f():\n    return 1\n")
    assert run_cli("users", "add", "u1", "--groups", "eng@corp").returncode == 0
    r = run_cli("index", "add", str(repo), "--name", "r", "--groups", "eng@corp,web", "--json")
    assert r.returncode == 0, r.stderr
    r = run_cli("index", "list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["groups"] == ["eng@corp", "web"], r.stdout
    for args in (("users", "add", "u2", "--groups", "eng*"), ("index", "add", str(repo), "--name", "r2", "--groups", "eng*")):
        r = run_cli(*args)
        assert r.returncode == 1 and "invalid group name 'eng*'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
