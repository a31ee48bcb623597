"""Nothing outside a repository's root is ever read: symlinks, `..`, special files, hard links,
another indexed repository — for a git work tree and a plain folder, and through a served request."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess

import httpx
import pytest

from codemoat.errors import CodemoatError
from codemoat.index.store import SqliteIndex
from codemoat.index.update import add_repository, update_repository
from codemoat.index.reader import Refused, RepoReader
from codemoat.index.walk import scan
from conftest import create_token, run_cli

OUTSIDE = "OUTSIDE_SECRET_4711 = 'not for the index'\n"
OUTSIDE_DIR = "OUTSIDE_FOLDER_4712 = 1\n"
OTHER = "OTHER_REPO_SECRET_4713 = 'group other only'\n"
KEY = '{"x25519": "MACHINEKEY4714SECRETMARKER", "ed25519": "MACHINEKEY4714SECRETMARKER"}\n'
MARKERS = ("OUTSIDE_SECRET_4711", "OUTSIDE_FOLDER_4712", "OTHER_REPO_SECRET_4713", "MACHINEKEY4714")
git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def _layout(tmp_path, home, kind: str):
    """An outside file and folder, a second indexed repository, the machine key, and a repository
    linking to each of them (plus a link that stays inside, a FIFO and a hard link)."""
    out = tmp_path / "outside"
    (out / "dir").mkdir(parents=True)
    (out / "secret.py").write_text(OUTSIDE)
    (out / "dir" / "x.py").write_text(OUTSIDE_DIR)
    (out / "hard.py").write_text(OUTSIDE)
    other = tmp_path / "other"
    other.mkdir()
    (other / "private.py").write_text(OTHER)
    if not (home / "machine.key").exists():
        (home / "machine.key").write_text(KEY)
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "ok.py").write_text("def fee_for(amount):\n    return amount // 100\n")
    (repo / "settings.json").symlink_to(home / "machine.key")  # absolute, to the machine key
    (repo / "secret.py").symlink_to(out / "secret.py")  # absolute, to a file outside
    (repo / "linked").symlink_to(out / "dir")  # to a folder outside
    (repo / "peek.py").symlink_to("../other/private.py")  # relative, into another indexed repository
    (repo / "sub" / "up.py").symlink_to("../../outside/secret.py")  # `..` out of the root
    (repo / "alias.py").symlink_to("ok.py")  # stays inside: skipped, its target indexed as ok.py
    os.link(out / "hard.py", repo / "hard.py")  # a hard link: the same file, by another path
    if kind == "git":
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    os.mkfifo(repo / "pipe.py")  # after `git add`: a reader that opens it would block
    return repo, other


def _all_text(home) -> bytes:
    return b"".join(p.read_bytes() for p in home.glob("index.db*"))


@pytest.mark.parametrize("kind", [pytest.param("git", marks=git), "plain"])
def test_links_out_of_the_root_are_never_read(tmp_path, home, kind):
    repo, other = _layout(tmp_path, home, kind)
    store = SqliteIndex()
    add_repository(store, other, "other", ["other"])
    stats = add_repository(store, repo, "repo", ["everyone"])
    refused = stats.refused
    assert "outside the repository" in refused["settings.json"]
    assert "outside the repository" in refused["secret.py"]
    assert "outside the repository" in refused["peek.py"]
    assert "outside the repository" in refused["sub/up.py"]
    assert "symlink inside the repository" in refused["alias.py"]
    assert "hard link" in refused["hard.py"]
    if kind == "plain":  # git does not list a FIFO; the walk names it
        assert "FIFO" in refused["pipe.py"]
    if kind == "git":  # git lists a symlinked folder as one entry; the walk never enters it
        assert "symlink" in refused["linked"]
    rows = store.db.execute("SELECT path FROM files f JOIN repos r ON r.id = f.repo_id WHERE r.name='repo'").fetchall()
    assert [r[0] for r in rows] == ["ok.py"]  # the inside link's target, once, under its own path
    store.close()
    blob = _all_text(home)
    for marker in MARKERS[:2] + MARKERS[3:]:
        assert marker.encode() not in blob, marker
    assert blob.count(b"OTHER_REPO_SECRET_4713") >= 1  # in the other repository's own rows only
    db = sqlite3.connect(home / "index.db")
    got = db.execute(
        "SELECT r.name FROM chunks c JOIN repos r ON r.id = c.repo_id WHERE c.text LIKE '%OTHER_REPO_SECRET_4713%'"
    ).fetchall()
    assert got == [("other",)]


@pytest.mark.parametrize("kind", [pytest.param("git", marks=git), "plain"])
def test_a_file_later_replaced_by_a_link_leaves_the_index(tmp_path, home, kind):
    repo, _ = _layout(tmp_path, home, kind)
    (repo / "later.py").write_text("LATER = 1\n")
    if kind == "git":
        subprocess.run(["git", "-C", str(repo), "add", "later.py"], check=True)
    store = SqliteIndex()
    add_repository(store, repo, "repo", ["everyone"])
    (repo / "later.py").unlink()
    (repo / "later.py").symlink_to(home / "machine.key")
    stats = update_repository(store, "repo")
    assert stats.removed == 1 and "outside the repository" in stats.refused["later.py"]
    store.close()
    assert b"MACHINEKEY4714" not in _all_text(home)


def test_a_folder_of_another_indexed_repository_inside_this_one_is_not_read(tmp_path):
    outer = tmp_path / "outer"
    (outer / "team-b").mkdir(parents=True)
    (outer / "a.py").write_text("A = 1\n")
    (outer / "team-b" / "b.py").write_text(OTHER)
    store = SqliteIndex()
    add_repository(store, outer / "team-b", "team-b", ["team-b"])
    stats = add_repository(store, outer, "outer", ["everyone"])
    assert "another indexed repository" in stats.refused["team-b/"]
    rows = store.db.execute("SELECT r.name, f.path FROM files f JOIN repos r ON r.id = f.repo_id ORDER BY 1").fetchall()
    assert rows == [("outer", "a.py"), ("team-b", "b.py")]


def test_dotdot_and_absolute_paths_are_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "x.py").write_text(OUTSIDE)
    with RepoReader(tmp_path / "r") as reader:
        for rel in ("../x.py", "a/../../x.py", str(tmp_path / "x.py"), "./x.py"):
            assert isinstance(reader.read(rel), Refused), rel


def test_a_file_swapped_for_a_link_between_check_and_open_is_refused(tmp_path, home):
    """The race: the entry is checked, then replaced by a symlink before it is opened."""
    (home / "machine.key").write_text(KEY)
    root = tmp_path / "r"
    root.mkdir()
    (root / "a.py").write_text("A = 1\n")

    class Racy(RepoReader):
        def _lstat(self, rel):
            got = super()._lstat(rel)
            (root / rel).unlink()
            (root / rel).symlink_to(home / "machine.key")
            return got

    with Racy(root) as reader:
        got = reader.read("a.py")
    assert isinstance(got, Refused) and "symlink" in got

    (root / "b.py").write_text("B = 1\n")

    class Swapped(RepoReader):  # replaced by another regular file (e.g. a hard link): inode differs
        def _lstat(self, rel):
            got = super()._lstat(rel)
            (root / rel).unlink()
            os.link(home / "machine.key", root / rel)
            return got

    with Swapped(root) as reader:
        got = reader.read("b.py")
    assert isinstance(got, Refused) and "replaced" in got
    with RepoReader(root) as reader:  # control: an ordinary file reads
        (root / "c.py").write_text("C = 1\n")
        assert reader.read("c.py") == b"C = 1\n"


def test_scan_lists_only_safe_paths(tmp_path, home):
    repo, _ = _layout(tmp_path, home, "plain")
    listing = scan(repo)
    assert listing.paths == ["ok.py"]
    assert set(listing.refused) >= {
        "settings.json",
        "secret.py",
        "peek.py",
        "sub/up.py",
        "alias.py",
        "hard.py",
        "pipe.py",
        "linked",
    }


@git
def test_index_add_names_the_refused_link_and_why(tmp_path, home):
    repo, _ = _layout(tmp_path, home, "git")
    r = run_cli("index", "add", str(repo), "--name", "repo", "--groups", "everyone")
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if "settings.json" in l)
    assert "not read" in line and "outside the repository" in line
    d = json.loads(run_cli("index", "update", "repo", "--json").stdout)[0]
    assert "outside the repository" in d["refused"]["settings.json"]


@pytest.mark.slow
@git
def test_a_served_completion_never_returns_the_machine_key(tmp_path, home, serve_process, random_gguf):
    assert run_cli("machine-id").returncode == 0  # the real key (the server signs its audit log with it)
    secret = json.loads((home / "machine.key").read_text())["x25519"]
    repo, _ = _layout(tmp_path, home, "git")
    (repo / "keys.py").write_text("def load_machine_key(x25519, ed25519):\n    return x25519\n")  # a control
    subprocess.run(["git", "-C", str(repo), "add", "keys.py"], check=True)
    assert run_cli("index", "add", str(repo), "--name", "repo", "--groups", "everyone").returncode == 0
    token = create_token("--name", "dev")
    s = serve_process(["--model", str(random_gguf), "--model-id", "tiny"])
    body = {
        "model": "tiny",
        "max_tokens": 1,
        "temperature": 0,
        "prompt": f"# settings.json x25519 ed25519 {secret}\nkey = load_machine_key(x25519, ",
        "codemoat": {"repo": "repo", "path": "main.py", "return_snippets": True},
    }
    r = httpx.post(s.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200, r.text
    snippets = r.json()["codemoat"]["snippets"]
    assert any(sn["path"] == "keys.py" for sn in snippets)  # retrieval works for this prompt
    text = json.dumps(snippets)
    assert secret not in text and '"x25519":' not in text and "OUTSIDE_SECRET_4711" not in text


def test_codemoat_data_folder_is_never_indexed(tmp_path, monkeypatch):
    outer = tmp_path / "admin-home"
    home = outer / ".codemoat"
    home.mkdir(parents=True)
    monkeypatch.setenv("CODEMOAT_HOME", str(home))
    (home / "machine.key").write_text(KEY)
    (home / "notes.md").write_text("MACHINEKEY4714 in a note\n")
    store = SqliteIndex()
    with pytest.raises(CodemoatError, match="inside codemoat's data folder"):
        add_repository(store, home, "home", ["everyone"])
    # a folder that holds the data folder (an admin indexing their home directory): that part is not read
    (outer / "a.py").write_text("A = 1\n")
    stats = add_repository(store, outer, "outer", ["everyone"])
    assert list(stats.refused) == [".codemoat/"] and "codemoat's data folder" in stats.refused[".codemoat/"]
    rows = store.db.execute("SELECT path FROM files").fetchall()
    assert rows == [("a.py",)]
    store.close()
    assert b"MACHINEKEY4714" not in _all_text(home)


def _swapped_parent(base, monkeypatch, home_in_lib: str):
    """A repository added at base/srv/repos/proj; then base/srv/repos is swapped for a link to base/lib,
    where the data folder is lib/`home_in_lib` (it holds an identity token and a note)."""
    lib, srv = base / "lib", base / "srv"
    home = lib / home_in_lib
    home.mkdir(parents=True)
    monkeypatch.setenv("CODEMOAT_HOME", str(home))
    (srv / "repos" / "proj").mkdir(parents=True)
    (srv / "repos" / "proj" / "a.py").write_text("A = 1\n")
    store = SqliteIndex()
    add_repository(store, srv / "repos" / "proj", "proj", ["everyone"])
    (home / "login.json").write_text('{"token": "LOGINTOKEN4715"}\n')
    (home / "notes.md").write_text("MACHINEKEY4714 in a note\n")
    (srv / "repos").rename(srv / "repos.old")
    (srv / "repos").symlink_to(lib)
    return store, home


def _nothing_of(store, home) -> None:
    paths = [r[0] for r in store.db.execute("SELECT path FROM files")]
    store.close()
    assert not any("login" in p or "notes" in p for p in paths), paths
    text = _all_text(home)
    assert b"LOGINTOKEN4715" not in text and b"MACHINEKEY4714" not in text


def test_a_repository_whose_path_later_leads_to_the_data_folder_is_not_read(tmp_path, monkeypatch):
    """`index add` refused the data folder by its path, but the recorded path is opened again at every
    update: someone who may write the repository's parent folder swaps it for a link, and the path now
    names the data folder, or a folder holding it (login.json: an identity token). Before, both were
    indexed; the folders opened are now compared with the data folder by device and inode."""
    store, home = _swapped_parent(tmp_path / "a", monkeypatch, "proj")  # srv/repos/proj is the data folder
    with pytest.raises(CodemoatError, match="codemoat's data folder"):
        update_repository(store, "proj")
    _nothing_of(store, home)
    store, home = _swapped_parent(tmp_path / "b", monkeypatch, "proj/.codemoat")  # it holds the data folder
    with pytest.raises(CodemoatError, match="no longer the folder indexed as 'proj'"):
        update_repository(store, "proj")  # another folder than the one added (device and inode)
    with store.transaction():  # as an index from before schema 4, which learns the folder at this update:
        store.db.execute("UPDATE repos SET root_dev = NULL, root_ino = NULL")
    stats = update_repository(store, "proj")  # the data folder inside is still refused by what is opened
    assert list(stats.refused) == [".codemoat/"] and "codemoat's data folder" in stats.refused[".codemoat/"]
    _nothing_of(store, home)


def test_a_repository_whose_path_later_leads_to_another_repository_is_not_read(tmp_path, home):
    """The same swap, onto another indexed repository: team-b's code (group team-b) was indexed again
    under the swapped repository's name and groups (everyone). Refused by what is opened."""
    srv, teams = tmp_path / "srv", tmp_path / "teams"
    (srv / "repos" / "web").mkdir(parents=True)
    (srv / "repos" / "web" / "a.py").write_text("A = 1\n")
    (teams / "web").mkdir(parents=True)  # team-b's repository, in a folder of the same name
    (teams / "web" / "b.py").write_text(OTHER)
    store = SqliteIndex()
    add_repository(store, teams / "web", "team-b", ["team-b"])
    add_repository(store, srv / "repos" / "web", "web", ["everyone"])
    (srv / "repos").rename(srv / "repos.old")
    (srv / "repos").symlink_to(teams)  # .../srv/repos/web is now team-b's folder
    with pytest.raises(CodemoatError, match="another indexed repository"):
        update_repository(store, "web")
    rows = store.db.execute("SELECT r.name, f.path FROM files f JOIN repos r ON r.id = f.repo_id ORDER BY 1").fetchall()
    store.close()
    assert rows == [("team-b", "b.py"), ("web", "a.py")]


