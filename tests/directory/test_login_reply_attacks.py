"""`codemoat login` against a server whose token answer is not whole, and with a login.json it cannot write.

A real HTTP server on 127.0.0.1 (tests/localhttp.py) plays the codemoat server and counts the sign-ins it was asked
for; the CLI runs as a developer runs it, the password piped."""

from __future__ import annotations

import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from devicestart import DEVICE_START
from localhttp import LocalHTTP

CODEMOAT = [sys.executable, "-m", "codemoat.cli.main"]
GOOD = {
    "token": "cm_fresh-token-value",
    "user": "alice",
    "token_id": "tok_1",
    "name": "login-alice-1",
    "groups": ["payments-devs"],
    "scopes": ["complete", "chat"],
    "expires_at": 1.9e9,
}
OLD = {"server": "http://127.0.0.1:1", "token": "cm_old-token", "user": "alice", "token_id": "tok_0"}


def _server(reply: bytes, asked: list[str], content_type: str = "application/json") -> type:
    """Answers every POST with 200 and `reply` (a device start gets a well-formed start); `asked` gets each path."""
    start = DEVICE_START

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            asked.append(self.path)
            body = json.dumps(start).encode() if self.path == "/auth/device/start" else reply
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _login(url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CODEMOAT, "login", "--server", url, *extra], input="pw\n", capture_output=True, text=True, timeout=60)


def _one_line(p: subprocess.CompletedProcess, needle: str) -> str:
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stderr
    return lines[0]


def _saved(home: Path, old: str) -> None:
    """login.json still holds `old`, and no temporary file of ours is left beside it."""
    assert (home / "login.json").read_text() == old
    assert not list(home.glob(".login-*"))


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ({"choices": "nope"}, 'has no "token"'),
        (GOOD | {"token": None}, 'has no "token"'),
        (GOOD | {"token": 42}, 'has a "token" that is not a token'),
        (GOOD | {"token": "cm_\x1b]52;c;cHduZWQ=\x07"}, 'has a "token" that is not a token'),
        (GOOD | {"token": "[bold]cm_x"}, 'has a "token" that is not a token'),
        (GOOD | {"user": "alice\x1b[2J"}, 'has a "user" that is not a printable name'),
        ({k: v for k, v in GOOD.items() if k != "groups"}, 'has no "groups" list'),
        (GOOD | {"scopes": "complete"}, 'has no "scopes" list'),
        (GOOD | {"expires_at": "soon"}, 'has an "expires_at" that is not a number'),
        ([GOOD], "is not a JSON object"),
        ("<html>signed in</html>", "is not JSON ('<html>signed in</html>')"),
    ],
    ids=[
        "no-token",
        "token-null",
        "token-a-number",
        "token-escape",
        "token-markup",
        "user-escape",
        "no-groups",
        "scopes-a-string",
        "expiry-a-string",
        "a-list",
        "html",
    ],
)
def test_a_sign_in_reply_without_a_whole_token_keeps_the_saved_login(home, reply, why):
    """Was: a 200 answer to the password sign-in without a token (`{"choices":"nope"}`) rewrote login.json with
    `"token": null, "user": null`, then failed with "error: KeyError: 'token'". Now the reply is checked whole first:
    one line naming what it lacks, login.json as it was. The negative case: a whole reply is kept and shown."""
    old = json.dumps(OLD)
    (home / "login.json").write_text(old)
    body = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
    asked: list[str] = []
    with LocalHTTP(_server(body, asked, "text/html" if isinstance(reply, str) else "application/json")) as srv:
        _one_line(_login(srv.url, "--user", "alice", "--password-stdin"), f"{srv.url} answered the sign-in, but its reply {why}")
        assert asked == ["/auth/login"]
        _saved(home, old)
    with LocalHTTP(_server(json.dumps(GOOD).encode(), asked)) as srv:
        r = _login(srv.url, "--user", "alice", "--password-stdin")
    assert r.returncode == 0, r.stderr
    assert "cm_fresh-token-value" in r.stdout and "signed in as alice (groups: payments-devs" in r.stdout
    assert json.loads((home / "login.json").read_text())["token"] == "cm_fresh-token-value"


def test_a_device_sign_in_reply_without_a_token_keeps_the_saved_login(home):
    """Was: the device flow's final answer was taken as it came (`r.json()`), so a 200 poll without a token was
    written to login.json the same way. Now it gets the same check as a password sign-in."""
    old = json.dumps(OLD)
    (home / "login.json").write_text(old)
    asked: list[str] = []
    with LocalHTTP(_server(b'{"choices":"nope"}', asked)) as srv:
        _one_line(_login(srv.url), 'answered the sign-in, but its reply has no "token"')
    assert asked == ["/auth/device/start", "/auth/device/poll"]
    _saved(home, old)


