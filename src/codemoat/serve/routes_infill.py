"""llama.cpp server's POST /infill: prefix, suffix, and `input_extra` cross-file snippets."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..accounts import Principal
from ..engines.templates import FileSnippet
from ..protocol import infill
from .auth import require
from .body import read_json, start_usage
from .service import FimInput, Service, snippets_extra
from .streaming import sse

router = APIRouter()


@router.post("/infill")
async def infill_route(request: Request, principal: Principal = Depends(require("complete"))):
    request.state.protocol = "infill"
    svc: Service = request.app.state.service
    req = infill.InfillRequest.model_validate(await read_json(request))
    svc.check_model(req.model)
    start_usage(request, "infill", svc.model_id)
    params, fit = svc.predict_params(req.n_predict, req.temperature, req.top_p, req.stop, req.seed, req.top_k)
    ext = req.codemoat
    f = FimInput.from_ext(req.input_prefix + req.prompt, req.input_suffix, ext, [FileSnippet(e.filename, e.text) for e in req.input_extra if e.text])
    prep = await svc.prepare(svc.fim_prompt, request, principal, f, params, fit=fit)
    extra = snippets_extra(ext, prep)
    if not req.stream:
        c = await svc.run(request, prep)
        return infill.result(svc.model_id, c.text, True, c.prompt_tokens, c.completion_tokens,
                             "limit" if c.finish_reason == "length" else "eos", extra)

    async def events():
        async for ch in svc.stream(request, prep):
            if ch.finish_reason:
                u = request.state.usage
                yield infill.result(svc.model_id, ch.text, True, u["prompt_tokens"], u["completion_tokens"],
                                    "limit" if ch.finish_reason == "length" else "eos", extra)
            elif ch.text:
                yield {"content": ch.text, "stop": False}

    return sse(events(), done_marker=False)
