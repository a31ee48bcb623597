"""The vendor's listeners (`keyserver`, `vendor channel`): a port they cannot have is one line, before they say
where they listen; and what they say is where they listen."""

import json
import socket
import subprocess
from pathlib import Path

import httpx
from cli_errors import one_line_error
from conftest import CODEMOAT, run_cli
from waiting import stop_process, wait_for


def _vendor(tmp_path: Path) -> Path:
    r = run_cli("vendor", "init", "--vendor", str(tmp_path / "vendor"))
    assert r.returncode == 0, r.stderr
    return tmp_path / "vendor"


def test_a_port_past_65535_is_refused(tmp_path: Path):
    """Before, `keyserver --port 99999` said "key server on http://127.0.0.1:99999" and listened on 34463
    (the port modulo 65536); `vendor channel --port 99999` ended in bind()'s OverflowError."""
    vendor = _vendor(tmp_path)
    one_line_error(run_cli("keyserver", "--vendor", str(vendor), "--port", "99999"), "--port", 2)
    one_line_error(run_cli("keyserver", "--vendor", str(vendor), "--port", "-1"), "--port", 2)
    (tmp_path / "releases").mkdir()
    one_line_error(run_cli("vendor", "channel", "--dir", str(tmp_path / "releases"), "--port", "70000"), "--port", 2)


def test_the_key_server_on_a_taken_port_says_so_in_one_line(tmp_path: Path):
    vendor = _vendor(tmp_path)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = run_cli("keyserver", "--vendor", str(vendor), "--port", str(port))
    one_line_error(r, f"cannot listen on 127.0.0.1:{port}")
    assert "key server on" not in r.stdout  # it never claimed the port


def test_the_key_server_names_the_port_it_took(tmp_path: Path):
    """`--port 0` picks a free port, and the first line names it (it said ":0" before)."""
    vendor = _vendor(tmp_path)
    log = tmp_path / "keyserver.log"
    with open(log, "w") as out:
        p = subprocess.Popen(
            [*CODEMOAT, "keyserver", "--vendor", str(vendor), "--port", "0"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        assert wait_for(lambda: "key server on" in log.read_text() or p.poll() is not None, 120), log.read_text()
        line = log.read_text().splitlines()[0]
        assert line.startswith("key server on http://127.0.0.1:"), line
        url = line.split()[3]
        port = int(url.rsplit(":", 1)[1])
        assert port != 0
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    finally:
        stop_process(p)


def test_an_empty_address_is_refused_not_every_interface(tmp_path: Path):
    """`--host ""` (an unset shell variable) bound every interface: serve said "serving ... on http://:PORT" to the
    network. Now one line, for serve (flag and setting), the key server and the update channel; 0.0.0.0 still means all."""
    vendor = _vendor(tmp_path)
    (tmp_path / "releases").mkdir()
    for code, args in (
        (1, ("serve", "--host", "", "--port", "0")),  # the setting's check
        (2, ("keyserver", "--vendor", str(vendor), "--host", " ", "--port", "0")),  # usage errors
        (2, ("vendor", "channel", "--dir", str(tmp_path / "releases"), "--host", "", "--port", "0")),
    ):
        line = one_line_error(run_cli(*args), "an empty address listens on every interface", code)
        assert "0.0.0.0" in line
    one_line_error(run_cli("config", "show", env={"CODEMOAT_SERVER__HOST": ""}), "server.host: an empty address")
    r = run_cli("config", "show", "--json", env={"CODEMOAT_SERVER__HOST": "0.0.0.0"})
    assert r.returncode == 0, r.stderr
    assert {d["setting"]: d["value"] for d in json.loads(r.stdout)}["server.host"] == "0.0.0.0"
