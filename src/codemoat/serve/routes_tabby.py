"""Tabby-compatible routes: /v1/health, /v1/events, and the `segments` body of /v1/completions."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Depends, Request

from .. import __version__
from ..accounts import Principal
from ..engines.templates import FileSnippet
from ..protocol import tabby
from ..protocol.common import new_id
from .auth import any_token, require
from .body import read_json, start_usage
from .service import FimInput, Service
from .usage import event_type

router = APIRouter()


@router.get("/v1/health")
async def health(request: Request, principal: Principal = Depends(any_token)):
    """Tabby's agent reads a 401 here as "ask the user for a token" (a liveness probe needs none: GET /health)."""
    svc: Service = request.app.state.service
    return tabby.health(svc.model_id, svc.model_id, __version__, os.cpu_count() or 1)


@router.post("/v1/health")
async def health_post(request: Request, principal: Principal = Depends(any_token)):
    return await health(request, principal)


@router.post("/v1/events")
async def events(request: Request, principal: Principal = Depends(require("complete"))):
    request.state.protocol = "tabby"
    body = await read_json(request)
    kind = event_type(body.get("type"))  # one of a fixed set: a caller's text is never counted or stored
    counts = request.app.state.events
    counts[kind] = counts.get(kind, 0) + 1
    u = start_usage(request, "tabby", request.app.state.service.model_id)
    u.event, u.completion_id, u.choice_index = kind, body.get("completion_id"), body.get("choice_index")
    u.select_kind = request.query_params.get("select_kind") or body.get("select_kind")  # checked by codemoat.usage
    return {}


async def tabby_completion(request: Request, principal: Principal, body: Any):
    svc: Service = request.app.state.service
    req = tabby.CompletionRequest.model_validate(body)
    u = start_usage(request, "tabby", svc.model_id)
    seg = req.segments
    u.language, u.completion_id = req.language or seg.filepath, new_id("cmpl")
    extra = [FileSnippet(d.filepath, d.body) for d in (seg.declarations or []) if d.body]
    extra += [FileSnippet(s.filepath, s.body) for s in (seg.relevant_snippets_from_changed_files or []) if s.body]
    dbg = req.debug_options
    f = FimInput(
        seg.prefix,
        seg.suffix or "",
        path=seg.filepath,
        git_url=seg.git_url,
        extra=extra,
        retrieval=not (dbg and dbg.disable_retrieval_augmented_code_completion),
    )
    params = svc.params(None, 0.1 if req.temperature is None else req.temperature, None, [], req.seed)
    prep = await svc.prepare(svc.fim_prompt, request, principal, f, params)
    c = await svc.run(request, prep)
    debug = None
    if dbg and (dbg.return_snippets or dbg.return_prompt):
        debug = {}
        if dbg.return_snippets:
            debug["snippets"] = [{"filepath": s.path, "body": s.text, "score": float(s.score)} for s in prep.snippets]
        if dbg.return_prompt:
            debug["prompt"] = prep.prompt
        debug["suffix"] = "dropped" if prep.suffix_dropped else "used"  # dropped: the model has no FIM tokens
    return tabby.completion(u.completion_id, c.text, debug)
