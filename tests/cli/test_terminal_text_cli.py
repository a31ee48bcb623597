"""What the CLI prints from outside text: a repository's files and file names (`index add`, `retrieve`), as a
hostile committer writes them. The model's answers (`complete`, `chat`) are in test_client_replies_cli.py.

rich, which prints them, drops BEL, BS, VT, FF and CR but passes ESC on, and reads `[...]` as markup where the text
is put into a markup string: a committed file could clear the admin's screen, rewrite what it showed, or write the
terminal's clipboard (OSC 52) when it was retrieved or listed as not read."""

from __future__ import annotations

import json
import os
from pathlib import Path

from codemoat.cli.common import terminal_text
from conftest import run_cli

ESCAPES = "\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\x1b[H\x9b1m\u202e"


def test_terminal_text_keeps_code_and_shows_controls():
    """The negative case beside the escapes: code, CJK text and an emoji sequence print as they are."""
    code = "def f():\n\treturn '日本語\u3000' + '👩\u200d💻'\n"
    assert terminal_text(code) == code
    assert terminal_text("a\r\nb") == "a\nb"
    assert terminal_text("a" + ESCAPES + "b\rc\x7f") == ("a\\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b[2J\\x1b[H\\x9b1m\\u202eb\\x0dc\\x7f")


def test_retrieve_and_index_add_show_a_committers_escapes_and_markup_as_text(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    body = f"def pay(amount):\n    # {ESCAPES} [bold red]paid[/bold red]\n    return amount * 2\n"
    (repo / "pay.py").write_text(body)
    (repo / "main.py").write_text("from pay import pay\n\ndef main():\n    return pay(3)\n")
    os.symlink("/etc/hostname", repo / "link\x1b[2J[red]x.py")  # never read: listed as "not read"
    r = run_cli("index", "add", str(repo), "--name", "r")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "link\\x1b[2J[red]x.py" in r.stdout, r.stdout
    r = run_cli("retrieve", "--repo", "r", "--path", "main.py", "--line", "4", "--groups", "admin")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x9b" not in r.stdout and "\u202e" not in r.stdout, r.stdout
    assert "\\x1b]52;c;cm0gLXJmIH4=\\x07" in r.stdout and "[bold red]paid[/bold red]" in r.stdout, r.stdout
    assert "return amount * 2" in r.stdout
    r = run_cli("retrieve", "--repo", "r", "--path", "main.py", "--line", "4", "--groups", "admin", "--json")
    assert any(ESCAPES in s["text"] for s in json.loads(r.stdout)), r.stdout  # --json: the exact text


def test_surrogates_and_separators_are_shown_not_written():
    """A reviewer: `\\udc9b` (JSON can carry one) went to a `surrogateescape` stdout as the raw byte 0x9B, an 8-bit CSI;
    the line separator and the direction marks passed too."""
    assert terminal_text("\udc9b31m\u2028\u200f") == "\\udc9b31m\\u2028\\u200f"


def test_an_error_a_server_words_is_shown_not_acted_on(tmp_path):
    """`error: ...` lines quote what a server answered: an escape sequence in a refusal's message reached the
    terminal (`print_error` escaped rich markup only)."""
    from http.server import BaseHTTPRequestHandler

    from localhttp import LocalHTTP

    class Refusing(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"error": {"message": "no \x1b]0;PWNED\x07 model"}}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with LocalHTTP(Refusing) as srv:
        r = run_cli("complete", "--prefix", "x", "--url", srv.url, "--token", "cm_x")
    assert r.returncode == 1 and "\x1b" not in r.stderr and "\x07" not in r.stderr, repr(r.stderr)
    assert "no \\x1b]0;PWNED\\x07 model" in r.stderr, repr(r.stderr)
