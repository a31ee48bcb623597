"""`codemoat complete` and `codemoat chat` against a server that answers, but not as an OpenAI server does.

A real HTTP server on 127.0.0.1 (tests/localhttp.py) plays the broken server; the CLI runs as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler

import pytest
from cli_errors import one_line_error
from conftest import run_cli
from localhttp import LocalHTTP

#: `codemoat` with `client_cmd.TIMEOUT_S` at 1 s, so a test waits a second, not two minutes, for a bound to trip
SHORT_BOUND = [
    sys.executable,
    "-c",
    "import codemoat.cli.client_cmd as c; c.TIMEOUT_S = 1.0\nfrom codemoat.cli.main import main; main()",
]


def _server(*parts: bytes | float, status: int = 200, content_type: str = "application/json") -> type:
    """A handler that answers every POST with `parts`: bytes are written (and flushed), a number is a pause in
    seconds; the body ends when the connection closes (HTTP/1.0), as a stream's does."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.end_headers()
            try:
                for p in parts:
                    if isinstance(p, bytes):
                        self.wfile.write(p)
                        self.wfile.flush()
                    else:
                        time.sleep(p)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up: what the test wants
                pass

    return Handler


def _sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def _words(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def _run(srv: LocalHTTP, *cmd: str, short: bool = False) -> subprocess.CompletedProcess:
    args = [*cmd, "--url", srv.url, "--token", "cm_x"]
    if short:
        return subprocess.run([*SHORT_BOUND, *args], capture_output=True, text=True, timeout=30)
    return run_cli(*args, timeout=30)


COMPLETE = ("complete", "--prefix", "x")
CHAT = ("chat", "hi")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>all good</html>", "not JSON ('<html>all good</html>')"),
        (b'{"choices":"nope"}', 'no "choices" list'),
        (b"[1, 2]", 'no "choices" list'),
        (b'{"choices":[{"message":{"content":"hi"}}]}', 'its first choice has no "text" string'),
        (b"[" * 100_000, "not JSON"),  # nested past the decoder's depth: RecursionError
    ],
    ids=["html", "choices-a-string", "a-list", "chat-shape", "deep"],
)
def test_complete_names_a_200_reply_that_is_not_an_openai_completion(body: bytes, why: str):
    """Was: `complete` on a 200 reply that is not JSON, or JSON of another shape, ended in "error: JSONDecodeError:
    ..." or "error: TypeError: string indices must be integers". Now one line names the reply; a well-formed
    completion is still printed."""
    with LocalHTTP(_server(body)) as srv:
        one_line_error(_run(srv, *COMPLETE), f"the server's reply is not an OpenAI completion answer: {why}")
    with LocalHTTP(_server(json.dumps({"choices": [{"index": 0, "text": "return 1"}]}).encode())) as srv:
        r = _run(srv, *COMPLETE)
    assert (r.returncode, r.stdout, r.stderr) == (0, "return 1\n", "")


@pytest.mark.parametrize(
    ("parts", "content_type", "why"),
    [
        ((b"hello there\n",), "text/plain", "not an OpenAI chat answer: no `data:` events in it"),
        ((b"<html>\n<p>sign in</p>\n</html>",), "text/html", "no `data:` events"),
        ((_sse("not json"),), "text/event-stream", "not an OpenAI chat answer: not JSON ('not json')"),
        ((_sse({"choices": "nope"}),), "text/event-stream", 'an event has no "choices" list'),
        ((_sse({"choices": [{"delta": "x"}]}),), "text/event-stream", 'a choice has no "delta" with text content'),
        ((_sse({"choices": [{"delta": {"content": 7}}]}),), "text/event-stream", 'no "delta" with text content'),
        ((_sse([1]),), "text/event-stream", "an event is not a JSON object"),
        ((b'{"choices":"nope"}',), "application/json", 'not an OpenAI chat answer: no "choices" list'),
        ((b"{oops",), "application/json", "not an OpenAI chat answer: not JSON"),
    ],
    ids=[
        "text",
        "html",
        "event-not-json",
        "choices-a-string",
        "delta-a-string",
        "content-a-number",
        "event-a-list",
        "json-wrong-shape",
        "json-broken",
    ],
)
def test_chat_names_a_200_reply_that_is_not_an_openai_chat_answer(parts, content_type, why):
    """Was: `chat` exited 0 after printing an empty line for a 200 reply that was not JSON or of the wrong shape
    (lines not starting with "data: " were skipped, and then nothing was left). Now one line names the reply, and
    exit 1."""
    with LocalHTTP(_server(*parts, content_type=content_type)) as srv:
        one_line_error(_run(srv, *CHAT), why)


