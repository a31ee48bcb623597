"""A user never receives retrieved code from a repository outside its groups (randomised with hypothesis)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository
from codemoat.retrieve import Retriever, can_read

GROUPS = ["admin", "everyone", "dev", "ops", "payments", "hr", "contractors"]
N_REPOS = 5


def _oracle(repo_groups: set[str], caller: set[str]) -> bool:
    """The documented rule, written independently of codemoat.retrieve.acl."""
    return "admin" in caller or bool(repo_groups & (caller | {"everyone"}))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, SqliteIndex]:
    base = tmp_path_factory.mktemp("acl")
    store = SqliteIndex(base / "index.db")
    for i in range(N_REPOS):
        root = base / f"repo{i}"
        (root / "lib").mkdir(parents=True)
        # Every repository defines the same API, so each one would answer every query.
        (root / "lib" / "shared.py").write_text(
            f"def compute_total(items):\n    '''Repository {i}.'''\n    return sum(items) + {i}\n\n"
            f"class Invoice:\n    def total(self):\n        return compute_total(self.items)\n"
        )
        (root / "app.py").write_text("from lib.shared import compute_total, Invoice\n\ndef main(xs):\n    return \n")
        add_repository(store, root, f"repo{i}", ["dev"])
    return base, store


repo_groups = st.lists(st.sets(st.sampled_from(GROUPS), min_size=0, max_size=3), min_size=N_REPOS, max_size=N_REPOS)
callers = st.sets(st.sampled_from(GROUPS + ["nobody"]), max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(assignment=repo_groups, caller=callers)
def test_no_snippet_from_an_unreadable_repository(world, assignment, caller):
    base, store = world
    db = store.db
    with store.transaction():  # groups straight into the store (the CLI refuses empty sets; the store must cope)
        for i, gs in enumerate(assignment):
            rid = store.repo(f"repo{i}").id
            db.execute("DELETE FROM repo_groups WHERE repo_id=?", (rid,))
            db.executemany("INSERT INTO repo_groups VALUES (?,?)", [(rid, g) for g in gs])
    r = Retriever(base / "index.db")  # fresh: no cached group assignments
    groups = frozenset(caller)
    readable = {f"repo{i}" for i, gs in enumerate(assignment) if _oracle(set(gs), set(caller))}
    assert set(r.readable_repos(groups)) == readable

    prefix = "from lib.shared import compute_total, Invoice\n\ndef main(xs):\n    return "
    for i in range(N_REPOS):
        name = f"repo{i}"
        snips = r.snippets_for_completion(groups=groups, repo=name, path="app.py", prefix=prefix, suffix="\n")
        assert all(s.repo in readable for s in snips)
        if name in readable:
            assert any(s.path == "lib/shared.py" for s in snips), "a readable repository must still answer"
        else:
            assert snips == []
    asked = [f"repo{i}" for i in range(N_REPOS)]
    for repos in (asked, []):
        snips = r.snippets_for_chat(groups=groups, repos=repos, query="compute_total Invoice total", k=20, budget_tokens=10_000)
        assert {s.repo for s in snips} <= readable
        assert bool(snips) == bool(readable)


def test_rule_examples():
    assert can_read({"payments"}, {"payments"}) and not can_read({"payments"}, {"dev"})
    assert can_read({"everyone"}, set()) and can_read({"payments"}, {"admin"})
    assert not can_read(set(), {"dev", "everyone"}) and can_read(set(), {"admin"})
