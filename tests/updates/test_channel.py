"""The optional online channel: off by default, loopback only here, one allowed host, every request on record."""

from __future__ import annotations

import json
import threading

import pytest

from updhelp import one_line_error, run_cli


def test_channel_is_off_by_default(home):
    assert "off by default" in one_line_error(run_cli("update", "fetch"))


def test_fetch_downloads_new_bundles_on_record_and_they_apply(shop, tmp_path, home):
    from codemoat.updates.channel import make_server

    lic = shop.license()
    pub = tmp_path / "published"
    pub.mkdir()
    shop.release("2").rename(pub / "acme-model-2.moatpkg")
    srv = make_server(pub, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    try:
        r = run_cli("update", "fetch", "--json", env={"CODEMOAT_UPDATE__CHANNEL_URL": url})
        assert r.returncode == 0, r.stderr
        [got] = json.loads(r.stdout)
        assert got["file"].endswith("updates/inbox/acme-model-2.moatpkg")
        again = run_cli("update", "fetch", "--json", "--channel", url)
        assert json.loads(again.stdout) == []  # nothing new
        log = [json.loads(line) for line in (home / "outbound.jsonl").read_text().splitlines()]
        assert {e["destination"] for e in log} == {url.rstrip("/") + "/index.json", url.rstrip("/") + "/acme-model-2.moatpkg"}
        assert all(e["body"] is None for e in log)  # nothing of the customer's goes out
        assert run_cli("update", "apply", got["file"], "--license", str(lic)).returncode == 0
    finally:
        srv.shutdown()
        srv.server_close()


def test_guard_allows_exactly_the_channel_host():
    from codemoat.updates.channel import guard_for

    g = guard_for("https://updates.vendor.example:8443/acme/")
    assert g.may_connect("updates.vendor.example", 8443)
    assert not g.may_connect("updates.vendor.example", 443)  # the port is part of it
    assert not g.may_connect("api.vendor.example", 8443)
    assert not g.may_connect("203.0.113.9", 8443)
    assert not g.may_resolve("example.com")


def test_damaged_download_and_hostile_index_are_refused(shop, tmp_path, home):
    from codemoat.updates.channel import make_server

    shop.license()
    pub = tmp_path / "published"
    pub.mkdir()
    b = shop.release("2")
    b.rename(pub / "acme.moatpkg")
    srv = make_server(pub, "127.0.0.1", 0)
    # the file changes between the index and the download: the size/digest check catches it
    import codemoat.updates.channel as ch

    real = ch.index
    ch_index = real(pub)
    (pub / "acme.moatpkg").write_bytes((pub / "acme.moatpkg").read_bytes()[:-1] + b"\0")
    ch.index = lambda folder, *_: ch_index  # the server passes its digest cache too
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        from codemoat.errors import CodemoatError
        import pytest

        with pytest.raises(CodemoatError, match="does not match its index entry"):
            ch.fetch(url, home / "updates" / "inbox")
        assert not list((home / "updates" / "inbox").glob("*.moatpkg"))
        ch.index = lambda folder, *_: [{"file": "../../etc/passwd.moatpkg", "size": 1, "sha256": "0" * 64}]
        with pytest.raises(CodemoatError, match="malformed entry"):
            ch.fetch(url, home / "updates" / "inbox")
    finally:
        ch.index = real
        srv.shutdown()
        srv.server_close()


def test_a_link_or_fifo_in_place_of_the_partial_download_is_refused(shop, tmp_path, home):
    """`update fetch` wrote inbox/.NAME.partial with a plain open(): a link planted there (the inbox is in
    codemoat's home, like the files of tests/vault/test_home_files.py) had the bundle written wherever it
    led, then renamed into the inbox; a FIFO hung the fetch. Now opened O_NOFOLLOW | O_NONBLOCK: one line."""
    import os

    import pytest

    from codemoat.errors import CodemoatError
    from codemoat.updates import channel as ch

    shop.license()
    pub = tmp_path / "published"
    pub.mkdir()
    shop.release("2").rename(pub / "acme.moatpkg")
    srv = ch.make_server(pub, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    inbox = home / "updates" / "inbox"
    inbox.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"")
    try:
        for kind in ("link", "fifo"):
            partial = inbox / ".acme.moatpkg.partial"
            partial.unlink(missing_ok=True)
            os.symlink(elsewhere, partial) if kind == "link" else os.mkfifo(partial)
            with pytest.raises(CodemoatError) as e:
                ch.fetch(f"http://127.0.0.1:{srv.server_address[1]}", inbox)
            assert str(partial) in str(e.value) and "\n" not in str(e.value), e.value
            assert elsewhere.read_bytes() == b"" and not (inbox / "acme.moatpkg").exists()
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("drip", ["index", "bundle"])
def test_a_channel_that_drips_its_answer_is_one_line_in_bounded_time(tmp_path, home, monkeypatch, drip):
    """httpx's timeout bounds each read, not the answer: a channel (or a proxy) sending its index, or a bundle,
    one byte every 0.05 s held `update fetch` (and the timer that runs it) for good. The index now has 6 times
    the timeout; a bundle that, plus its size at 64 KiB/s; then one line, and no partial file is left."""
    from codemoat.errors import CodemoatError
    from codemoat.updates import channel as ch
    from tarpit import Tarpit, bounded

    index = json.dumps([{"file": "acme.moatpkg", "size": 1000, "sha256": "0" * 64}]).encode()

    monkeypatch.setattr(ch, "TIMEOUT_S", 0.5, raising=False)  # (the code before had no such setting: 60 s a read)
    whole = {"/index.json": index} if drip == "bundle" else {}
    tarpit = Tarpit(length=1_000_000 if drip == "index" else 1000, whole=whole).start()
    inbox = home / "updates" / "inbox"
    try:
        e = bounded(lambda: ch.fetch(tarpit.url, inbox), f"update fetch still waits on the channel's {drip}")
        assert isinstance(e, CodemoatError) and "no complete answer in 3" in str(e) and "\n" not in str(e), e
        assert list(inbox.iterdir()) == []
    finally:
        tarpit.stop()


def test_an_index_nested_past_the_decoders_limit_is_a_named_refusal(tmp_path, home):
    """A channel (or a proxy on its path) answering the index with JSON nested deeper than the decoder goes raised
    RecursionError out of `update fetch` (the CLI's last-resort line, 'RecursionError: maximum recursion depth...'),
    not the channel's refusal."""
    from http.server import BaseHTTPRequestHandler

    from codemoat.errors import CodemoatError
    from codemoat.updates import channel as ch
    from localhttp import LocalHTTP

    body = b"[" * 100_000

    class Channel(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with LocalHTTP(Channel) as srv, pytest.raises(CodemoatError, match="update channel index") as e:
        ch.fetch(srv.url, home / "updates" / "inbox")
    assert "\n" not in str(e.value)


def test_a_bundle_re_released_under_its_name_at_its_size_is_fetched_again(shop, tmp_path, home):
    """The inbox's copy is skipped only when it is the bundle the index names: its size and its digest. Fails
    before: a bundle published again under the same name at the same size (rebuilt, fixed) was skipped for good
    on its size alone; the negative: an unchanged bundle is not fetched twice (the test above)."""
    from codemoat.updates.channel import make_server

    shop.license()
    pub = tmp_path / "published"
    pub.mkdir()
    bundle = pub / "acme-model-3.moatpkg"
    shop.release("3").rename(bundle)
    srv = make_server(pub, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    try:
        [got] = json.loads(run_cli("update", "fetch", "--json", "--channel", url).stdout)
        first = open(got["file"], "rb").read()
        data = bytearray(bundle.read_bytes())
        data[-1] ^= 1  # rebuilt: other bytes, the same size
        bundle.write_bytes(bytes(data))
        r = run_cli("update", "fetch", "--json", "--channel", url)
        assert r.returncode == 0, r.stderr
        assert [e["file"] for e in json.loads(r.stdout)] == [got["file"]]
        assert open(got["file"], "rb").read() == bytes(data) != first
    finally:
        srv.shutdown()
        srv.server_close()
