"""Knowledge packs: the vendor ships a library's source and docs; retrieval uses it like a repository."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError

CALL_SITE = """import httpx


def fetch_status(url: str) -> int:
    with httpx.Client(timeout=5.0, follow_redirects=True) as client:
        response = client."""


@pytest.fixture
def httpx_pack(tmp_path) -> Path:
    """A real pack: httpx's own installed source and docstrings."""
    import httpx

    folder = tmp_path / "pack"
    shutil.copytree(Path(httpx.__file__).parent, folder / "httpx", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


@pytest.fixture
def app_repo(tmp_path) -> Path:
    repo = tmp_path / "app"
    repo.mkdir()
    (repo / "status.py").write_text(CALL_SITE + "\n")
    (repo / "other.py").write_text("def unrelated():\n    return 42\n")
    return repo


def _snippets(groups: set[str]) -> list:
    from codemoat.retrieve.retriever import Retriever

    r = Retriever()
    return r.snippets_for_completion(
        groups=frozenset(groups), repo="app", path="status.py", prefix=CALL_SITE, suffix="", k=8, budget_tokens=2000
    )


def test_pack_definitions_reach_a_call_site_and_only_its_groups(shop, store, httpx_pack, app_repo):
    from codemoat.index.store import SqliteIndex
    from codemoat.index.update import add_repository

    add_repository(SqliteIndex(), app_repo, "app", ["everyone"])
    assert not any(s.repo.startswith("pack.") for s in _snippets({"dev"}))  # before: nothing from httpx
    lic = shop.license()
    b = shop.release("0.28.1", kind="knowledge-pack", source=httpx_pack, name="httpx", notes="httpx API reference")
    out = store.apply(b, lic, groups=["dev"])
    assert out["index"]["source"] == "pack.httpx" and out["index"]["symbols"] > 100
    got = _snippets({"dev"})
    from_pack = [s for s in got if s.repo == "pack.httpx"]
    assert from_pack, [s.source for s in got]
    assert any(s.path == "httpx/_client.py" and ("def get(" in s.text or "class Client" in s.text) for s in from_pack), [
        s.source for s in from_pack
    ]
    # a user outside the groups the admin chose gets nothing from the pack
    assert not any(s.repo == "pack.httpx" for s in _snippets({"support"}))
    # `index update` of everything leaves the pack alone (it changes only through `update apply`)
    from codemoat.index.update import update_repository

    assert update_repository(SqliteIndex(), "pack.httpx").indexed == 0
    # and says so: a pack is not "0 files" (it printed that before), the repository beside it is updated as ever
    import json

    from conftest import run_cli

    r = run_cli("index", "update")
    assert r.returncode == 0 and "pack.httpx: a knowledge pack, left as it is" in r.stdout, r.stdout + r.stderr
    assert "app: 2 files" in r.stdout and "pack.httpx: 0 files" not in r.stdout, r.stdout
    rows = {row["repo"]: row for row in json.loads(run_cli("index", "update", "--json").stdout)}
    assert rows["pack.httpx"]["knowledge_pack"] is True and rows["pack.httpx"]["groups"] == ["dev"]
    assert "knowledge_pack" not in rows["app"] and rows["app"]["files"] == 2


def test_newer_pack_replaces_older_and_keeps_its_groups(shop, store, tmp_path):
    from codemoat.index.store import SqliteIndex

    lic = shop.license()
    for v, name in (("1", "old_api"), ("2", "new_api")):
        f = tmp_path / f"p{v}"
        f.mkdir()
        (f / "api.py").write_text(f"def {name}():\n    return {v}\n")
        store.apply(shop.release(v, kind="knowledge-pack", source=f, name="fw"), lic, groups=["dev"] if v == "1" else None)
    idx = SqliteIndex()
    [pack] = [r for r in idx.repos() if r.name == "pack.fw"]
    assert pack.groups == ("dev",) and pack.root.startswith("pack:fw@2#")
    assert [s.name for s in idx.lookup_symbols(["old_api", "new_api"], [pack.id])] == ["new_api"]
    store.rollback("knowledge-pack:fw")
    [pack] = [r for r in SqliteIndex().repos() if r.name == "pack.fw"]
    assert pack.root.startswith("pack:fw@1#") and pack.groups == ("dev",)


@pytest.mark.parametrize("member", ["../evil.py", "/etc/evil.py", "a/../../evil.py", "a\\..\\evil.py"])
def test_pack_with_unsafe_member_names_is_refused(shop, store, tmp_path, member, monkeypatch):
    # signed by a release made before it checked member names (it refuses them now): the customer refuses it too
    monkeypatch.setattr("codemoat.updates.release._check_zip", lambda data: None)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ok.py", "x = 1\n")
        z.writestr(member, "x = 2\n")
    p = tmp_path / "bad.zip"
    p.write_bytes(buf.getvalue())
    lic = shop.license()
    with pytest.raises(CodemoatError, match="unsafe path"):
        store.apply(shop.release("1", kind="knowledge-pack", source=p, name="bad"), lic)
    assert store.current("knowledge-pack:bad") is None


def test_pack_name_cannot_take_over_a_repository(shop, store, tmp_path, app_repo):
    from codemoat.index.store import SqliteIndex
    from codemoat.index.update import import_source

    add = SqliteIndex()
    from codemoat.index.update import add_repository

    add_repository(add, app_repo, "pack.app", ["everyone"])
    with pytest.raises(CodemoatError, match="not a knowledge pack"):
        import_source(SqliteIndex(), "pack.app", "pack:app@1#b", ["everyone"], [("x.py", b"x = 1\n")])
