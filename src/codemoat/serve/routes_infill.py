"""llama.cpp server's POST /infill: prefix, suffix, and `input_extra` cross-file snippets."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..engines.templates import FileSnippet
from ..engines.base import RANDOM_SEED
from ..protocol import infill
from .auth import require
from .body import issue_completion_id, read_json, start_usage
from .service import FimInput, Service, snippets_extra
from .streaming import sse

router = APIRouter()


@router.post("/infill")
async def infill_route(request: Request):
    principal = await require("complete")(request)  # here, not as a dependency: the route is hot (serve.hotpath)
    request.state.protocol = "infill"
    svc: Service = request.app.state.service
    req = infill.InfillRequest.model_validate(await read_json(request))
    svc.check_model(req.model)
    start_usage(request, "infill", svc.model_id)
    # `n_predict: 0` warms the cache (llama.vscode sends it ahead of the user's next stop): the prompt
    # is evaluated, and the llama.cpp engine keeps it for the request that follows; nothing is sent back
    warmup = req.n_predict == 0
    # llama.cpp's server reads 4294967295 (LLAMA_DEFAULT_SEED) as -1 does: a random seed, not a seed of its own
    seed = None if req.seed == RANDOM_SEED else req.seed
    params, fit = svc.predict_params(1 if warmup else req.n_predict, req.temperature, req.top_p, req.stop, seed, req.top_k)
    params.time_limit_ms = req.t_max_predict_ms or None
    params.n_indent = req.n_indent
    ext = req.codemoat
    f = FimInput.from_ext(
        req.input_prefix + req.prompt, req.input_suffix, ext, [FileSnippet(e.filename, e.text) for e in req.input_extra if e.text]
    )
    prep = await svc.prepare(svc.fim_prompt, request, principal, f, params, fit=fit)
    extra = snippets_extra(ext, prep)
    if not warmup:
        issue_completion_id(request, ext.path if ext else None)  # X-Codemoat-Completion-Id: what /v1/events names

    def answer(content: str, reason: str | None) -> dict:
        u = request.state.usage
        predicted = 0 if warmup else u.completion_tokens
        t = u.timings
        settings = infill.generation_settings(
            svc.model_id,
            prep.engine.n_ctx,
            0 if warmup else prep.params.max_tokens,
            params.temperature,
            params.top_k,
            params.top_p,
            params.repeat_penalty,
            params.stop,
            params.seed,
            req.n_indent,
            req.t_max_predict_ms,
            req.stream,
        )
        times = infill.timings(
            u.prompt_tokens, t.prompt_ms if t else 0.0, predicted, t.predicted_ms if t and not warmup else 0.0, u.cached_tokens
        )
        return infill.result(
            svc.model_id,
            "" if warmup else content,
            True,
            u.prompt_tokens,
            predicted,
            "limit" if reason == "length" else "eos",
            extra,
            settings,
            times,
            prep.truncated,
        )

    if not req.stream:
        c = await svc.run(request, prep)
        return answer(c.text, c.finish_reason)

    chunks = await svc.open_stream(request, prep)  # a refusal before the first token is a real 503, not a 200

    async def events():
        async for ch in chunks:
            if ch.finish_reason:
                yield answer(ch.text, ch.finish_reason)
            elif ch.text and not warmup:
                yield {"content": ch.text, "stop": False}

    return sse(events(), done_marker=False)
