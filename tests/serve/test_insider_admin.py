"""The customer's admin as an insider: a token with the `admin` scope (no shell as the service account).

What such a token must not give: the licensed model served without its licence's watermark, or the
plaintext weights. `POST /admin/api/model/swap {"model": PATH}` loads a model file named by the caller;
a sealed model's plaintext lives in a memfd the server holds (`/proc/self/fd/N`, `/dev/fd/N`): named as a
"plain GGUF", the server (model.isolation = inline) loaded the decrypted weights without the watermark
key, and the licence's watermark was gone from every completion (before the fix).
"""

from __future__ import annotations

import shutil

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