@pytest.mark.parametrize("how", [("--user", "alice", "--password-stdin"), ()], ids=["password", "device-code"])
def test_a_login_json_that_cannot_be_written_is_named_before_the_server_is_asked(home, how):
    """Was: with a folder at login.json, `login` failed with "IsADirectoryError ... .login-xxxx.tmp -> login.json"
    after the server had issued a token, which was then neither kept nor shown. Now the destination is checked
    first: one line naming the folder, and the server never asked. The negative case: once the folder is gone, the
    same sign-in is kept."""
    (home / "login.json").mkdir()
    (home / "login.json" / "notes").write_text("mine")
    asked: list[str] = []
    with LocalHTTP(_server(json.dumps(GOOD).encode(), asked)) as srv:
        _one_line(_login(srv.url, *how), f"{home / 'login.json'} is a folder: move it away")
        assert asked == []
        assert (home / "login.json" / "notes").read_text() == "mine"
        (home / "login.json" / "notes").unlink()
        (home / "login.json").rmdir()
        r = _login(srv.url, *how)
    assert r.returncode == 0, r.stderr
    assert json.loads((home / "login.json").read_text())["token"] == "cm_fresh-token-value"


def test_save_login_failing_late_is_one_line_and_leaves_nothing_behind(home):
    """Was: a folder appearing at login.json between the check and the save raised IsADirectoryError from the
    rename. Now `save_login` says which file it could not write (the CLI then shows the token, as it always does,
    so it is not lost); with a file there, it is replaced."""
    from codemoat.directory.login_client import login_path, save_login
    from codemoat.errors import CodemoatError

    assert login_path() == home / "login.json"
    (home / "login.json").mkdir()
    (home / "login.json" / "x").write_text("")
    with pytest.raises(CodemoatError, match=r"cannot keep the token in .*login\.json: ") as e:
        save_login("http://127.0.0.1:8080", GOOD)
    assert "\n" not in str(e.value) and not list(home.glob(".login-*"))
    with pytest.raises(CodemoatError, match="is a folder: move it away"):
        login_path()
    (home / "login.json" / "x").unlink()
    (home / "login.json").rmdir()
    assert json.loads(save_login("http://127.0.0.1:8080", GOOD).read_text())["token"] == GOOD["token"]


@pytest.mark.parametrize("port", ["99999", "65536", "0"])
def test_a_server_address_with_a_port_out_of_range_is_not_a_server_address(home, port):
    """Was: `login --server http://127.0.0.1:99999` passed the address check and failed to connect. Now it is named
    invalid at once; a valid port where nothing listens is still "cannot reach"."""
    _one_line(_login(f"http://127.0.0.1:{port}", "--user", "alice"), "is not a server address")
    from ports import free_port

    _one_line(_login(f"http://127.0.0.1:{free_port()}", "--user", "alice"), "cannot reach")


def _answering(status: int, body: dict) -> type:
    """Answers every POST with `status` and `body`, except a device start, which is well formed."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            start = {"device_code": "dc", "user_code": "AB", "verification_uri": "https://idp/d", "expires_in": 1}
            ok = self.path == "/auth/device/start" and status != 404
            data = json.dumps(start | {"interval": 1, "server": "x", "issuer": "https://idp"} if ok else body).encode()
            self.send_response(200 if ok else status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.mark.parametrize(
    ("named", "opened"),
    [("file:///etc/passwd", None), ("javascript:alert(1)", None), (["x"], None), ("https://idp/signin", "https://idp/signin")],
    ids=["file", "javascript", "a-list", "https"],
)
def test_a_server_without_a_device_flow_names_only_an_http_sign_in_page(named, opened):
    """Was: the `signin_url` a server without a device flow named was taken as sent, and `login --browser` hands it
    to the system's opener (a `file://` or `javascript:` address included). Now only http(s) is taken; else the
    server's own /auth/oidc/start."""
    from codemoat.directory.login_client import NoDeviceFlow, device_login

    body = {"error": "device_flow_unsupported", "error_description": "no device flow", "signin_url": named}
    with LocalHTTP(_answering(404, body)) as srv:
        with pytest.raises(NoDeviceFlow) as e:
            device_login(srv.url, show=lambda st: None)
    assert e.value.signin_url == (opened or srv.url + "/auth/oidc/start")


def test_a_server_answering_only_slow_down_is_given_up_on_at_the_codes_expiry():
    """Was: `slow_down` kept the poll going whatever the time, so a server that said only that held `login` for
    good. Now it ends at the code's expiry (1 s here), as `authorization_pending` does."""
    import time

    from codemoat.directory.login_client import device_login
    from codemoat.errors import CodemoatError

    polls = []

    def sleep(s: float) -> None:  # 0.05 s a poll, not 1 s + 5 s more each time; and never for good
        polls.append(s)
        assert len(polls) < 400, "still polling 20 s after a code that expired in 1 s"
        time.sleep(0.05)

    with LocalHTTP(_answering(400, {"error": "slow_down"})) as srv:
        with pytest.raises(CodemoatError, match=r"sign-in did not complete \(slow_down\)"):
            device_login(srv.url, show=lambda st: None, sleep=sleep)
    assert 1 < len(polls) < 400
