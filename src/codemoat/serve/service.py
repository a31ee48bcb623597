"""The serving layer: the one place that translates protocol requests into engine calls.

Routers (routes_*.py) parse and render; this module checks the model and the license, bounds
sampling by configuration, decides which repositories a caller's prompt may draw on, has
`prompts` build the prompt (template, fitting, token ids), runs the engine, and fills the
request's `Usage` for the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import Request

from ..config import Settings
from ..engines.base import Chunk, Completion, Engine, SamplingParams
from ..engines.holder import ModelHolder
from ..engines.chat_templates import chat_template_for
from ..engines.templates import detect_fim
from ..engines.tokcache import SCOPE
from ..errors import CodemoatError, Forbidden, NotFound
from .admission import FairSlots
from .hangup import WATCH, ClientGone, Watch, unless_gone
from .prepare import Prepared, Preparer, screen_pending
from .prompts import FimInput, Templates
from .usage import usage_of

__all__ = ["ClientGone", "FimInput", "ModelNotFound", "Prepared", "Service", "Templates", "snippet_json", "snippets_extra"]

log = logging.getLogger("codemoat.serve")
MAX_STOPS, MAX_STOP_CHARS = 64, 1000  # editors send a handful; OpenAI's API takes 4


class ModelNotFound(NotFound):
    code = "model_not_found"


class Service:
    def __init__(self, settings: Settings, holder: ModelHolder, retriever: Any | None = None):
        self.settings = settings
        self.holder = holder
        self.retriever = retriever
        self._templates: dict[int, Templates] = {}
        self.started = time.time()
        # admission: at most `max_concurrent` generations hold a slot; the rest wait in line
        # a freed place goes to the user holding fewest; a user's requests waiting past a cap get 429
        self._slots = FairSlots(settings.server.max_concurrent, settings.server.max_waiting_per_user)
        self.waiting = 0  # requests waiting for a place (`_slot`)
        self.preparing = 0  # prompts being built on a worker thread (`prepare`)
        if holder.loaded:  # a configured template that does not fit the model is refused at start-up
            self.templates(holder.get())
        # prompt builders for `prepare` (what a prompt may draw on is decided there)
        p = self._preparer = Preparer(self)
        self.fim_prompt, self.chat_prompt, self.plain_prompt = p.fim, p.chat, p.plain

    # -- model and templates --------------------------------------------
    @property
    def model_id(self) -> str:
        return self.holder.model_id

    def check_model(self, requested: str | None) -> None:
        """Unknown model names are the protocol's not-found error (`name:latest` and aliases are accepted)."""
        if requested is None or requested == "":
            return
        base = requested.split(":")[0] if requested.endswith(":latest") else requested
        if base != self.model_id and base not in self.holder.status.aliases:
            raise ModelNotFound(f"model {requested!r} not found; this server serves {self.model_id!r}")

    def engine(self, feature: str | None = None) -> Engine:
        """The loaded engine; with `feature`, the license must include it (complete, chat, index)."""
        if feature:
            self.require_feature(feature)
        return self.holder.get()

    def require_feature(self, feature: str) -> None:
        features = self.holder.features
        if features is not None and feature not in features:
            raise Forbidden(f"the model's license does not include {feature!r} (it allows: {', '.join(features) or 'nothing'})")

    def templates(self, engine: Engine) -> Templates:
        t = self._templates.get(id(engine))
        if t is None:
            m = self.settings.model
            fim = detect_fim(engine.metadata, engine.has_token, m.fim_template)
            chat = chat_template_for(engine.metadata, engine.has_token, engine.token_text, m.chat_template)
            t = self._templates[id(engine)] = Templates(fim, chat)
            f = t.facts()
            if fim:
                log.info("prompts for %s: FIM template %s, chat format %s", self.model_id, fim.name, chat.name)
            else:
                log.warning(
                    "prompts for %s: the model has no FIM tokens, so completions cannot use the code after the "
                    "cursor (the suffix is dropped; cross-file context is kept); chat format %s",
                    self.model_id,
                    f["chat_format"],
                )
        return t

    def prompt_facts(self) -> dict[str, Any] | None:
        """The loaded model's prompt formats (for /health), None when no model is loaded."""
        return self.templates(self.holder.get()).facts() if self.holder.loaded else None

    # -- sampling ------------------------------------------------------------
    def params(
        self,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        stop: list[str],
        seed: int | None,
        top_k: int | None = None,
        repeat_penalty: float | None = None,
    ) -> SamplingParams:
        m = self.settings.model
        if max_tokens is None or max_tokens < 0:
            max_tokens = m.default_max_tokens
        if max_tokens > m.max_tokens_limit:
            raise CodemoatError(f"max_tokens is {max_tokens}, above this server's limit of {m.max_tokens_limit}")
        # every stop string is searched for after every token, on the engine's one thread that decodes for
        # everyone: 20,000 of them made each step of every request in the batch ~5 ms slower
        if len(stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise CodemoatError(f"stop: at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each")
        # a seed is 64 bits in every engine (torch's generators take no more; vLLM failed such a request with a 500)
        if seed is not None and seed >= 1 << 64:
            raise CodemoatError("seed must be below 2**64")
        p = SamplingParams(
            max_tokens=max(1, max_tokens),
            temperature=0.2 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=40 if top_k is None else top_k,
            repeat_penalty=1.0 if repeat_penalty is None else repeat_penalty,
            stop=list(stop),
            seed=None if seed is None or seed < 0 else seed,  # llama.cpp's -1: a random seed
        )
        self._watermark(p)
        return p

    def predict_params(
        self,
        n_predict: int | None,
        temperature: float | None,
        top_p: float | None,
        stop: list[str],
        seed: int | None,
        top_k: int | None = None,
        repeat_penalty: float | None = None,
    ) -> tuple[SamplingParams, bool]:
        """Ollama's `num_predict` and llama.cpp's `n_predict`: -1, or more than the limit, asks for as many
        tokens as fit, at most the limit; `fit` tells the prompt's builder to lower `max_tokens` to the room left."""
        limit = self.settings.model.max_tokens_limit
        fit = n_predict is not None and (n_predict < 0 or n_predict > limit)
        return self.params(limit if fit else n_predict, temperature, top_p, stop, seed, top_k, repeat_penalty), fit

    def _watermark(self, p: SamplingParams) -> None:
        key = self.holder.watermark_key
        if not key:
            return
        eng = self.holder.get()
        p.watermark = key
        if getattr(eng, "watermarks_itself", False):  # vLLM: its own logits processor, batched in torch
            return
        from ..trace.watermark import WatermarkProcessor

        p.logits_processors.append(WatermarkProcessor(key, vocab_size=getattr(eng, "n_vocab", None)))

    # -- prompts (built by `prompts`; this part decides what they may draw on) -----------------
    def idle(self) -> bool:
        """No request generates, waits for a place, or has its prompt built on a worker thread: nobody's
        tokens wait on the event loop (`prepare.IDLE_INLINE_CHARS`)."""
        return not (self._slots.busy or self._slots.waiting or self.waiting or self.preparing)

    async def prepare(self, build: Callable[..., Prepared], *args: Any, **kw: Any) -> Prepared:
        """`build` (fim_prompt, chat_prompt, plain_prompt) on a worker thread: tokenising a long prompt
        and retrieving snippets would otherwise hold the event loop, and every other client with it
        (a short prompt that draws on no index is built in place: `Preparer.inline`)."""
        request = args[0]
        principal = getattr(request.state, "principal", None)
        self._slots.check(None if principal is None else principal.user)  # a flood's prompts are not built to wait
        scope = SCOPE.set(None if principal is None else principal.user)  # this user's texts of a moment ago (`tokcache`)
        try:
            idle = self.idle()
            if self._preparer.inline(build, args, idle):
                if idle:
                    self._warm()  # the engine's wake-up overlaps the prompt's building
                prep = build(*args, **kw)
            else:
                self.preparing += 1
                try:
                    prep = await anyio.to_thread.run_sync(functools.partial(build, *args, **kw))
                finally:
                    self.preparing -= 1
        except BaseException:
            screen_pending(usage_of(request.state))  # a refused prompt's record names its secrets too
            raise
        finally:
            SCOPE.reset(scope)
        if prep.suffix_dropped:  # sent as a header by `prompts_headers` (app.py)
            request.state.prompt_headers = {"X-Codemoat-Suffix": "dropped"}
        return prep

    def _warm(self) -> None:
        """`Engine.warm`: a hint, which never fails the request (an engine unloaded meanwhile says so itself)."""
        try:
            self.holder.get().warm()
        except Exception as e:
            log.debug("warning the engine of a request failed: %s", e)

    # -- running ---------------------------------------------------------------
    async def run(self, request: Request, p: Prepared) -> Completion:
        """The whole completion; a client that hangs up while it waits or generates cancels it (`ClientGone`),
        so the worker goes to the next request instead of finishing an answer nobody reads. It is read
        from `stream`, so the usage (audit, quota) counts what was generated before a hang-up too."""

        async def generate() -> Completion:
            parts: list[str] = []
            reason: Any = "length"
            async for chunk in self.stream(request, p):
                parts.append(chunk.text)
                reason = chunk.finish_reason or reason
            u = request.state.usage
            return Completion("".join(parts), u.prompt_tokens, u.completion_tokens, reason)

        return await unless_gone(request, generate())

    async def open_stream(self, request: Request, p: Prepared) -> AsyncIterator[Chunk]:
        """`stream`, once its first chunk is there: a streamed answer's headers wait for it, so a request
        refused before then (`Overloaded` after `server.max_queue_wait_s`, a prompt too long) gets its real
        status and protocol error, as `run` does, instead of an in-band error inside a 200 stream. The
        first chunk is awaited either way, so the time to it does not change; a hang-up meanwhile cancels."""
        chunks = self.stream(request, p)

        async def first() -> Chunk | None:
            try:
                return await chunks.__anext__()
            except StopAsyncIteration:
                return None

        watch = Watch(request.receive)  # watches on through the stream: left for its `EventStream` (`WATCH`)
        try:
            head = await unless_gone(request, first(), watch)
        except BaseException:
            watch.stop()
            raise
        request.scope[WATCH] = watch

        async def rest() -> AsyncIterator[Chunk]:
            try:
                if head is not None:
                    yield head
                    async for chunk in chunks:
                        yield chunk
            finally:
                await chunks.aclose()

        return rest()

    async def stream(self, request: Request, p: Prepared) -> AsyncIterator[Chunk]:
        """Chunks from the engine; usage is recorded as they come (the audit, written once the request
        ends, sees partial streams: the text is joined when the stream ends or is cut off)."""
        usage = request.state.usage
        usage.prompt_tokens = p.prompt_tokens
        usage.completion_tokens = 0
        if usage.unscreened is not None:  # screened once the engine has the prompt: when this first waits for it
            asyncio.get_running_loop().call_soon(screen_pending, usage)
        self._adapter(request, p)
        principal = getattr(request.state, "principal", None)
        # a cached prompt is reused only for its own user, under the same adapter (`SamplingParams.cache_key`)
        p.params.cache_key = None if principal is None else f"{principal.user}\0{p.params.adapter or ''}"
        wait = self.settings.server.max_queue_wait_s  # for a place here, then a slot of the engine
        p.params.queue_deadline = time.monotonic() + wait if wait > 0 else None
        parts: list[str] = []
        try:
            async with self._slot(None if principal is None else principal.user, p.params.queue_deadline):
                async for chunk in p.engine.stream(p.ids or p.prompt, p.params):
                    usage.completion_tokens += len(chunk.token_ids)
                    usage.timings = chunk.timings or usage.timings
                    parts.append(chunk.text)
                    yield chunk
        finally:
            screen_pending(usage)  # if this never waited (an error at once): before the record, all the same
            usage.completion_text = "".join(parts)

    def _adapter(self, request: Request, p: Prepared) -> None:
        """Base + the adapter this caller may have (`serve.adapters`), else the base; named in the audit."""
        p.params.adapter = None
        # the adapters this request's engine loaded (not the settings: an adapter swap changes them)
        loaded = getattr(p.engine, "adapters_served", ())
        principal = getattr(request.state, "principal", None)
        if not loaded or principal is None:
            return
        from .adapters import choose

        readable = self.retriever.readable_repos(principal.groups) if self.retriever is not None else ()
        a = choose(loaded, principal.groups, readable)
        if a is not None:
            p.params.adapter = request.state.usage.adapter = a.name

    @contextlib.asynccontextmanager
    async def _slot(self, who: str | None, deadline: float | None = None):
        self.waiting += 1
        try:
            await self._slots.acquire(who, deadline)
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release(who)


def snippets_extra(ext: Any | None, prep: Prepared) -> dict[str, Any] | None:
    """`{"codemoat": {"snippets": [...]}}` when the request's extension asked for them."""
    return {"codemoat": {"snippets": snippet_json(prep.snippets)}} if ext and ext.return_snippets else None


def snippet_json(snippets: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "repo": s.repo,
            "path": s.path,
            "start_line": s.start_line,
            "end_line": s.end_line,
            "score": round(float(s.score), 4),
            "text": s.text,
        }
        for s in snippets
    ]
