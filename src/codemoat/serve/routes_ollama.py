"""Ollama-compatible routes: /api/tags, /api/show, /api/generate, /api/chat, /api/version (NDJSON streams)."""

from __future__ import annotations

import datetime as dt
import hashlib
import time

from fastapi import APIRouter, Depends, Request

from ..accounts import Principal
from ..protocol import ollama
from .auth import require
from .body import issue_completion_id, read_json, start_usage
from .service import FimInput, Prepared, Service, snippets_extra
from .streaming import ndjson

router = APIRouter()
OLLAMA_VERSION = "0.12.0"  # the Ollama API version whose shapes these routes follow


def _details(svc: Service) -> tuple[str, str, str]:
    eng = svc.holder.get()
    md = eng.metadata
    family = str(md.get("general.architecture", "llama"))
    ftype = str(md.get("general.file_type", ""))
    quant = {"0": "F32", "1": "F16", "7": "Q8_0", "2": "Q4_0", "15": "Q4_K_M", "32": "BF16"}.get(ftype, ftype or "unknown")
    n = md.get("general.parameter_count") or ""
    return family, quant, str(n)


@router.get("/api/version")
async def version():
    return {"version": OLLAMA_VERSION}


@router.get("/api/tags")
async def tags(request: Request, principal: Principal = Depends(require("complete"))):
    svc: Service = request.app.state.service
    start_usage(request, "ollama", svc.model_id)
    family, quant, params = _details(svc)
    size = svc.holder.status.size
    digest = hashlib.sha256(f"{svc.model_id}:{size}".encode()).hexdigest()
    modified = dt.datetime.fromtimestamp(svc.started, dt.UTC).isoformat().replace("+00:00", "Z")
    # one name everywhere (tags, show, answers); `name:latest` is accepted for it as Ollama clients send it
    return {"models": [ollama.model_entry(svc.model_id, size, digest, family, quant, params, modified)]}


@router.post("/api/show")
async def show(request: Request, principal: Principal = Depends(require("complete"))):
    svc: Service = request.app.state.service
    req = ollama.ShowRequest.model_validate(await read_json(request))
    svc.check_model(req.model or req.name)
    start_usage(request, "ollama", svc.model_id)
    eng = svc.holder.get()
    t = svc.templates(eng)
    family, quant, params = _details(svc)
    caps = ["completion"] + (["insert"] if t.fim else [])  # no FIM tokens: the suffix cannot be used
    return {
        "modelfile": f"FROM {svc.model_id}\n",
        "parameters": "",
        "template": t.fim.go_template() if t.fim else "{{ .Prompt }}",  # the template in use
        "details": ollama.details(family, quant, params),
        "model_info": {
            "general.architecture": family,
            f"{family}.context_length": eng.n_ctx,
            **{f"codemoat.{k}": v for k, v in t.facts().items()},
        },
        "capabilities": caps,
    }


def _params(svc: Service, o: ollama.Options, fim: bool = False):
    """The sampling parameters, and whether `max_tokens` is to fit the room the prompt leaves: Ollama's
    `num_predict: -1` (or more than the limit) generates until the limit or the context is full. Without
    `num_predict`, Ollama's default (-1) too, except for a FIM completion (`suffix`), which gets the
    server's small completion default. `num_predict: 0` is no limit as well, as in Ollama, whose runners
    stop a sequence at `num_predict` only when it is above 0 (and -2, once llama.cpp's "fill the context",
    is a negative like -1); it was taken as max_tokens 0, which answered one token."""
    n = o.num_predict if o.num_predict is not None or fim else -1
    if n == 0:
        n = -1
    return svc.predict_params(
        n, 0.8 if o.temperature is None else o.temperature, o.top_p or 0.9, o.stop or [], o.seed, o.top_k, o.repeat_penalty
    )


def _loaded(svc: Service, chat: bool) -> dict:
    """Ollama's answer to an empty prompt or message list: the model is loaded, nothing is generated."""
    svc.holder.get()  # 503 when it is not
    body = {"model": svc.model_id, "created_at": ollama.timestamp(), "done": True, "done_reason": "load"}
    return {**body, "message": {"role": "assistant", "content": ""}} if chat else {**body, "response": ""}


@router.post("/api/generate")
async def generate(request: Request):
    principal = await require("complete")(request)  # here, not as a dependency: the route is hot (serve.hotpath)
    svc: Service = request.app.state.service
    req = ollama.GenerateRequest.model_validate(await read_json(request))
    svc.check_model(req.model)
    start_usage(request, "ollama", svc.model_id)
    if not req.prompt and not req.suffix:  # how Ollama clients preload a model
        return _loaded(svc, chat=False)
    params, fit = _params(svc, req.options, fim=req.suffix is not None)
    ext = req.codemoat
    if req.suffix is not None:
        f = FimInput.from_ext(req.prompt, req.suffix, ext)
        prep = await svc.prepare(svc.fim_prompt, request, principal, f, params, fit=fit)
    elif req.raw:
        prep = await svc.prepare(svc.plain_prompt, request, req.prompt, params, fit=fit, truncate=True)
    else:
        msgs = ([{"role": "system", "content": req.system}] if req.system else []) + [{"role": "user", "content": req.prompt}]
        prep = await svc.prepare(svc.chat_prompt, request, principal, msgs, params, fit=fit)
    extra = snippets_extra(ext, prep)
    issue_completion_id(request, ext.path if ext else None)  # X-Codemoat-Completion-Id: what /v1/events names
    return await _answer(request, svc, prep, req.stream, ollama.generate_chunk, ollama.generate_final, extra)


async def _answer(request: Request, svc: Service, prep: Prepared, stream: bool, chunk, final, extra: dict | None):
    """One JSON answer, or an NDJSON stream of `chunk`s closed by `final` (generate and chat alike)."""
    t0 = time.perf_counter_ns()
    if not stream:
        c = await svc.run(request, prep)
        return final(
            svc.model_id,
            c.text,
            "length" if c.finish_reason == "length" else "stop",
            c.prompt_tokens,
            c.completion_tokens,
            time.perf_counter_ns() - t0,
            extra,
        )

    chunks = await svc.open_stream(request, prep)  # a refusal before the first token is a real 503, not a 200

    async def events():
        async for ch in chunks:
            if ch.text:
                yield chunk(svc.model_id, ch.text)
            if ch.finish_reason:
                u = request.state.usage
                yield final(
                    svc.model_id,
                    "",
                    "length" if ch.finish_reason == "length" else "stop",
                    u.prompt_tokens,
                    u.completion_tokens,
                    time.perf_counter_ns() - t0,
                    extra,
                )

    return ndjson(events())


@router.post("/api/chat")
async def chat(request: Request):
    principal = await require("chat")(request)  # here, not as a dependency: the route is hot (serve.hotpath)
    svc: Service = request.app.state.service
    req = ollama.ChatRequest.model_validate(await read_json(request))
    svc.check_model(req.model)
    start_usage(request, "ollama", svc.model_id)
    if not req.messages:  # how Ollama clients preload a model
        return _loaded(svc, chat=True)
    params, fit = _params(svc, req.options)
    msgs = [{"role": m.role, "content": m.content} for m in req.messages]
    prep = await svc.prepare(
        svc.chat_prompt, request, principal, msgs, params, req.codemoat.repos if req.codemoat else None, fit=fit
    )
    extra = snippets_extra(req.codemoat, prep)
    return await _answer(request, svc, prep, req.stream, ollama.chat_chunk, ollama.chat_final, extra)