def test_chat_prints_a_well_formed_answer_streamed_or_whole():
    """The negative case: a stream of words up to `data: [DONE]` (comments and a role-only event between them), and
    a server that does not stream but answers one chat.completion, both print the answer and exit 0."""
    stream = (
        b": ping\n\n"
        + _sse({"choices": [{"delta": {"role": "assistant"}}]}, _words("Hello"), _words(", you"))
        + b"event: x\r\ndata: "
        + json.dumps(_words("!")).encode()
        + b"\r\n\r\n"
        + _sse({"choices": []}, "[DONE]")
    )
    with LocalHTTP(_server(stream, content_type="text/event-stream")) as srv:
        r = _run(srv, *CHAT)
    assert (r.returncode, r.stdout, r.stderr) == (0, "Hello, you!\n", "")
    whole = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}}]}).encode()
    with LocalHTTP(_server(whole)) as srv:
        r = _run(srv, *CHAT)
    assert (r.returncode, r.stdout, r.stderr) == (0, "Hi.\n", "")


def test_chat_joins_an_event_split_across_reads_and_takes_a_last_line_without_its_newline():
    """Was (a reviewer, on the fix above): a read that ended inside a line (a long event, TLS records, a proxy
    re-chunking) crashed `chat` with `IndexError`, and a final `data: [DONE]` without its newline read as a
    stream cut off. Now lines are joined across reads and the reply's last line counts."""
    first, rest = b'data: {"choices":[{"delta":{"con', b'tent":"Hello"}}]}\n\n'
    with LocalHTTP(_server(first, 0.3, rest, 0.1, b"data: [DO", 0.2, b"NE]", content_type="text/event-stream")) as srv:
        r = _run(srv, *CHAT)
    assert (r.returncode, r.stdout, r.stderr) == (0, "Hello\n", ""), r.stderr


def test_chat_names_a_stream_cut_off_and_an_error_event():
    """Was: a stream that ended before `data: [DONE]` exited 0 as if the answer were whole, and an error event whose
    "error" was a string ended in "error: AttributeError: ...". Now: one line each, exit 1 (the words before a
    cut stay printed)."""
    with LocalHTTP(_server(_sse(_words("Hel")), content_type="text/event-stream")) as srv:
        r = _run(srv, *CHAT)
    one_line_error(r, "the answer was cut off")
    assert r.stdout == "Hel"
    with LocalHTTP(_server(_sse({"error": "model unloaded"}), content_type="text/event-stream")) as srv:
        one_line_error(_run(srv, *CHAT), "error: model unloaded")
    with LocalHTTP(_server(_sse({"error": {"message": "prompt too long"}}), content_type="text/event-stream")) as srv:
        one_line_error(_run(srv, *CHAT), "error: prompt too long")


def test_chat_gives_up_on_a_stream_of_keep_alive_comments():
    """Was: `chat` against a server sending only `: ping` comments never finished (each comment reset httpx's
    per-read timeout), while `complete` gives up on a silent server after its timeout. Now `chat` gives up once
    that timeout (`client_cmd.TIMEOUT_S`, 1 s here) passes with no word. The negative case: words that keep
    coming, with comments between them, over more than the bound in all, are an answer."""
    pings = [p for _ in range(100) for p in (b": ping\n\n", 0.1)]  # 10 s of comments, if nobody gives up
    with LocalHTTP(_server(*pings, content_type="text/event-stream")) as srv:
        t0 = time.monotonic()
        one_line_error(_run(srv, *CHAT, short=True), "sent no word of an answer in 1 s")
    assert time.monotonic() - t0 < 8
    # a word every ~0.5 s (half the bound: room for a loaded machine), 1.5 s in all
    slow = [b": ping\n\n", 0.25, _sse(_words("a")), 0.25, b": ping\n\n", 0.25, _sse(_words("b")), 0.25]
    slow += [b": ping\n\n", 0.25, _sse(_words("c")), 0.25, b": ping\n\n", 0.25, _sse(_words("d"), "[DONE]")]
    with LocalHTTP(_server(*slow, content_type="text/event-stream")) as srv:
        t0 = time.monotonic()
        r = _run(srv, *CHAT, short=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "abcd\n", "")
    assert time.monotonic() - t0 > 1.5  # more than the bound in all


