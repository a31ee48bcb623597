"""`POST /admin/api/model/swap {"model": PATH}` with the paths a deployment really uses: a model folder
(safetensors, as the transformers and vLLM engines serve), a symbolic link to the current version
(`/models/current -> v2/...`), a path from the server account's home (`~/...`, as `model.path` takes
it). The swap's path rule (serve/admin.py `_file_on_disk`, which keeps an admin token from loading the
server's own descriptors) must not refuse them. Before, a folder was refused as 'not a model file on
disk', and so was a ~/ path. The negative side (descriptors by /proc and /dev/fd names) is
tests/serve/test_insider_admin.py; here a folder under /proc is refused too."""

from __future__ import annotations

import httpx
import pytest

from conftest import create_token

pytest.importorskip("torch")


def _swap(url: str, token: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/admin/api/model/swap", headers={"Authorization": f"Bearer {token}"}, json=body, timeout=300)


def test_a_model_folder_and_a_link_to_one_swap_in(tmp_path, serve_process):
    from codemoat.train.micro import build_micro_gguf

    first = build_micro_gguf(tmp_path / "v1", seed=0).with_suffix(".hf")
    second = build_micro_gguf(tmp_path / "v2", seed=1).with_suffix(".hf")
    srv = serve_process(
        ["--model", str(first)],
        env={
            "CODEMOAT_MODEL__ENGINE": "transformers",
            "CODEMOAT_MODEL__N_CTX": "128",
            "CODEMOAT_MODEL__N_THREADS": "1",
            "HOME": str(tmp_path),  # the server account's home, for a path given as ~/...
        },
    )
    admin = create_token("--name", "ops", "--scopes", "admin")
    r = _swap(srv.url, admin, {"model": str(second)})  # a folder
    assert r.status_code == 200, r.text
    current = tmp_path / "current"
    current.symlink_to(first)  # /models/current -> the version to serve
    r = _swap(srv.url, admin, {"model": str(current)})
    assert r.status_code == 200, r.text
    r = _swap(srv.url, admin, {"model": f"~/v2/{second.name}"})  # as model.path takes it
    assert r.status_code == 200, r.text
    r = _swap(srv.url, admin, {"model": "/proc/self/cwd"})  # a folder, but the server's own, by /proc
    assert r.status_code == 400 and "not a model" in r.text, r.text
