"""Which repository's chunks a caller gets is decided by the index as it is now: by each chunk's own
repository, not only by the `__rN` term the index adds to its chunks (a hostile committer's files can say
`__r1` too), and by the repository's groups as they are now, not as a server last read them."""

from __future__ import annotations

from codemoat.index.store import SqliteIndex, repo_term
from codemoat.index.update import add_repository
from codemoat.retrieve import Retriever


def test_another_repositorys_files_naming_the_scope_term_do_not_fill_a_search(tmp_path):
    victim, attacker = tmp_path / "victim", tmp_path / "attacker"
    victim.mkdir()
    attacker.mkdir()
    for i in range(10):
        (victim / f"v{i}.py").write_text(
            f"def ledger_entry_{i}(amount):\n    '''posting a ledger entry'''\n    return amount * {i}\n"
        )
    store = SqliteIndex()
    add_repository(store, victim, "victim", ["finance"])
    rid = store.repo("victim").id
    for i in range(30):  # ranks above every victim chunk for `ledger posting`, and claims the victim's scope
        (attacker / f"a{i}.py").write_text(
            f"def ledger_{i}(x):\n    return {repo_term(rid)} + ledger + ledger + posting + posting\n"
        )
    add_repository(store, attacker, "attacker", ["everyone"])
    hits = store.search(["ledger", "posting"], [rid], 10)
    assert len(hits) == 10
    assert {c.repo_id for c in store.chunks([cid for cid, _ in hits]).values()} == {rid}
    store.close()


def test_a_regrouped_repository_is_unreadable_to_the_old_group_at_once(tmp_path):
    repo = tmp_path / "payments"
    repo.mkdir()
    (repo / "fees.py").write_text("def interchange_fee(amount):\n    return amount * 3 // 100\n")
    add_repository(SqliteIndex(), repo, "payments", ["contractors"])
    retriever = Retriever()  # a server's: it serves request after request
    ask = dict(repos=["payments"], query="what is the interchange_fee of an amount?")
    assert len(retriever.snippets_for_chat(groups=frozenset({"contractors"}), **ask)) == 1
    SqliteIndex().set_groups("payments", ["payments"])  # `codemoat index update payments --groups payments`
    assert retriever.readable_repos(frozenset({"contractors"})) == []  # was still readable for two seconds
    assert retriever.snippets_for_chat(groups=frozenset({"contractors"}), **ask) == []
    assert len(retriever.snippets_for_chat(groups=frozenset({"payments"}), **ask)) == 1


def test_two_repositories_of_one_remote_each_resolve_for_their_own_groups(tmp_path):
    """Was: the repository a completion's file belongs to was the first, by name, of those recorded with its git
    remote, whoever asked: a checkout indexed twice (`acme-full` for admins, `acme-public` for contractors) gave a
    contractor `acme-full`, which they may not read, and so no retrieval at all. Now it is the first they may read."""
    import subprocess

    url = "git@git.acme.example:acme/app.git"
    for name in ("acme-full", "acme-public"):
        repo = tmp_path / name
        repo.mkdir()
        (repo / "app.py").write_text("def handler(event):\n    return event\n")
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        subprocess.run(["git", "-C", str(repo), "remote", "add", "origin", url], check=True)
        add_repository(SqliteIndex(), repo, name, ["admins" if name == "acme-full" else "contractors"])
    retriever = Retriever()
    readable = set(retriever.readable_repos(frozenset({"contractors"})))
    assert readable == {"acme-public"}
    assert retriever.repo_for("https://git.acme.example/acme/app", None, readable) == "acme-public"
    assert retriever.repo_for("https://git.acme.example/acme/app", None, {"acme-full"}) == "acme-full"
    assert retriever.repo_for("https://git.acme.example/acme/app", None, set()) is None  # none readable: none
