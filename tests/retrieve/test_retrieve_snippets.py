"""Retriever on a real small repository: cross-file snippets, cursor exclusion, budget, repo lookup, chat."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository
from codemoat.retrieve import Retriever, Snippet
from codemoat.retrieve.fit import approx_tokens
from codemoat.retrieve.retriever import normalize_git_url

DEMO = Path(__file__).resolve().parents[2] / "demo" / "repo"
G = frozenset({"payments"})


@pytest.fixture
def indexed(tmp_path) -> tuple[Retriever, Path]:
    root = tmp_path / "payments-repo"
    shutil.copytree(DEMO, root)
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        subprocess.run(["git", "-C", str(root), "remote", "add", "origin", "git@git.acme.example:Fin/Payments.git"], check=True)
    add_repository(SqliteIndex(tmp_path / "index.db"), root, "payments", ["payments"])
    return Retriever(tmp_path / "index.db"), root


def _cursor(root: Path, rel: str, line: int, col: int) -> tuple[str, str]:
    lines = (root / rel).read_text().split("\n")
    return "\n".join(lines[: line - 1] + [lines[line - 1][:col]]), "\n".join(lines[line:])


def test_completion_gets_the_definition_from_another_file(indexed):
    r, root = indexed
    prefix, suffix = _cursor(root, "payments/checkout.py", 15, 16)  # `    fee_minor = |`
    snips = r.snippets_for_completion(groups=G, repo="payments", path="payments/checkout.py", prefix=prefix, suffix=suffix)
    assert snips and all(isinstance(s, Snippet) for s in snips)
    top2 = [s for s in snips[:2] if s.path == "payments/fees.py"]
    assert top2 and "def interchange_fee(" in top2[0].text
    assert all(s.path != "payments/checkout.py" for s in snips)  # the file itself is in the prompt already
    assert len({s.id for s in snips}) == len(snips)


def test_cursor_region_only_excludes_what_the_request_carries(indexed):
    r, root = indexed
    # Only the last two lines of the prefix are sent: other chunks of this file may come back,
    # never one overlapping the carried lines.
    prefix, suffix = _cursor(root, "payments/money.py", 23, 4)
    short = "\n".join(prefix.split("\n")[-2:])
    snips = r.snippets_for_completion(groups=G, repo="payments", path="payments/money.py", prefix=short,
                                      suffix="", cursor_line=23, k=10, budget_tokens=4000)  # fmt: skip
    for s in snips:
        assert not (s.path == "payments/money.py" and s.start_line <= 23 and s.end_line >= 22)


def test_budget_and_k_are_respected(indexed):
    r, root = indexed
    prefix, suffix = _cursor(root, "payments/checkout.py", 15, 16)
    for budget in (60, 120, 400):
        snips = r.snippets_for_completion(groups=G, repo="payments", path="payments/checkout.py", prefix=prefix,
                                          suffix=suffix, k=3, budget_tokens=budget)  # fmt: skip
        assert len(snips) <= 3
        assert sum(approx_tokens(s.path + "\n" + s.text) for s in snips) <= budget
    count = lambda s: len(s.split())  # noqa: E731  a caller's own tokenizer is used
    snips = r.snippets_for_completion(groups=G, repo="payments", path="payments/checkout.py", prefix=prefix,
                                      suffix=suffix, budget_tokens=30, count_tokens=count)  # fmt: skip
    assert sum(count(s.path + "\n" + s.text) for s in snips) <= 30


def test_repo_for_by_remote_name_and_path(indexed):
    r, root = indexed
    if shutil.which("git"):
        assert r.repo_for("https://git.acme.example/fin/payments", None) == "payments"
        assert r.repo_for("ssh://git@git.acme.example/Fin/Payments.git/", None) == "payments"
    assert r.repo_for("payments", None) == "payments"
    assert r.repo_for(None, str(root / "payments" / "fees.py")) == "payments"
    assert r.repo_for("https://git.acme.example/fin/other", "/elsewhere/x.py") is None
    assert r.repo_for(None, "payments/fees.py") is None  # relative paths are ambiguous
    assert normalize_git_url("git@github.com:Org/Repo.git") == normalize_git_url("https://u:p@github.com/org/repo/")
    # An absolute path is accepted in place of the relative one.
    prefix, suffix = _cursor(root, "payments/checkout.py", 15, 16)
    a = r.snippets_for_completion(
        groups=G, repo="payments", path=str(root / "payments/checkout.py"), prefix=prefix, suffix=suffix
    )
    b = r.snippets_for_completion(groups=G, repo="payments", path="payments/checkout.py", prefix=prefix, suffix=suffix)
    assert a == b


def test_chat_snippets_and_mentions(indexed):
    r, _root = indexed
    snips = r.snippets_for_chat(groups=G, repos=["payments"], query="how are amounts converted by `to_minor_units`?")
    assert snips[0].path == "payments/money.py" and "def to_minor_units" in snips[0].text
    assert r.snippets_for_chat(groups=G, repos=[], query="to_minor_units")  # [] = every readable repository
    assert r.mentioned_repos(G, "@payments how do fees work? mail me@payments.example") == ["payments"]
    assert r.mentioned_repos(G, "How do fees work in @payments.") == ["payments"]
    assert r.mentioned_repos(frozenset({"other"}), "@payments how?") == []


def test_missing_index_or_unknown_repo_yields_nothing(tmp_path):
    r = Retriever(tmp_path / "none.db")
    assert r.readable_repos(G) == [] and r.repo_for("x", "/x") is None
    assert r.snippets_for_completion(groups=G, repo="payments", path="a.py", prefix="x", suffix="") == []
    assert not (tmp_path / "none.db").exists()
