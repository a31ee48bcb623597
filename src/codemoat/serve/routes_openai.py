"""OpenAI-compatible routes: /v1/models, /v1/completions (Tabby's body is told apart here), /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from ..accounts import Principal
from ..errors import CodemoatError
from ..protocol import openai
from ..protocol.common import as_stop_list, new_id
from .auth import require
from .body import issue_completion_id, read_json, start_usage
from .errors import completions_protocol
from .service import FimInput, Service, snippets_extra
from .streaming import json_text, sse

router = APIRouter()
_UNPARSED = object()  # a body that did not parse as JSON (`completions`)


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


@router.get("/v1/models")
async def models(request: Request, principal: Principal = Depends(require("complete"))):
    svc: Service = request.app.state.service
    request.state.protocol = "openai"
    start_usage(request, "openai", svc.model_id)
    return openai.model_list([svc.model_id], int(svc.started))


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request, principal: Principal = Depends(require("complete"))):
    """The SDKs' `models.retrieve`: the served model's card, or OpenAI's 404 for any other name."""
    svc: Service = request.app.state.service
    request.state.protocol = "openai"
    start_usage(request, "openai", svc.model_id)
    svc.check_model(model_id)
    return openai.model_card(svc.model_id, int(svc.started))


@router.post("/v1/completions")
async def completions(request: Request):
    # The body tells Tabby's requests from OpenAI's (and so the error shape), but the token is checked
    # before the body is parsed: a caller without one costs no parse (8 MiB of tiny JSON values take about
    # a second) and learns nothing else. Its 401 takes Tabby's shape when the raw body names "segments".
    raw = await request.body()
    request.state.protocol = completions_protocol(raw)
    principal = await require("complete")(request)
    try:
        body, bad = await read_json(request), None
    except CodemoatError as e:
        body, bad = getattr(e, "body", _UNPARSED), e  # a body that parsed but is refused still names its protocol
    if body is not _UNPARSED:  # one that did not parse keeps what its bytes name, as its 401 would
        request.state.protocol = completions_protocol(raw, body, parsed=True)
    if bad is not None:
        raise bad
    if request.state.protocol == "tabby":
        from .routes_tabby import tabby_completion

        return await tabby_completion(request, principal, body)
    return await openai_completion(request, principal, body)


async def openai_completion(request: Request, principal: Principal, body: Any):
    svc: Service = request.app.state.service
    req = openai.CompletionRequest.model_validate(body)
    svc.check_model(req.model)
    start_usage(request, "openai", svc.model_id)
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise CodemoatError("prompt must be a string or a list of exactly one string")
        prompt = prompt[0]
    params = svc.params(req.max_tokens, req.temperature, req.top_p, as_stop_list(req.stop), req.seed)
    ext = req.codemoat
    if req.suffix is not None or (ext and ext.path):
        f = FimInput.from_ext(prompt, req.suffix or "", ext)
        prep = await svc.prepare(svc.fim_prompt, request, principal, f, params)
    else:
        prep = await svc.prepare(svc.plain_prompt, request, prompt, params)
    extra = snippets_extra(ext, prep)
    cid = issue_completion_id(request, ext.path if ext else None)
    if not req.stream:
        c = await svc.run(request, prep)
        return openai.completion(
            cid,
            svc.model_id,
            c.text,
            _finish(c.finish_reason),
            openai.usage(c.prompt_tokens, c.completion_tokens, request.state.usage.cached_tokens),
            extra,
        )

    chunks = await svc.open_stream(request, prep)  # a refusal before the first token is a real 503, not a 200
    encoded = openai.CompletionChunks(cid, svc.model_id, json_text)  # every event but the last

    async def events():
        async for ch in chunks:
            if ch.finish_reason:
                yield openai.completion(cid, svc.model_id, ch.text, _finish(ch.finish_reason), None, extra)
            elif ch.text:
                yield encoded(ch.text)

    return sse(events())


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    request.state.protocol = "openai"
    principal = await require("chat")(request)  # before the body, as OpenAI does: 401 first
    body = await read_json(request)
    svc: Service = request.app.state.service
    req = openai.ChatRequest.model_validate(body)
    svc.check_model(req.model)
    start_usage(request, "openai", svc.model_id)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    stop = as_stop_list(req.stop)
    if max_tokens is None:  # as OpenAI does: until the stop token, or the context is full (at most the server's limit)
        params, fit = svc.predict_params(-1, req.temperature, req.top_p, stop, req.seed)
    else:
        params, fit = svc.params(max_tokens, req.temperature, req.top_p, stop, req.seed), False
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    prep = await svc.prepare(
        svc.chat_prompt, request, principal, messages, params, req.codemoat.repos if req.codemoat else None, fit=fit
    )
    ext = req.codemoat
    extra = snippets_extra(ext, prep)
    cid = new_id("chatcmpl")
    if not req.stream:
        c = await svc.run(request, prep)
        return openai.chat(
            cid,
            svc.model_id,
            c.text,
            _finish(c.finish_reason) or "stop",
            openai.usage(c.prompt_tokens, c.completion_tokens, request.state.usage.cached_tokens),
            extra,
        )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunks = await svc.open_stream(request, prep)
    encoded = openai.CompletionChunks(cid, svc.model_id, json_text, chat=True)  # the content deltas

    async def events():
        yield openai.chat_chunk(cid, svc.model_id, {"role": "assistant", "content": ""}, None)
        async for ch in chunks:
            if ch.text:
                yield encoded(ch.text)
            if ch.finish_reason:
                yield openai.chat_chunk(cid, svc.model_id, {}, _finish(ch.finish_reason))
        if include_usage:
            u = request.state.usage
            yield openai.chat_chunk(
                cid, svc.model_id, {}, None, openai.usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens), choices=False
            )

    return sse(events())
