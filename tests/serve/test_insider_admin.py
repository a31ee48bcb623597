"""The customer's admin as an insider: a token with the `admin` scope (no shell as the service account).

What such a token must not give: the licensed model served without its licence's watermark, or the
plaintext weights. `POST /admin/api/model/swap {"model": PATH}` loads a model file named by the caller;
a sealed model's plaintext lives in a memfd the server holds (`/proc/self/fd/N`, `/dev/fd/N`): named as a
"plain GGUF", the server (model.isolation = inline) loaded the decrypted weights without the watermark
key, and the licence's watermark was gone from every completion (before the fix).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import httpx
import pytest

from conftest import create_token
from vault.vaulthelp import bundle


def _swap(url: str, token: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/admin/api/model/swap", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=120)


@pytest.mark.parametrize("isolation", ["inline", "process"])
def test_an_admin_cannot_swap_in_the_decrypted_memfd_and_lose_the_watermark(
    vendor, machine, gguf_file, tmp_path, serve_process, isolation
):
    moat, lic, _ = bundle(vendor, gguf_file, tmp_path / "out", machine)
    srv = serve_process(
        ["--model", str(moat), "--license", str(lic)],
        env={"CODEMOAT_MODEL__ISOLATION": isolation, "CODEMOAT_MODEL__N_CTX": "256"},
    )
    admin = create_token("--name", "ops", "--scopes", "admin")
    h = {"Authorization": f"Bearer {admin}"}
    before = httpx.get(f"{srv.url}/health", headers=h, timeout=30).json()
    # the attack: every descriptor number the server could hold, by both names the kernel gives it
    for n in range(64):
        for path in (f"/proc/self/fd/{n}", f"/dev/fd/{n}", f"/proc/{srv.proc.pid}/fd/{n}"):
            r = _swap(srv.url, admin, {"model": path})
            assert r.status_code >= 400, (path, r.text)
    after = httpx.get(f"{srv.url}/health", headers=h, timeout=30).json()
    assert after["license"] and after["license"]["license_id"] == before["license"]["license_id"]  # still the sealed model
    # the positive side: a plain GGUF on disk (the customer's own model) still swaps in
    own = tmp_path / "own.gguf"
    shutil.copyfile(gguf_file, own)
    r = _swap(srv.url, admin, {"model": str(own)})
    assert r.status_code == 200, r.text
    if os.access("/dev/shm", os.W_OK):  # and one on tmpfs, kept there to load fast
        fd, shm = tempfile.mkstemp(suffix=".gguf", dir="/dev/shm")
        try:
            os.close(fd)
            shutil.copyfile(gguf_file, shm)
            r = _swap(srv.url, admin, {"model": shm})
            assert r.status_code == 200, r.text
        finally:
            os.unlink(shm)


def test_an_admin_cannot_read_the_machine_key_through_the_swaps_error_messages(
    vendor, machine, gguf_file, tmp_path, serve_process, home
):
    """The swap opens files the admin names: each refusal is one line that quotes none of their bytes
    (the machine key's X25519 and Ed25519 keys, the clock record's tag, the host's /etc/shadow)."""
    moat, lic, _ = bundle(vendor, gguf_file, tmp_path / "out", machine)
    srv = serve_process(["--model", str(moat), "--license", str(lic)], env={"CODEMOAT_MODEL__N_CTX": "256"})
    admin = create_token("--name", "ops", "--scopes", "admin")
    secrets_ = [v for f in ("machine.key", "clock.json") for v in (home / f).read_text().split('"') if len(v) >= 16]
    assert secrets_
    try:  # the password hashes, where this test may read them (as root: as the server may)
        shadow = [
            x.split(":")[1] for x in open("/etc/shadow").read().splitlines() if x.count(":") > 2 and len(x.split(":")[1]) > 2
        ]
    except OSError:
        shadow = []
    targets = [str(home / "machine.key"), str(home / "clock.json"), "/etc/shadow", str(home / "codemoat.db")]
    for body in [*({"model": str(moat), "license": t} for t in targets), *({"model": t} for t in targets)]:
        r = _swap(srv.url, admin, body)
        assert r.status_code >= 400, (body, r.text)
        assert not any(s in r.text for s in secrets_ + shadow), (body, r.text)
        assert "\n" not in r.json()["error"], r.text  # one line
    r = httpx.get(f"{srv.url}/health", headers={"Authorization": f"Bearer {admin}"}, timeout=30).json()
    assert r["license"]["customer"] == "acme"  # still the sealed model


def test_the_admin_scope_opens_no_repository(tmp_path, random_gguf):
    """Scopes say which routes; groups say which code. An admin token (all scopes) of a user outside
    `payments` gets none of its code: not by completion, not by naming the repository in a chat, not
    with `admin` in every scope (alice, in the group, is the positive side)."""
    from fastapi.testclient import TestClient

    from codemoat.accounts import ALL_SCOPES, Accounts
    from codemoat.config import load_settings
    from codemoat.db import open_db
    from codemoat.engines.holder import ModelHolder
    from codemoat.engines.llamacpp import LlamaCppEngine
    from codemoat.retrieve import Retriever
    from codemoat.serve.app import create_app
    from conftest import run_cli

    root = tmp_path / "payments"
    (root / "billing").mkdir(parents=True)
    (root / "billing" / "money.py").write_text(
        'def cents_to_display(cents: int, currency: str = "EUR") -> str:\n    return f"{cents / 100:.2f} {currency}"\n'
    )
    assert run_cli("index", "add", str(root), "--name", "payments", "--groups", "payments").returncode == 0
    accounts = Accounts(open_db())
    accounts.add_user("alice", ["payments"])
    accounts.add_user("ops", ["web"])
    _, alice = accounts.create_token("alice-editor", user="alice")
    _, ops = accounts.create_token("ops-admin", user="ops", scopes=ALL_SCOPES)
    engine = LlamaCppEngine.from_path(random_gguf, model_id="tiny", n_ctx=512, n_threads=1)
    holder = ModelHolder("tiny")
    holder.set(engine)
    body = {
        "model": "tiny",
        "prompt": "from billing.money import cents_to_display\n\n\ndef total(cents):\n    return cents_to_display(",
        "max_tokens": 2,
        "temperature": 0,
        "codemoat": {"repo": "payments", "path": "report.py", "return_snippets": True},
    }
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "How is money shown in @payments?"}],
        "max_tokens": 2,
        "codemoat": {"repos": ["payments"], "return_snippets": True},
    }
    app = create_app(load_settings(), holder=holder, accounts=accounts, retriever=Retriever())
    with TestClient(app) as c:

        def post(path: str, token: str, json: dict):
            return c.post(path, json=json, headers={"Authorization": f"Bearer {token}"})

        r = post("/v1/completions", alice, body)
        assert r.status_code == 200 and any("cents_to_display" in s["text"] for s in r.json()["codemoat"]["snippets"])
        r = post("/v1/completions", ops, body)
        assert r.status_code == 200 and r.json()["codemoat"]["snippets"] == [], r.text
        r = post("/v1/chat/completions", ops, chat)
        assert r.status_code == 403 and "not readable" in r.json()["error"]["message"], r.text
        assert "cents_to_display" not in r.text
