"""`codemoat complete` and `codemoat chat`: thin clients of a running server.

Every reply is checked before a word of it is used: a server (or a proxy in front of it) that answers 200 with an
HTML page, or JSON of another shape, is a one-line error and a non-zero exit, never an empty answer or a traceback.
Both commands give up on a server that sends nothing of an answer for `TIMEOUT_S`: httpx's timeout bounds each
read, so `chat` also counts the time since the last word (SSE keep-alive comments are not words) and both count the
time since a reply's first byte (a server dripping one byte a second is never silent to httpx).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from .apps import app
from .common import JsonFlag, emit, fail, terminal_text as shown

#: seconds a server may send nothing of its answer: httpx's per-read timeout for both commands, and for `chat` the
#: longest wait for the next word of a streamed answer (keep-alive comments in between do not count)
TIMEOUT_S = 120.0
#: the most of a reply kept in memory: a completion or chat answer is kilobytes, never this
MAX_REPLY = 16 << 20

Url = Annotated[str, typer.Option(help="Server URL.", envvar="CODEMOAT_URL")]
Token = Annotated[str, typer.Option(help="API token.", envvar="CODEMOAT_TOKEN")]


def _finite(value: float | None) -> float | None:
    """A float option's value, refused as a usage error when not finite: `--temperature nan` reached the request's
    JSON encoder and ended in "error: ValueError: Out of range float values are not JSON compliant"."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _base_url(url: str) -> str:
    """`url` without its trailing slash, or a one-line error when no HTTP request can go there: httpx takes
    `http://127.0.0.1:99999` (or port 0, or -1) and the connection then fails as "Connection refused"."""
    import httpx

    why = ""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:  # not an HTTPError: it fell through to "error: InvalidURL: ..."
        why = str(e)
    else:
        if u.scheme not in ("http", "https"):
            why = "it must start with http:// or https://"
        elif not u.host:
            why = "it names no host"
        elif u.port is not None and not 0 < u.port < 65536:
            why = f"port {u.port} is out of range 1-65535"
    if why:
        fail(f"--url {url!r} is not a URL a client can use ({why}): e.g. http://127.0.0.1:8080")
    return url.rstrip("/")


def _client(url: str, token: str):
    import httpx

    if not token:
        fail("no API token: pass --token or set CODEMOAT_TOKEN (create one with `codemoat tokens create`)")
    if not (token.isascii() and token.isprintable()):  # an HTTP header cannot carry it ("UnicodeEncodeError: 'ascii' ...")
        fail("the API token holds a character no token has: pass it as `codemoat tokens create` printed it (cm_...)")
    base = _base_url(url)
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT_S)


def _not_openai(what: str, why: str) -> None:
    fail(f"the server's reply is not an OpenAI {what} answer: {why}")


def _start(text: str) -> str:
    """The first characters of a reply, for an error line."""
    return repr(text[:60]) + ("..." if len(text) > 60 else "")


def _body(r, url: str) -> str:
    """The whole body of the streamed reply `r`, due within TIMEOUT_S of its first byte and at most MAX_REPLY."""
    since, parts, size = time.monotonic(), [], 0
    for chunk in r.iter_text():
        size += len(chunk)
        parts.append(chunk)
        if size > MAX_REPLY:
            fail(f"{url} sent a reply over {MAX_REPLY >> 20} MiB: no completion or chat answer is that long")
        if time.monotonic() - since > TIMEOUT_S:
            fail(f"{url} sent no complete reply in {TIMEOUT_S:g} s (it trickles)")
    return "".join(parts)


def _refused(r, url: str) -> None:
    """A 4xx/5xx reply as one line: the error's message when the body is OpenAI's error shape, else its text."""
    text = _body(r, url)
    try:
        err = json.loads(text).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError, RecursionError):
        msg = None
    fail(f"server answered {r.status_code}: {msg or text[:200]}")


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        _not_openai(what, f"not JSON ({_start(text)})")


