"""A real OpenID provider (panva's oidc-provider under Node) and a real `codemoat serve` that trusts
it, started once for a test session; `walk` (idp_browser.py) drives the provider's pages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "clients" / "node"
CODEMOAT = [sys.executable, "-m", "codemoat.cli.main"]


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("not up: " + log.read_text())


@dataclass
class Stack:
    issuer: str
    url: str
    secret_file: Path
    home: Path
    procs: list = field(default_factory=list)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def start_stack(
    folder: Path, model: Path, users: dict, *, device: bool = True, extra_config: str = "", env: dict | None = None
) -> Stack:
    """oidc-provider with a "codemoat" client (both callbacks registered) and a serve using it (`env`: more
    of its environment, e.g. CODEMOAT_DATABASE_URL)."""
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.skip("node or oidc-provider is missing (make install runs npm ci --prefix tests/clients/node)")
    port, serve_port = free_port(), free_port()
    secret = "test-secret-" + os.urandom(4).hex()
    api_cb = f"http://127.0.0.1:{serve_port}/auth/oidc/callback"
    console_cb = f"http://127.0.0.1:{serve_port}/admin/oidc/callback"
    args = [str(port), "codemoat", secret, f"{api_cb},{console_cb}", json.dumps(users), "3600"]
    log = folder / "oidc.log"
    p = subprocess.Popen(
        ["node", "oidc_provider.mjs", *args, *([] if device else ["nodevice"])],
        cwd=NODE_DIR,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    issuer = f"http://127.0.0.1:{port}"
    home = folder / "home"
    home.mkdir()
    secret_file = folder / "oidc-secret"
    secret_file.write_text(secret)
    stack = Stack(issuer, f"http://127.0.0.1:{serve_port}", secret_file, home, [p])
    try:
        wait_up(issuer + "/.well-known/openid-configuration", p, log)
        cfg = folder / "codemoat.toml"
        cfg.write_text(f"""[directory]
oidc_issuer = "{issuer}"
oidc_client_id = "codemoat"
oidc_client_secret_file = "{secret_file}"
oidc_redirect_url = "{api_cb}"
oidc_display_name = "Test IdP"
admin_groups = ["admins"]
{extra_config}
[directory.group_map]
"payments-devs" = "payments"
"it-admins" = "admins"
""")
        slog = folder / "serve.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("CODEMOAT_")}
        s = subprocess.Popen(
            [*CODEMOAT, "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(serve_port)],
            env=dict(base, CODEMOAT_CONFIG=str(cfg), CODEMOAT_HOME=str(home), CODEMOAT_VAULT__TPM="off", **(env or {})),
            stdout=open(slog, "w"),
            stderr=subprocess.STDOUT,
        )
        stack.procs.append(s)
        wait_up(stack.url + "/livez", s, slog)
    except BaseException:
        stack.stop()
        raise
    return stack
