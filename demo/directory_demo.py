"""Demo step 65: the company directory decides who sees which code.

A throw-away OpenLDAP (tests/directory/slapd.py) holds alice in payments-devs. She signs in with
her directory password (`codemoat login`) and gets her own token; her completion draws on the
payments repository indexed in step 30. The directory drops her from payments-devs; `codemoat
directory sync` follows; her next completion gets nothing from payments.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "directory"))
from slapd import BASE, SERVICE, Slapd, slapd_bin  # noqa: E402

CODEMOAT = os.environ.get("CODEMOAT", "codemoat")
DEMO = Path(os.environ["DEMO"])
MODEL = sys.argv[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completion_snippets(url: str, token: str) -> list[str]:
    body = {
        "model": "codemoat-tiny",
        "prompt": "from payments.fees import interchange_fee\n\n\ndef charge(amount_minor):\n    fee = ",
        "max_tokens": 4,
        "temperature": 0,
        "codemoat": {"repo": "payments", "path": "payments/checkout.py", "return_snippets": True},
    }
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    r.raise_for_status()
    return [s.get("path", "?") for s in (r.json().get("codemoat") or {}).get("snippets", [])]


def main() -> None:
    exe = slapd_bin()
    try:
        import ldap3  # noqa: F401
    except ImportError:
        exe = None
    if exe is None:
        print("(skipped: this step needs Debian's slapd and the `directory` extra; `.ci/run` and `make` install them)")
        return
    ldap = Slapd(exe).start()
    server = None
    try:
        alice_dn = ldap.user("alice", "correct horse battery")
        ldap.group("payments-devs", [alice_dn])
        print(f"OpenLDAP on {ldap.url}: uid=alice is in cn=payments-devs (a throw-away directory for this demo)")
        pw = DEMO / "ldap-service-password"
        pw.write_text(ldap.service_pw + "\n")
        pw.chmod(0o600)
        cfg = DEMO / "codemoat-directory.toml"
        cfg.write_text(f"""[directory]
ldap_url = "{ldap.url}"
bind_dn = "{SERVICE}"
bind_password_file = "{pw}"
user_base = "ou=people,{BASE}"
group_base = "ou=groups,{BASE}"
sync_interval_s = 0

[directory.group_map]
"payments-devs" = "payments"
""")
        env = dict(os.environ, CODEMOAT_CONFIG=str(cfg))
        port = free_port()
        server = subprocess.Popen(
            [CODEMOAT, "serve", "--model", MODEL, "--model-id", "codemoat-tiny", "--port", str(port)],
            env=env,
            stdout=open(DEMO / "serve-65.log", "w"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        print("$ codemoat login --server", url, "--user alice          (password typed at the prompt)")
        r = subprocess.run(
            [CODEMOAT, "login", "--server", url, "--user", "alice", "--password-stdin", "--json"],
            input="correct horse battery\n",
            capture_output=True,
            text=True,
            env=env,
        )
        if r.returncode:
            raise SystemExit(r.stderr.strip())
        login = json.loads(r.stdout)
        days = (login["expires_at"] - time.time()) / 86400
        print(
            f"  signed in as {login['user']}: groups {', '.join(login['groups'])}; scopes {', '.join(login['scopes'])}; "
            f"token {login['token'][:7]}… expires in {days:.0f} days"
        )
        print(f"  her completion in payments/checkout.py draws on: {completion_snippets(url, login['token']) or 'nothing'}")

        ldap.modify(f"cn=payments-devs,ou=groups,{BASE}", {"member": [("MODIFY_REPLACE", [ldap.user("dave", "x")])]})
        print("the directory admin moves alice out of payments-devs; then:")
        r = subprocess.run([CODEMOAT, "directory", "sync"], capture_output=True, text=True, env=env)
        print("$ codemoat directory sync\n" + "\n".join("  " + line for line in r.stdout.strip().splitlines()))
        print(f"  her next completion draws on: {completion_snippets(url, login['token']) or 'nothing from payments'}")
        print("(`serve` also syncs by itself every directory.sync_interval_s, 5 minutes by default)")
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        ldap.stop()


if __name__ == "__main__":
    main()