@pytest.mark.parametrize("cmd", [COMPLETE, CHAT], ids=["complete", "chat"])
def test_a_silent_or_trickling_server_is_given_up_on(cmd):
    """`complete` gave up on a silent server only through httpx's per-read timeout ("cannot reach URL: timed out"),
    and a reply trickling a byte at a time held it for good. Now both commands say the server stopped answering
    after TIMEOUT_S (1 s here) of silence, and give up on a reply not whole TIMEOUT_S after its first byte."""
    with LocalHTTP(_server(5.0)) as srv:
        one_line_error(_run(srv, *cmd, short=True), "sent nothing for 1 s: the server is not answering")
    drip = [p for _ in range(100) for p in (b" ", 0.1)]
    with LocalHTTP(_server(*drip)) as srv:
        one_line_error(_run(srv, *cmd, short=True), "sent no complete reply in 1 s")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_complete_refuses_a_temperature_that_is_not_a_finite_number(value):
    """Was: `complete --temperature nan` (or inf) ended in "error: ValueError: Out of range float values are not
    JSON compliant" after connecting. Now it is a usage error naming the option (exit 2), before any connection; a
    finite temperature still reaches the server."""
    with LocalHTTP(_server(json.dumps({"choices": [{"text": "ok"}]}).encode())) as srv:
        one_line_error(_run(srv, *COMPLETE, "--temperature", value), "'--temperature'", code=2)
        assert _run(srv, *COMPLETE, "--temperature", "0.7").stdout == "ok\n"


@pytest.mark.parametrize("cmd", [COMPLETE, CHAT], ids=["complete", "chat"])
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:99999", "port 99999 is out of range 1-65535"),
        ("http://127.0.0.1:0", "port 0 is out of range"),
        ("http://127.0.0.1:-1", "port -1 is out of range"),
        ("ftp://127.0.0.1:21", "it must start with http:// or https://"),
        ("127.0.0.1:8080", "it must start with http://"),
    ],
)
def test_a_url_with_a_port_out_of_range_is_named_invalid(cmd, url, why):
    """Was: `--url http://127.0.0.1:99999` said "cannot reach ...: Connection refused", as if a server were down.
    Now the URL is named invalid, with why; a valid URL where nothing listens is still "cannot reach"."""
    one_line_error(run_cli(*cmd, "--url", url, "--token", "cm_x"), f"--url {url!r} is not a URL a client can use ({why}")
    from ports import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    one_line_error(run_cli(*cmd, "--url", closed, "--token", "cm_x"), f"cannot reach {closed}")


#: model text a committer can lead a model to repeat: OSC 52 (writes the terminal's clipboard), a screen clear and
#: a cursor home, a C1 CSI, DEL, a lone carriage return that hides what came before it, and a bidi override
HOSTILE = "ok\x1b]52;c;cm0gLXJmIH4=\x07 \x1b[2J\x1b[H\x9b31m\x7fA\rB \u202eevil\u202c"
#: the same text as printed: every one of them written as an escape, visible, acted on by no terminal
HOSTILE_SHOWN = "ok\\x1b]52;c;cm0gLXJmIH4=\\x07 \\x1b[2J\\x1b[H\\x9b31m\\x7fA\\x0dB \\u202eevil\\u202c"


def test_chat_and_complete_print_control_characters_in_model_text_as_escapes_not_as_sent():
    """Was: `chat` and `complete` wrote the model's text to the terminal as sent, escape sequences included, and
    a model writes what retrieved repository text leads it to. Now control characters and bidi overrides print as
    `\\xNN`/`\\uNNNN`; code's newlines, tabs and CJK text print as they are, a CRLF as a newline, and `complete
    --json` keeps the exact text."""
    stream = _sse(_words("def f():\r"), _words("\n\treturn 1 # 日本語\u3000\n"), _words(HOSTILE), "[DONE]")
    with LocalHTTP(_server(stream, content_type="text/event-stream")) as srv:
        r = _run(srv, *CHAT)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout == "def f():\n\treturn 1 # 日本語\u3000\n" + HOSTILE_SHOWN + "\n"
    whole = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": HOSTILE}}]}).encode()
    with LocalHTTP(_server(whole)) as srv:
        r = _run(srv, *CHAT)
    assert (r.returncode, r.stdout) == (0, HOSTILE_SHOWN + "\n")
    completion = json.dumps({"choices": [{"index": 0, "text": HOSTILE, "finish_reason": "stop"}]}).encode()
    with LocalHTTP(_server(completion)) as srv:
        r = _run(srv, *COMPLETE)
        assert (r.returncode, r.stdout) == (0, HOSTILE_SHOWN + "\n")
        r = _run(srv, *COMPLETE, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["choices"][0]["text"] == HOSTILE
