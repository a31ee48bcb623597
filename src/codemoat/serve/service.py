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
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request

from ..accounts import Principal
from ..config import Settings
from ..engines.base import Chunk, Completion, Engine, SamplingParams
from ..engines.holder import ModelHolder
from ..engines.templates import chat_template_for, detect_fim
from ..errors import CodemoatError, Forbidden, NotFound
from . import prompts
from .prompts import FimInput, Prompt, Templates
from .usage import usage_of

__all__ = ["ClientGone", "FimInput", "ModelNotFound", "Prepared", "Service", "Templates", "snippet_json", "snippets_extra"]

log = logging.getLogger("codemoat.serve")


class ModelNotFound(NotFound):
    code = "model_not_found"


class ClientGone(CodemoatError):
    """The client closed the connection before the answer was ready (logged as nginx's 499)."""

    status = 499
    code = "client_closed_request"


@dataclass
class Prepared:
    engine: Engine
    prompt: str  # what the model reads
    params: SamplingParams
    prompt_tokens: int
    snippets: list[Any] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the prompt's token ids, built once
    truncated: bool = False  # fitted into the context (llama.cpp's `truncated`)
    suffix_dropped: bool = False  # the model has no FIM tokens: the suffix was not used


class Service:
    def __init__(self, settings: Settings, holder: ModelHolder, retriever: Any | None = None):
        self.settings = settings
        self.holder = holder
        self.retriever = retriever
        self._templates: dict[int, Templates] = {}
        self.started = time.time()
        # admission: at most `max_concurrent` generations hold a slot; the rest wait in line
        self._slots = asyncio.Semaphore(settings.server.max_concurrent)
        self.waiting = 0
        if holder.loaded:  # a configured template that does not fit the model is refused at start-up
            self.templates(holder.get())

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
                log.warning("prompts for %s: the model has no FIM tokens, so completions cannot use the code after the "
                            "cursor (the suffix is dropped; cross-file context is kept); chat format %s", self.model_id, f["chat_format"])
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
        p = SamplingParams(
            max_tokens=max(1, max_tokens),
            temperature=0.2 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=40 if top_k is None else top_k,
            repeat_penalty=1.0 if repeat_penalty is None else repeat_penalty,
            stop=list(stop),
            seed=seed,
        )
        self._watermark(p)
        return p

    def predict_params(self, n_predict: int | None, temperature: float | None, top_p: float | None, stop: list[str],
                       seed: int | None, top_k: int | None = None, repeat_penalty: float | None = None) -> tuple[SamplingParams, bool]:
        """Ollama's `num_predict` and llama.cpp's `n_predict`: -1, or more than the limit, asks for as many
        tokens as fit, at most the limit; `fit` tells the prompt's builder to lower `max_tokens` to the room left."""
        limit = self.settings.model.max_tokens_limit
        fit = n_predict is not None and (n_predict < 0 or n_predict > limit)
        return self.params(limit if fit else n_predict, temperature, top_p, stop, seed, top_k, repeat_penalty), fit

    def _watermark(self, p: SamplingParams) -> None:
        key = self.holder.watermark_key
        if not key:
            return
        from ..trace.watermark import WatermarkProcessor

        eng = self.holder.get()
        p.watermark = key
        p.logits_processors.append(WatermarkProcessor(key, vocab_size=getattr(eng, "n_vocab", None)))

    # -- prompts (built by `prompts`; this part decides what they may draw on) -----------------
    async def prepare(self, build: Callable[..., "Prepared"], *args: Any, **kw: Any) -> "Prepared":
        """`build` (fim_prompt, chat_prompt, plain_prompt) on a worker thread: tokenising a long prompt
        and retrieving snippets would otherwise hold the event loop, and every other client with it."""
        request = args[0]
        prep = await anyio.to_thread.run_sync(functools.partial(build, *args, **kw))
        if prep.suffix_dropped:  # sent as a header by `prompts_headers` (app.py)
            request.state.prompt_headers = {"X-Codemoat-Suffix": "dropped"}
        return prep

    def _reserve(self, params: SamplingParams, fit: bool) -> int:
        # "as many as fit" (num_predict -1): the prompt is built beside a usual completion's length;
        # the generation then gets whatever the final prompt leaves (`_finish`)
        return min(params.max_tokens, self.settings.model.default_max_tokens) if fit else params.max_tokens

    def _finish(self, engine: Engine, p: Prompt, params: SamplingParams, fit: bool, snippets: list[Any] | None = None) -> Prepared:
        n = len(p.ids)
        if fit and 0 < n < engine.n_ctx:
            params.max_tokens = max(1, min(params.max_tokens, engine.n_ctx - n))
        engine.check_count(n, params.max_tokens)
        return Prepared(engine, p.text, params, n, p.snippets if snippets is None else snippets, p.ids, p.truncated, p.suffix_dropped)

    def fim_prompt(self, request: Request, principal: Principal, f: FimInput, params: SamplingParams, fit: bool = False) -> Prepared:
        """`fit`: lower `max_tokens` to the room the prompt leaves (Ollama's and llama.cpp's "-1")."""
        engine = self.engine("complete")
        t = self.templates(engine)
        usage = usage_of(request.state)
        prompts.screen_text(prompts.fim_document(f, engine.n_ctx), self.settings.policy.secrets, usage)
        repo = self._repo_for(principal, f)

        def retrieve(budget: int) -> list[Any]:
            return self.retriever.snippets_for_completion(
                groups=principal.groups, repo=repo, path=f.path or "", prefix=f.prefix, suffix=f.suffix,
                k=self.settings.retrieval.k, budget_tokens=budget, count_tokens=_counter(engine),
            )

        p = prompts.build_fim(engine, t.fim, f, self._reserve(params, fit), repo=repo, retrieve=retrieve if repo else None,
                              retrieval_budget=self.settings.retrieval.budget_tokens)
        if p.snippets:
            usage.repos = [repo]
            usage.snippets = [s.id for s in p.snippets]
        if t.fim:
            params.stop = list(dict.fromkeys([*params.stop, *t.fim.stop]))
        usage.prompt_text = f.prefix + f.suffix
        usage.language = usage.language or f.path  # for usage reports (codemoat.usage maps it to a language)
        return self._finish(engine, p, params, fit)

    def _indexing_licensed(self) -> bool:
        features = self.holder.features
        return features is None or "index" in features

    def _repo_for(self, principal: Principal, f: FimInput) -> str | None:
        if not (self.retriever and f.retrieval and self.settings.retrieval.enabled and self.settings.retrieval.k > 0):
            return None
        if not self._indexing_licensed():
            return None
        repo = f.repo or self.retriever.repo_for(f.git_url, f.path)
        if repo and repo not in self.retriever.readable_repos(principal.groups):
            return None  # not readable by this caller: complete without its code
        return repo

    def chat_prompt(self, request: Request, principal: Principal, messages: list[dict[str, str]], params: SamplingParams,
                    repos: list[str] | None = None, fit: bool = False) -> Prepared:
        engine = self.engine("chat")
        t = self.templates(engine)
        usage = usage_of(request.state)
        msgs = [dict(m) for m in messages]
        for m in msgs:
            if m["role"] == "developer":
                m["role"] = "system"
        snippets = self._chat_context(principal, msgs, repos or [], engine)
        if snippets:
            context = "\n\n".join(f"{s.repo}/{s.path}:{s.start_line}-{s.end_line}\n```\n{s.text.rstrip()}\n```" for s in snippets)
            note = (
                "Answer using the code below from the company's repositories, and cite the files you "
                "use as path:line.\n\n" + context
            )
            msgs.insert(0, {"role": "system", "content": note})
            usage.repos = sorted({s.repo for s in snippets})
            usage.snippets = [s.id for s in snippets]
        prompts.screen_text("\n".join(m["content"][-engine.n_ctx * prompts.HEAD_CHARS:] for m in messages),
                            self.settings.policy.secrets, usage)
        p = prompts.build_chat(engine, t.chat, msgs, self._reserve(params, fit))
        params.stop = list(dict.fromkeys([*params.stop, *t.chat.stop]))
        usage.prompt_text = "\n".join(m["content"] for m in messages)
        return self._finish(engine, p, params, fit, snippets)

    def plain_prompt(self, request: Request, prompt: str, params: SamplingParams, fit: bool = False,
                     truncate: bool = False) -> Prepared:
        """The prompt as the client sent it (OpenAI completions without suffix, Ollama's `raw`); with
        `truncate` (Ollama) an over-long one keeps its end instead of being refused (OpenAI)."""
        engine = self.engine("complete")
        usage = usage_of(request.state)
        prompts.screen_text(prompt[-engine.n_ctx * prompts.HEAD_CHARS:], self.settings.policy.secrets, usage)
        p = prompts.build_plain(engine, prompt, self._reserve(params, fit), keep_end=truncate)
        usage.prompt_text = prompt
        return self._finish(engine, p, params, fit)

    def _chat_context(self, principal: Principal, msgs: list[dict[str, str]], repos: list[str], engine: Engine) -> list[Any]:
        """Repositories named in the request (extension field or `@repo` in the last user message)."""
        if not self.retriever or not self.settings.retrieval.enabled:
            return []
        if repos and not self._indexing_licensed():
            self.require_feature("index")
        if not self._indexing_licensed():
            return []
        readable = set(self.retriever.readable_repos(principal.groups))
        for r in repos:
            if r not in readable:
                raise Forbidden(f"repository {r!r} is not indexed or not readable by you")
        last = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        named = list(dict.fromkeys([*repos, *self.retriever.mentioned_repos(principal.groups, last)]))
        if not named:
            return []
        return self.retriever.snippets_for_chat(
            groups=principal.groups, repos=named, query=last, k=8, budget_tokens=max(256, self.settings.retrieval.budget_tokens * 3),
            count_tokens=_counter(engine),
        )

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

        work = asyncio.ensure_future(generate())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if work.cancelled():
            raise ClientGone("the client closed the connection; generation was cancelled")
        return work.result()

    async def stream(self, request: Request, p: Prepared) -> AsyncIterator[Chunk]:
        """Chunks from the engine; usage is recorded as they come (the audit, written once the request
        ends, sees partial streams: the text is joined when the stream ends or is cut off)."""
        usage = request.state.usage
        usage.prompt_tokens = p.prompt_tokens
        usage.completion_tokens = 0
        parts: list[str] = []
        try:
            async with self._slot():
                async for chunk in p.engine.stream(p.ids or p.prompt, p.params):
                    usage.completion_tokens += len(chunk.token_ids)
                    usage.timings = chunk.timings or usage.timings
                    parts.append(chunk.text)
                    yield chunk
        finally:
            usage.completion_text = "".join(parts)

    @contextlib.asynccontextmanager
    async def _slot(self):
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()


def _counter(engine: Engine) -> Callable[[str], int]:
    """Token counts of a user's text for retrieval's budget (control tokens not parsed, no BOS)."""
    return lambda text: len(engine.encode([prompts.Part(text)], bos=False))


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def snippets_extra(ext: Any | None, prep: Prepared) -> dict[str, Any] | None:
    """`{"codemoat": {"snippets": [...]}}` when the request's extension asked for them."""
    return {"codemoat": {"snippets": snippet_json(prep.snippets)}} if ext and ext.return_snippets else None


def snippet_json(snippets: list[Any]) -> list[dict[str, Any]]:
    return [
        {"repo": s.repo, "path": s.path, "start_line": s.start_line, "end_line": s.end_line, "score": round(float(s.score), 4), "text": s.text}
        for s in snippets
    ]
