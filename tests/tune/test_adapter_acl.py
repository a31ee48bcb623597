"""An adapter never serves a user who could not read every repository it was trained on
(randomised with hypothesis, against a real index whose groups change after tuning)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codemoat.engines.adapters import LoadedAdapter
from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository
from codemoat.retrieve import Retriever
from codemoat.serve.adapters import choose

GROUPS = ["admin", "everyone", "dev", "ops", "payments", "hr", "contractors"]
N_REPOS = 4


def _oracle(repo_groups: set[str], caller: set[str]) -> bool:
    """The documented rule, written independently of codemoat.retrieve.acl."""
    return "admin" in caller or bool(repo_groups & (caller | {"everyone"}))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, SqliteIndex]:
    base = tmp_path_factory.mktemp("adapter-acl")
    store = SqliteIndex(base / "index.db")
    for i in range(N_REPOS):
        root = base / f"repo{i}"
        root.mkdir()
        (root / "a.py").write_text(f"X = {i}\n")
        add_repository(store, root, f"repo{i}", ["dev"])
    return base, store


group_sets = st.frozensets(st.sampled_from(GROUPS), max_size=3)
adapters = st.lists(
    st.lists(
        st.tuples(st.sampled_from([f"repo{i}" for i in range(N_REPOS)] + ["gone"]), group_sets),
        min_size=0,
        max_size=3,
        unique_by=lambda t: t[0],
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    now=st.lists(group_sets, min_size=N_REPOS, max_size=N_REPOS),
    specs=adapters,
    caller=st.frozensets(st.sampled_from(GROUPS + ["nobody"]), max_size=3),
)
def test_an_adapter_serves_only_who_may_read_all_its_repositories(world, now, specs, caller):
    base, store = world
    with store.transaction():  # today's groups, which may differ from those recorded at tuning time
        for i, gs in enumerate(now):
            rid = store.repo(f"repo{i}").id
            store.db.execute("DELETE FROM repo_groups WHERE repo_id=?", (rid,))
            store.db.executemany("INSERT INTO repo_groups VALUES (?,?)", [(rid, g) for g in gs])
    current = {f"repo{i}": set(gs) for i, gs in enumerate(now)}
    loaded = [LoadedAdapter(f"a{k}", tuple((r, tuple(sorted(g))) for r, g in spec), "0" * 64, -1) for k, spec in enumerate(specs)]
    readable_now = Retriever(base / "index.db").readable_repos(caller)

    def may(a: LoadedAdapter) -> bool:
        return bool(a.repos) and all(
            r in current and _oracle(current[r], set(caller)) and _oracle(set(g), set(caller)) for r, g in a.repos
        )

    got = choose(loaded, caller, readable_now)
    if got is not None:
        for repo, recorded in got.repos:  # every repository: readable then and now
            assert repo in current and _oracle(current[repo], set(caller)) and _oracle(set(recorded), set(caller))
    first = next((a for a in loaded if may(a)), None)
    assert got == first  # and one that may serve the caller does (the first in configuration order)


def test_no_adapters_or_no_repositories_mean_the_base():
    assert choose([], {"payments"}, ["payments"]) is None
    assert choose([LoadedAdapter("x", (), "0" * 64, -1)], {"admin"}, ["payments"]) is None
