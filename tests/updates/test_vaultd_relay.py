"""Under `serve --vault`, `update apply` runs in vaultd's home, as vaultd's account, and cannot reach the
serve's socket: vaultd listens like a serve and passes the new adapter version on to the serves connected
to it, which swap it in (fetching it from vaultd) without the admin route."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.tune.loras import forcing_lora_gguf
from updhelp import DOG, FOX, Vaultd, adapter_text, run_cli


@pytest.mark.slow
def test_update_apply_in_vaultds_home_reaches_serve_vault_through_vaultd(shop, store, serve_process, gguf_file, tmp_path):
    lic = shop.license()
    lora = tmp_path / "fee.gguf"
    lora.write_bytes(forcing_lora_gguf(gguf_file, "Ġfox"))
    store.apply(shop.release("1", kind="adapter", source=lora), lic)

    with Vaultd(tmp_path / "v.sock", shop.moat, lic) as vaultd:
        serve_home = tmp_path / "serve-home"  # serve's own home: `update apply` in vaultd's cannot see its socket
        env = {"CODEMOAT_HOME": str(serve_home), "CODEMOAT_MODEL__ADAPTERS": '["update:fee"]'}
        r = run_cli("tokens", "create", "--json", "--name", "dev", env=env)
        user = json.loads(r.stdout)["token"]
        srv = serve_process(["--vault", f"unix:{vaultd.sock}", "--model", "tiny"], env=env)
        assert adapter_text(srv.url, user) == FOX

        lora.write_bytes(forcing_lora_gguf(gguf_file, "Ġdog"))
        vault_env = {"CODEMOAT_MODEL__PATH": str(shop.moat)}  # vaultd's home's model: what the adapter is for
        r = run_cli("update", "apply", str(shop.release("2", kind="adapter", source=lora)), "--json", env=vault_env, timeout=300)
        assert r.returncode == 0, r.stderr
        (a,) = json.loads(r.stdout)["served"]  # vaultd's answer: it told the one serve connected to it
        assert a["ok"] and a["relayed"] == 1 and a["pid"] == vaultd.proc.pid, a
        # adapters are installed pending (until a check passes them); the serves that check this one are
        # vaultd's, whose outcome does not come back to this home: vaultd confirms what it passed on, or
        # `update list` named it pending for good (a reviewer, session 25)
        cur = store.current("adapter:fee")
        assert cur["version"] == "2" and not cur.get("pending"), cur
        assert "yes, pending" not in run_cli("update", "list", env=vault_env).stdout  # the current one
        deadline = time.time() + 180
        while (text := adapter_text(srv.url, user)) != DOG and time.time() < deadline:
            time.sleep(0.5)
        assert text == DOG, srv.output()[-2000:]
        r = run_cli("audit", "export", "--kind", "update", env=env)
        recs = [json.loads(x) for x in r.stdout.splitlines()]
        assert any(x["route"] == "update swapped" and (x["detail"] or {}).get("via") == "vaultd" for x in recs), recs

    assert not list((Path(os.environ["CODEMOAT_HOME"]) / "run").glob("vaultd-*.sock"))  # vaultd removed its socket
