"""Demo step 65: the company directory decides who sees which code.

A throw-away OpenLDAP (tests/directory/slapd.py) holds alice in payments-devs. She signs in with
her directory password (`codemoat login`) and gets her own token; her completion draws on the
payments repository indexed in step 30. The directory drops her from payments-devs; `codemoat
directory sync` follows; her next completion gets nothing from payments.

Then OpenID Connect, against a throw-away oidc-provider under Node (tests/clients/node): sam (in
the provider's it-admins group) signs in to the admin console with "Sign in with ...", lee (a
developer) is refused there, and lee runs `codemoat login` without a password: a device code,
approved on the provider's own pages (a scripted browser stands in for lee's), and his own token.
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
sys.path.insert(0, str(ROOT / "tests"))  # the shared test helpers slapd.py imports (ports)
sys.path.insert(0, str(ROOT / "tests" / "directory"))
from idp_browser import walk  # noqa: E402
from slapd import BASE, SERVICE, Slapd, slapd_bin  # noqa: E402

from codemoat.accounts.store import VERIFIED_TTL  # noqa: E402

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


NODE_DIR = ROOT / "tests" / "clients" / "node"
OIDC_USERS = {"sam": {"groups": ["it-admins"]}, "lee": {"groups": ["web-devs"]}}


def start_provider(serve_port: int):
    """oidc-provider with codemoat's client (both callbacks registered), or None where Node is missing."""
    import shutil

    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "oidc-provider").is_dir():
        return None, None, ""
    port = free_port()
    secret = os.urandom(16).hex()
    (DEMO / "oidc-client-secret").write_text(secret)
    (DEMO / "oidc-client-secret").chmod(0o600)
    cbs = f"http://127.0.0.1:{serve_port}/auth/oidc/callback,http://127.0.0.1:{serve_port}/admin/oidc/callback"
    proc = subprocess.Popen(
        ["node", "oidc_provider.mjs", str(port), "codemoat", secret, cbs, json.dumps(OIDC_USERS)],
        cwd=NODE_DIR,
        stdout=open(DEMO / "oidc-65.log", "w"),
        stderr=subprocess.STDOUT,
    )
    issuer = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(issuer + "/.well-known/openid-configuration", timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    cfg = f"""oidc_issuer = "{issuer}"
oidc_client_id = "codemoat"
oidc_client_secret_file = "{DEMO / "oidc-client-secret"}"
oidc_redirect_url = "http://127.0.0.1:{serve_port}/auth/oidc/callback"
oidc_display_name = "ACME sign-in"
admin_groups = ["codemoat-admins"]
"""
    return proc, issuer, cfg


def oidc_part(url: str, issuer: str, env: dict) -> None:
    print(f"\nOpenID Connect: an OpenID provider on {issuer} (oidc-provider) knows sam (it-admins) and lee (web-devs)")
    print(
        f"the console's sign-in page offers: {'Sign in with ACME sign-in' if 'signin-oidc' in httpx.get(url + '/admin/signin').text else '(nothing)'}"
    )
    with httpx.Client(timeout=30) as b:
        cb = walk(b, url + "/admin/oidc/start", url + "/admin/oidc/callback", user="sam")
        print("  sam: /admin/oidc/start -> the provider's login and consent pages -> /admin/oidc/callback")
        r = b.get(cb)
        overview = b.get(url + "/admin")
        print(
            f"  sam is in it-admins (mapped to codemoat-admins): {r.status_code}, session cookie "
            f"{'set' if b.cookies.get('codemoat_session') else 'NOT set'}; /admin shows "
            f"{'the Overview' if overview.status_code == 200 and 'Overview' in overview.text else overview.status_code}"
        )
        again = b.get(cb)
        print(f"  the same callback URL once more (a replay): {again.status_code}, {_said(again.text)}")
    with httpx.Client(timeout=30) as attacker, httpx.Client(timeout=30) as victim:
        cb = walk(attacker, url + "/admin/oidc/start", url + "/admin/oidc/callback", user="sam")
        r = victim.get(cb)
        print(f"  that callback URL opened in another browser (login CSRF): {r.status_code}, {_said(r.text)}")
    with httpx.Client(timeout=30) as b:
        r = b.get(walk(b, url + "/admin/oidc/start", url + "/admin/oidc/callback", user="lee"))
        print(f"  lee (web-devs, not an admin) tries the console: {r.status_code}, {_said(r.text)}")

    print(f"\n$ codemoat login --server {url}            (no password: a device code)")
    p = subprocess.Popen([CODEMOAT, "login", "--server", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    shown = "".join(p.stdout.readline() for _ in range(3))
    print("\n".join("  " + line for line in shown.strip().splitlines()))
    code = shown.split("enter the code ")[1].split(" ")[0]
    with httpx.Client(timeout=30) as b:
        walk(b, issuer + "/device", url, user="lee", user_code=code)
    print(f"  (lee opens {issuer}/device, types {code}, confirms, signs in as lee: a scripted browser here)")
    out, err = p.communicate(timeout=120)
    if p.returncode:
        raise SystemExit(err.strip())
    prev = ""
    for line in out.strip().splitlines():
        print("  " + (line[:7] + "…  (cut here; the CLI shows it whole, once)" if "your API token" in prev else line))
        prev = line


def _said(html: str) -> str:
    import re

    m = re.search(r'class="error"[^>]*>([^<]+)<', html)
    return m.group(1).strip() if m else "refused"


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
    server = provider = None
    try:
        alice_dn = ldap.user("alice", "correct horse battery")
        ldap.group("payments-devs", [alice_dn])
        print(f"OpenLDAP on {ldap.url}: uid=alice is in cn=payments-devs (a throw-away directory for this demo)")
        pw = DEMO / "ldap-service-password"
        pw.write_text(ldap.service_pw + "\n")
        pw.chmod(0o600)
        port = free_port()
        provider, issuer, oidc_cfg = start_provider(port)
        cfg = DEMO / "codemoat-directory.toml"
        cfg.write_text(f"""[directory]
{oidc_cfg}
ldap_url = "{ldap.url}"
bind_dn = "{SERVICE}"
bind_password_file = "{pw}"
user_base = "ou=people,{BASE}"
group_base = "ou=groups,{BASE}"
sync_interval_s = 0

[directory.group_map]
"payments-devs" = "payments"
"it-admins" = "codemoat-admins"
"web-devs" = "web"
""")
        env = dict(os.environ, CODEMOAT_CONFIG=str(cfg))
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
        print("$ codemoat directory sync\n" + "\n".join("  " + line for line in (r.stdout + r.stderr).strip().splitlines()))
        # the CLI is another process: the server learns of its write within the bound it trusts a verified token for
        # (the server's own sync, and the console, apply at once)
        time.sleep(VERIFIED_TTL + 0.1)
        print(f"  {VERIFIED_TTL:g} s later (a change written by another process reaches the server within that long):")
        print(f"  her next completion draws on: {completion_snippets(url, login['token']) or 'nothing from payments'}")
        print("(`serve` also syncs by itself every directory.sync_interval_s, 5 minutes by default)")
        if provider is None:
            print(
                "(OpenID Connect part skipped: it needs node and tests/clients/node's oidc-provider; `make install` runs npm ci)"
            )
        else:
            oidc_part(url, issuer, env)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        if provider is not None:
            provider.terminate()
            provider.wait(timeout=10)
        ldap.stop()


if __name__ == "__main__":
    main()
