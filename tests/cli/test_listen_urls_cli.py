"""Where a listener says it listens is a URL: an IPv6 literal in brackets (`config.serving.http_url`, used by the
key server's, the update channel's and serve's first line). Before, `keyserver --host ::1` said
"key server on http://::1:PORT" (no URL: a client reads host ':' and port ':1:PORT'), and `vendor channel --host ::1`
ended in "gaierror: Address family for hostname not supported" (its server bound IPv4 only)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from cli_errors import one_line_error
from conftest import CODEMOAT, run_cli
from waiting import stop_process, wait_for

from codemoat.config.serving import http_url, netloc


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HOSTS = [
    "127.0.0.1",
    pytest.param("::1", marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here (::1 cannot be bound)")),
]


def test_http_url_brackets_ipv6_literals_only():
    assert http_url("::1", 8080) == "http://[::1]:8080"
    assert http_url("::", 1) == "http://[::]:1"
    assert http_url("fe80::1%eth0", 80) == "http://[fe80::1%eth0]:80"
    assert http_url("[::1]", 8080) == "http://[::1]:8080"  # already bracketed: not twice
    assert http_url("127.0.0.1", 8080) == "http://127.0.0.1:8080"
    assert http_url("0.0.0.0", 0) == "http://0.0.0.0:0"
    assert http_url("localhost", 8470) == "http://localhost:8470"
    assert netloc("::1", 443) == "[::1]:443" and netloc("example.com", 443) == "example.com:443"


def test_the_update_channels_egress_rule_is_its_netloc():
    """`update fetch` allows exactly the channel's host and port (guard_for, through `netloc`): an IPv6 one too."""
    from codemoat.updates.channel import guard_for

    for url, allowed, others in (
        ("https://[2001:db8::1]/x", ("2001:db8::1", 443), (("2001:db8::1", 8443), ("2001:db8::2", 443))),
        ("http://[2001:db8::1]:8470/", ("2001:db8::1", 8470), (("2001:db8::1", 80), ("10.0.0.5", 8470))),
        ("http://10.0.0.5:8470/", ("10.0.0.5", 8470), (("10.0.0.5", 80), ("10.0.0.6", 8470))),
    ):
        g = guard_for(url)
        assert g.may_connect(*allowed), url
        assert not any(g.may_connect(*o) for o in others), url


def _first_line(args: list[str], log: Path, starts: str) -> tuple[subprocess.Popen, str]:
    """Start the CLI with `args`, stdout to `log`, and wait (generously: a loaded CI) for its line starting `starts`."""
    with open(log, "w") as out:
        p = subprocess.Popen([*CODEMOAT, *args], stdout=out, stderr=subprocess.STDOUT)

    def said() -> str | None:
        return next((ln for ln in log.read_text().splitlines() if ln.startswith(starts)), None)

    assert wait_for(lambda: said() is not None or p.poll() is not None, 180), log.read_text()
    line = said()
    if line is None:
        stop_process(p)
        pytest.fail(f"exited {p.returncode} before saying {starts!r}:\n{log.read_text()}")
    return p, line


def _url(line: str, host: str) -> str:
    """The URL in `line`, checked to be `host`'s, with the port the listener took (not 0)."""
    url = next(w for w in line.split() if w.startswith("http://")).rstrip("/")
    want = "http://[::1]:" if host == "::1" else f"http://{host}:"
    assert url.startswith(want), line
    assert int(url.rsplit(":", 1)[1]) > 0, line
    return url


@pytest.mark.parametrize("host", HOSTS)
def test_the_key_server_says_a_url_for_its_address(tmp_path: Path, host: str):
    assert run_cli("vendor", "init", "--vendor", str(tmp_path / "vendor")).returncode == 0
    p, line = _first_line(
        ["keyserver", "--vendor", str(tmp_path / "vendor"), "--host", host, "--port", "0"], tmp_path / "ks.log", "key server on "
    )
    try:
        url = _url(line, host)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # the URL said is where it answers
    finally:
        stop_process(p)


@pytest.mark.parametrize("host", HOSTS)
def test_the_update_channel_listens_on_ipv6_and_says_a_url(tmp_path: Path, host: str):
    (tmp_path / "releases").mkdir()
    args = ["vendor", "channel", "--dir", str(tmp_path / "releases"), "--host", host, "--port", "0"]
    p, line = _first_line(args, tmp_path / "channel.log", "update channel on ")
    try:
        r = httpx.get(f"{_url(line, host)}/index.json", timeout=30)
        assert r.status_code == 200 and r.json() == []
    finally:
        stop_process(p)


def test_the_update_channel_on_a_taken_port_or_no_address_is_one_line(tmp_path: Path):
    """Before: "error: OSError: [Errno 98] ..." and "error: gaierror: ...", the CLI's last-resort lines."""
    (tmp_path / "releases").mkdir()
    base = ["vendor", "channel", "--dir", str(tmp_path / "releases")]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        one_line_error(run_cli(*base, "--port", str(port)), f"cannot listen on 127.0.0.1:{port}: Address already in use")
    one_line_error(run_cli(*base, "--host", "192.0.2.1", "--port", "0"), "cannot listen on 192.0.2.1:0: ")  # TEST-NET-1


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here (::1 cannot be bound)")
def test_a_taken_ipv6_port_is_named_as_a_url_names_it(tmp_path: Path):
    """'cannot listen on ::1:PORT' read as host ':' and port ':1:PORT', as the first lines did before they
    bracketed IPv6 (`netloc`): the refusals of serve's and the key server's socket (`serve.run.listen`) and
    of the update channel name '[::1]:PORT'. The negative: an IPv4 address is named as before."""
    from codemoat.errors import CodemoatError
    from codemoat.serve.run import listen

    (tmp_path / "releases").mkdir()
    with socket.socket(socket.AF_INET6) as held:
        held.bind(("::1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(CodemoatError, match=rf"^cannot listen on \[::1\]:{port}: Address already in use$"):
            listen("::1", port)
        r = run_cli("vendor", "channel", "--dir", str(tmp_path / "releases"), "--host", "::1", "--port", str(port))
        one_line_error(r, f"cannot listen on [::1]:{port}: Address already in use")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(CodemoatError, match=rf"^cannot listen on 127\.0\.0\.1:{port}: Address already in use$"):
            listen("127.0.0.1", port)


@pytest.mark.slow  # loads the bundled model
@pytest.mark.parametrize("host", HOSTS)
def test_serve_says_a_url_for_its_address(tmp_path: Path, host: str):
    p, line = _first_line(["serve", "--host", host, "--port", "0"], tmp_path / "serve.log", "codemoat serving ")
    try:
        assert httpx.get(f"{_url(line, host)}/health", timeout=30).status_code == 200
    finally:
        stop_process(p)
