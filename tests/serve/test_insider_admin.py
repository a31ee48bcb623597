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
