"""A minimal app with the trust layer installed, standing in for `create_app` in the audit tests.

Its handlers fill `request.state.usage` the way the real routes do; auth, error rendering and the
trust layer are the real ones.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from codemoat.accounts import Accounts
from codemoat.config import Settings
from codemoat.engines.holder import ModelHolder
from codemoat.serve import errors, trust
from codemoat.serve.auth import require


def make_app(settings: Settings, accounts: Accounts, holder: ModelHolder | None = None) -> FastAPI:
    holder = holder or ModelHolder("tiny")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        hook = getattr(app.state, "on_shutdown", None)
        if hook is not None:
            hook()

    app = FastAPI(lifespan=lifespan)
    app.state.accounts = accounts
    app.state.holder = holder
    app.state.egress_allow = []
    errors.install(app)
    app.state.handled = 0

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def complete(request: Request, principal=Depends(require("complete"))):
        request.state.protocol = "openai"
        body = await request.json()
        prompt = trust.screen_prompt(body["prompt"], settings, request)
        app.state.handled += 1
        n = int(body.get("max_tokens", 5))
        request.state.usage.update(
            protocol="openai", model="tiny", prompt_tokens=len(prompt.split()), completion_tokens=n,
            repos=["acme/api"], snippets=["acme/api:src/a.py:1-20"], prompt_text=body["prompt"], completion_text="ok " * n,
        )
        return {"choices": [{"text": "ok " * n}], "usage": {"completion_tokens": n}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request, principal=Depends(require("chat"))):
        request.state.protocol = "openai"
        body = await request.json()
        u = request.state.usage
        u.update(protocol="openai", model="tiny", prompt_text=body["messages"][-1]["content"])

        chunks, pause = (40, 0.1) if body.get("slow") else (4, 0.01)

        async def gen():
            for i in range(chunks):
                u["completion_tokens"] = i + 1
                yield f"data: {{\"i\": {i}}}\n\n"
                await asyncio.sleep(pause)
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/slow")
    async def slow(request: Request, principal=Depends(require("complete"))):
        request.state.usage.update(protocol="openai", model="tiny", prompt_tokens=2)
        await asyncio.sleep(60)  # a generation stuck in the queue
        return {}

    @app.post("/v1/boom")
    async def boom(request: Request, principal=Depends(require("complete"))):
        request.state.usage.update(protocol="openai", model="tiny", prompt_tokens=3)
        raise RuntimeError("engine fell over")

    @app.post("/v1/events")
    async def events(request: Request, principal=Depends(require("complete"))):
        body = await request.json()
        request.state.usage.update(protocol="tabby", model="tiny", event=body.get("type"))
        return {}

    trust.install(app, settings)
    return app
