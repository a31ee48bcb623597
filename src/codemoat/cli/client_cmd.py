"""`codemoat complete` and `codemoat chat`: thin clients of a running server."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from .apps import app
from .common import JsonFlag, emit, fail

Url = Annotated[str, typer.Option(help="Server URL.", envvar="CODEMOAT_URL")]
Token = Annotated[str, typer.Option(help="API token.", envvar="CODEMOAT_TOKEN")]


def _client(url: str, token: str):
    import httpx

    if not token:
        fail("no API token: pass --token or set CODEMOAT_TOKEN (create one with `codemoat tokens create`)")
    if not (token.isascii() and token.isprintable()):  # an HTTP header cannot carry it ("UnicodeEncodeError: 'ascii' ...")
        fail("the API token holds a character no token has: pass it as `codemoat tokens create` printed it (cm_...)")
    try:
        return httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=120)
    except httpx.InvalidURL as e:  # not an HTTPError: it fell through to "error: InvalidURL: Invalid port: ':1'"
        fail(f"--url {url!r} is not a URL a client can use ({e}): e.g. http://127.0.0.1:8080")


def _check(r) -> dict:
    if r.status_code >= 400:
        try:
            err = r.json().get("error")
            msg = err.get("message") if isinstance(err, dict) else err
        except (json.JSONDecodeError, AttributeError):
            msg = r.text[:200]
        fail(f"server answered {r.status_code}: {msg}")
    return r.json()


@app.command()
def complete(
    *,
    prefix: Annotated[str, typer.Option(help="Code before the cursor.")],
    suffix: Annotated[str, typer.Option(help="Code after the cursor.")] = "",
    path: Annotated[str | None, typer.Option(help="File path (enables cross-file context for indexed repos).")] = None,
    repo: Annotated[str | None, typer.Option(help="Indexed repository the file belongs to.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 48,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.0,
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
        with _client(url, token) as c:
            data = _check(c.post("/v1/completions", json=body))
    except httpx.HTTPError as e:
        fail(f"cannot reach {url}: {e}")
    text = data["choices"][0]["text"]
    emit(data, as_json, lambda d: sys.stdout.write(text + ("\n" if not text.endswith("\n") else "")))


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
                answer = []
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code >= 400:
                        r.read()
                        _check(r)
                    for raw in r.iter_lines():
                        if not raw.startswith("data: ") or raw == "data: [DONE]":
                            continue
                        ev = json.loads(raw[6:])
                        if "error" in ev:
                            fail(ev["error"].get("message", "stream failed"))
                        for ch in ev.get("choices", []):
                            piece = ch.get("delta", {}).get("content") or ""
                            answer.append(piece)
                            sys.stdout.write(piece)
                            sys.stdout.flush()
                sys.stdout.write("\n")
                history.append({"role": "assistant", "content": "".join(answer)})
    except httpx.HTTPError as e:
        fail(f"cannot reach {url}: {e}")