def test_a_repository_whose_path_later_leads_into_another_repositorys_subfolder_is_not_read(tmp_path, home):
    """Was open: the swap onto a *subfolder* of another indexed repository. Its root is no indexed
    repository's root and no folder on the way down is one, so team-b's code under b/web was indexed
    again under web's name and groups (everyone). `index add` now keeps the folder's device and inode
    and `index update` refuses a root that is no longer that folder (recorded on the first update for a
    repository indexed before). Re-cloning a repository into a new folder needs remove + add."""
    srv, teams = tmp_path / "srv", tmp_path / "teams"
    (srv / "repos" / "web").mkdir(parents=True)
    (srv / "repos" / "web" / "a.py").write_text("A = 1\n")
    (teams / "b" / "web").mkdir(parents=True)  # team-b's repository holds a folder named web
    (teams / "b" / "web" / "b.py").write_text(OTHER)
    store = SqliteIndex()
    add_repository(store, teams / "b", "team-b", ["team-b"])
    add_repository(store, srv / "repos" / "web", "web", ["everyone"])
    update_repository(store, "web")  # the same folder: updates as before
    (srv / "repos").rename(srv / "repos.old")
    (srv / "repos").symlink_to(teams / "b")  # .../srv/repos/web is now team-b's b/web
    with pytest.raises(CodemoatError, match="no longer the folder indexed as 'web'"):
        update_repository(store, "web")
    rows = store.db.execute("SELECT r.name, f.path FROM files f JOIN repos r ON r.id = f.repo_id ORDER BY 1, 2").fetchall()
    store.close()
    assert rows == [("team-b", "web/b.py"), ("web", "a.py")]
    r = run_cli("index", "update", "web")
    assert r.returncode == 1 and "no longer the folder indexed as 'web'" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_an_index_from_before_the_folder_identity_learns_it_at_its_next_update(tmp_path, home):
    """An index.db written before schema 4 has no device and inode for its repositories: the next
    update records them (the folder as it is then), and a later swap is refused. A new device number
    with the same inode (a volume mounted again) is the same folder."""
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.py").write_text("A = 1\n")
    store = SqliteIndex()
    add_repository(store, tmp_path / "web", "web", ["everyone"])
    with store.transaction():
        store.db.execute("UPDATE repos SET root_dev = NULL, root_ino = NULL")
    update_repository(store, "web")
    dev, ino = store.db.execute("SELECT root_dev, root_ino FROM repos").fetchone()
    assert dev is not None and ino is not None
    with store.transaction():  # the volume mounted again (a new pod): the same folder, another device number
        store.db.execute("UPDATE repos SET root_dev = root_dev + 1")
    update_repository(store, "web")
    assert store.db.execute("SELECT root_dev, root_ino FROM repos").fetchone() == (dev, ino)
    (tmp_path / "web").rename(tmp_path / "web.old")
    (tmp_path / "web").mkdir()  # another folder at the same path
    with pytest.raises(CodemoatError, match="no longer the folder indexed as 'web'"):
        update_repository(store, "web")
    store.close()
