"""One index writer, several serving replicas (CODEMOAT_INDEX_PATH on a shared volume, a file or a
snapshot directory): a writer
killed mid-way leaves every replica serving the previous index, and a complete update becomes
visible to every replica at once, with no restart."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import httpx
import pytest

from conftest import ROOT, create_token, run_cli

pytestmark = pytest.mark.slow


def _snippets(url: str, token: str) -> str:
    body = {
        "model": "codemoat-tiny",
        "prompt": "from lib.money import fmt\n\n\ndef total(c):\n    return fmt(",
        "suffix": ")\n",
        "max_tokens": 1,
        "temperature": 0,
        "codemoat": {"repo": "payments", "path": "report.py", "return_snippets": True},
    }
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json().get("codemoat", r.json()))


@pytest.mark.parametrize("layout", ["file", "snapshots"])
def test_killed_index_update_leaves_replicas_on_the_previous_index(layout, tmp_path, tiny_gguf, serve_process, monkeypatch):
    # "file": one SQLite file in WAL mode (replicas on one host); "snapshots": a directory of
    # immutable snapshots behind a pointer (replicas on several hosts sharing the volume)
    shared = tmp_path / "shared-volume" / ("index.db" if layout == "file" else "index")
    shared.parent.mkdir()
    if layout == "snapshots":
        shared.mkdir()
    monkeypatch.setenv("CODEMOAT_INDEX_PATH", str(shared))
    repo = tmp_path / "payments"
    (repo / "lib").mkdir(parents=True)
    (repo / "lib" / "__init__.py").write_text("")
    (repo / "lib" / "money.py").write_text('def fmt(cents):\n    """OLD_VERSION_MARKER"""\n    return str(cents)\n')
    for i in range(12):
        (repo / f"mod{i}.py").write_text(f"def helper_{i}():\n    return {i}\n")
    assert run_cli("index", "add", str(repo), "--name", "payments", "--groups", "everyone").returncode == 0
    token = create_token("--name", "alice")
    replicas = [serve_process(["--model", str(tiny_gguf)]) for _ in range(2)]
    for s in replicas:
        assert "OLD_VERSION_MARKER" in _snippets(s.url, token)

    (repo / "lib" / "money.py").write_text('def fmt(cents):\n    """NEW_VERSION_MARKER"""\n    return f"{cents / 100:.2f}"\n')
    for i in range(12):
        (repo / f"mod{i}.py").write_text(f"def changed_{i}():\n    return -{i}\n")
    # the writer dies (no cleanup at all) half-way through its update
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT / "src")!r})
        from codemoat.index.store import SqliteIndex
        from codemoat.index.update import update_repository
        def progress(done, total, path):
            if done == 8:
                os._exit(9)
        update_repository(SqliteIndex({str(shared)!r}), "payments", progress)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    for s in replicas:
        got = _snippets(s.url, token)
        assert "OLD_VERSION_MARKER" in got and "NEW_VERSION_MARKER" not in got

    assert run_cli("index", "update", "payments").returncode == 0
    for s in replicas:  # the same processes, no restart
        got = _snippets(s.url, token)
        assert "NEW_VERSION_MARKER" in got and "OLD_VERSION_MARKER" not in got