def _completion(data: Any) -> str:
    """The text of a completion reply (`choices[0].text`), or a one-line error naming what is not as OpenAI's."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        _not_openai("completion", 'no "choices" list in it')
    if not isinstance(choices[0], dict) or not isinstance(choices[0].get("text"), str):
        _not_openai("completion", 'its first choice has no "text" string')
    return choices[0]["text"]


def _fail_on_error(ev: dict) -> None:
    """An in-band error event (`{"error": {"message": ...}}`, or a bare string) as one line."""
    err = ev["error"]
    msg = err.get("message") if isinstance(err, dict) else err
    fail(str(msg or "the server ended the answer with an error"))


def _delta(data: str) -> str:
    """The words in one `data:` event of a streamed chat answer (`choices[].delta.content`)."""
    ev = _json(data, "chat")
    if not isinstance(ev, dict):
        _not_openai("chat", f"an event is not a JSON object ({_start(data)})")
    if "error" in ev:
        _fail_on_error(ev)
    choices = ev.get("choices")
    if not isinstance(choices, list) or not all(isinstance(ch, dict) for ch in choices):
        _not_openai("chat", f'an event has no "choices" list ({_start(data)})')
    words = []
    for ch in choices:
        delta = ch.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if not isinstance(delta, dict) or not isinstance(content, str | None):
            _not_openai("chat", f'a choice has no "delta" with text content ({_start(data)})')
        words.append(content or "")
    return "".join(words)


def _message(text: str) -> str:
    """The words of a chat answer sent whole (`choices[0].message.content`), for a server that does not stream."""
    data = _json(text, "chat")
    if isinstance(data, dict) and "error" in data:
        _fail_on_error(data)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        _not_openai("chat", 'no "choices" list in it')
    msg = choices[0].get("message")
    content = msg.get("content") if isinstance(msg, dict) else None
    if not isinstance(msg, dict) or not isinstance(content, str | None):
        _not_openai("chat", 'its first choice has no "message" with text content')
    return content or ""


def _answer(r, url: str) -> str:
    """The chat answer in the reply `r`, its words written to stdout as they come: server-sent events up to
    `data: [DONE]` (or one JSON answer, for a server that does not stream). A stream without a word for TIMEOUT_S
    ends with a one-line error: keep-alive comments (`: ping`) alone held `chat` for good."""
    if r.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        words = _message(_body(r, url))
        sys.stdout.write(shown(words))
        return words
    answer: list[str] = []
    since, held, events, seen, cr = time.monotonic(), "", 0, "", ""
    for chunk in _then_end(r.iter_text()):
        if chunk is None:  # the reply ended: its last line may lack its newline (`data: [DONE]` included)
            lines, held = [held], ""
        else:
            seen = seen or chunk
            lines = (held + chunk).split("\n")  # a line split across reads is joined here
            held = lines.pop()
        if len(held) > MAX_REPLY:
            _not_openai("chat", f"a line of it is over {MAX_REPLY >> 20} MiB")
        for line in lines:
            line = line.rstrip("\r")
            if not line.startswith("data:"):  # comments (": ping"), other SSE fields, the blank line between events
                continue
            data = line[5:].removeprefix(" ")
            events += 1
            if data == "[DONE]":
                sys.stdout.write(shown(cr))
                return "".join(answer)
            words = _delta(data)
            if words:
                since = time.monotonic()
                answer.append(words)
                # a CRLF split across two events (a model that writes "\r" and "\n" as two tokens) is shown as a
                # newline, as one inside an event is: a "\r" at an event's end waits for the next
                words, cr = cr + words, ""
                if words.endswith("\r"):
                    words, cr = words[:-1], "\r"
                sys.stdout.write(shown(words))
                sys.stdout.flush()
        if time.monotonic() - since > TIMEOUT_S:
            fail(f"{url} sent no word of an answer in {TIMEOUT_S:g} s (only keep-alive comments or empty events)")
    if not events:
        _not_openai("chat", f"no `data:` events in it ({_start(seen)})")
    fail("the answer was cut off: the server ended its reply before `data: [DONE]`")


def _then_end(chunks: Iterator[str]) -> Iterator[str | None]:
    """`chunks`, then None for the reply's end."""
    yield from chunks
    yield None


def _unreachable(url: str, e: Exception) -> None:
    import httpx

    if isinstance(e, httpx.ReadTimeout):
        fail(f"{url} sent nothing for {TIMEOUT_S:g} s: the server is not answering")
    fail(f"cannot reach {url}: {e}")


@app.command()
def complete(
    *,
    prefix: Annotated[str, typer.Option(help="Code before the cursor.")],
    suffix: Annotated[str, typer.Option(help="Code after the cursor.")] = "",
    path: Annotated[str | None, typer.Option(help="File path (enables cross-file context for indexed repos).")] = None,
    repo: Annotated[str | None, typer.Option(help="Indexed repository the file belongs to.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 48,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).", callback=_finite)] = 0.0,
    url: Url = "http://127.0.0.1:8080",
    token: Token = "",
    as_json: JsonFlag = False,
) -> None:
    """Fill in the middle between --prefix and --suffix."""
    import httpx

    body = {"model": "", "prompt": prefix, "suffix": suffix, "max_tokens": max_tokens, "temperature": temperature}
    if path or repo:
        body["codemoat"] = {"path": path, "repo": repo, "return_snippets": True}
    try:
        with _client(url, token) as c, c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code >= 400:
                _refused(r, url)
            data = _json(_body(r, url), "completion")
    except httpx.HTTPError as e:
        _unreachable(url, e)
    text = _completion(data)
    emit(data, as_json, lambda d: sys.stdout.write(shown(text) + ("\n" if not text.endswith("\n") else "")))


@app.command()
def chat(
    message: Annotated[str | None, typer.Argument(help="Message to send; without it, read lines from stdin.")] = None,
    *,
    repo: Annotated[list[str] | None, typer.Option(help="Ground the answer in this indexed repository (repeatable).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 256,
    url: Url = "http://127.0.0.1:8080",
    token: Token = "",
) -> None:
    """Chat with the model; the answer streams as it is generated."""
    import httpx

    history: list[dict] = []
    lines = [message] if message else (l.rstrip("\n") for l in sys.stdin)
    try:
        with _client(url, token) as c:
            for line in lines:
                if not line.strip():
                    continue
                history.append({"role": "user", "content": line})
                body = {"model": "", "messages": history, "stream": True, "max_tokens": max_tokens}
                if repo:
                    body["codemoat"] = {"repos": repo}
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code >= 400:
                        _refused(r, url)
                    answer = _answer(r, url)
                sys.stdout.write("\n")
                sys.stdout.flush()
                history.append({"role": "assistant", "content": answer})
    except httpx.HTTPError as e:
        _unreachable(url, e)
