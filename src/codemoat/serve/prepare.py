"""What a request's prompt may draw on, and the prompt itself: the license's features, the caller's
readable repositories (retrieval for completions; `@repo` and named repositories for chat), then
`prompts` builds it, and the request's `Usage` records what went in. `Service` runs this on a
worker thread (`Service.prepare`) and the result (`Prepared`) goes to the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

from ..accounts import Principal
from ..engines.base import Engine, SamplingParams
from ..errors import Forbidden
from . import prompts
from .prompts import FimInput, Prompt
from .usage import Usage, usage_of

if TYPE_CHECKING:
    from .service import Service

# A prompt of at most this many characters that draws on no index is built on the event loop: tokenising
# it takes ~0.1 ms (512 characters, bundled model and Gemma 3, warm), less than the hop to a worker thread
# and back (0.2 ms, and 1-2 ms when another thread holds the GIL); a longer one (2,000 characters: ~0.4 ms
# warm, several ms cold) would hold every other client's tokens that long.
INLINE_CHARS = 512
# While no other request generates, waits for a place or has its prompt built on a thread, nobody's tokens
# wait on the loop, and a prompt of up to this many characters is built there too: an editor's file prefix
# on an idle server skips the hop. That is ~1.5 ms of tokenising code; fitting it to a short context (cut
# and detokenised) and screening a crafted text for secrets take up to ~10 ms (reviewer V4), which a request
# arriving meanwhile waits once.
IDLE_INLINE_CHARS = 8192
EXTRA_CHARS = 128  # what an extra file costs beyond its text: two tokenisations (~24 us, as ~120 characters of code)
TURN_CHARS = 32  # what a chat template adds per turn (`<start_of_turn>user\n ... <end_of_turn>\n`), counted in the above


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


class Preparer:
    def __init__(self, svc: Service):
        self.svc = svc

    def inline(self, build: Callable[..., Prepared], args: tuple, idle: bool = False) -> bool:
        """Whether `build(*args)` may run on the event loop: at most `INLINE_CHARS` to tokenise (file names
        included), `IDLE_INLINE_CHARS` when the server is `idle` (no other request under way), no index query."""
        if build == self.plain:
            size = len(args[1])
        elif self.svc.retriever is not None and self.svc.settings.retrieval.enabled:
            return False  # retrieval reads the index (blocking I/O)
        elif build == self.fim:
            f = args[2]  # the names are in the prompt too (a client's 100,000-character file name held the loop)
            size = len(f.prefix) + len(f.suffix) + len(f.path or "") + len(f.repo or "")
            size += sum(len(x.path) + len(x.text) + EXTRA_CHARS for x in f.extra)  # 511 one-character files held it ~12 ms
        elif build == self.chat:
            size = sum(len(m.get("content") or "") + TURN_CHARS for m in args[2])  # 3,000 empty turns are no short prompt
        else:
            return False
        return size <= (IDLE_INLINE_CHARS if idle else INLINE_CHARS)

    def _reserve(self, params: SamplingParams, fit: bool) -> int:
        # "as many as fit" (num_predict -1): the prompt is built beside a usual completion's length;
        # the generation then gets whatever the final prompt leaves (`_finish`)
        return min(params.max_tokens, self.svc.settings.model.default_max_tokens) if fit else params.max_tokens

    def screen(self, text: str, usage: Usage) -> None:
        """Screen the client's `text` for secrets now, or leave it to `screen_pending`.

        Under "block" a secret refuses the request, so the screen comes before the engine sees the prompt.
        Under "redact" it only names the kinds found in the request's record: a short text (`INLINE_CHARS`)
        is then screened on the event loop while the engine starts on the prompt (`Service.stream`), not
        before it (~0.05 ms of every request's time to first token); a longer one here, where a long
        prompt is built on a worker thread."""
        policy = self.svc.settings.policy.secrets
        if policy == "block" or len(text) > INLINE_CHARS:
            prompts.screen_text(text, policy, usage)
        else:
            usage.unscreened = text

    def _finish(
        self, engine: Engine, p: Prompt, params: SamplingParams, fit: bool, snippets: list[Any] | None = None
    ) -> Prepared:
        n = len(p.ids)
        if fit and 0 < n < engine.n_ctx:
            params.max_tokens = max(1, min(params.max_tokens, engine.n_ctx - n))
        engine.check_count(n, params.max_tokens)
        return Prepared(
            engine, p.text, params, n, p.snippets if snippets is None else snippets, p.ids, p.truncated, p.suffix_dropped
        )

    def fim(self, request: Request, principal: Principal, f: FimInput, params: SamplingParams, fit: bool = False) -> Prepared:
        """`fit`: lower `max_tokens` to the room the prompt leaves (Ollama's and llama.cpp's "-1")."""
        engine = self.svc.engine("complete")
        t = self.svc.templates(engine)
        usage = usage_of(request.state)
        self.screen(prompts.fim_document(f, engine.n_ctx), usage)
        repo = self._repo_for(principal, f)

        def retrieve(budget: int) -> list[Any]:
            return self.svc.retriever.snippets_for_completion(
                groups=principal.groups,
                repo=repo,
                path=f.path or "",
                prefix=f.prefix,
                suffix=f.suffix,
                k=self.svc.settings.retrieval.k,
                budget_tokens=budget,
                count_tokens=_counter(engine),
            )

        p = prompts.build_fim(
            engine,
            t.fim,
            f,
            self._reserve(params, fit),
            repo=repo,
            retrieve=retrieve if repo else None,
            retrieval_budget=self.svc.settings.retrieval.budget_tokens,
        )
        if p.snippets:
            usage.repos = [repo]
            usage.snippets = [s.id for s in p.snippets]
        if t.fim:
            params.stop = list(dict.fromkeys([*params.stop, *t.fim.stop]))
        usage.prompt_text = f.prefix + f.suffix
        usage.language = usage.language or f.path  # for usage reports (codemoat.usage maps it to a language)
        return self._finish(engine, p, params, fit)

    def _indexing_licensed(self) -> bool:
        features = self.svc.holder.features
        return features is None or "index" in features

    def _repo_for(self, principal: Principal, f: FimInput) -> str | None:
        if not (self.svc.retriever and f.retrieval and self.svc.settings.retrieval.enabled and self.svc.settings.retrieval.k > 0):
            return None
        if not self._indexing_licensed():
            return None
        readable = set(self.svc.retriever.readable_repos(principal.groups))
        repo = f.repo or self.svc.retriever.repo_for(f.git_url, f.path, readable)
        if repo and repo not in readable:
            return None  # not readable by this caller: complete without its code
        return repo

    def chat(
        self,
        request: Request,
        principal: Principal,
        messages: list[dict[str, str]],
        params: SamplingParams,
        repos: list[str] | None = None,
        fit: bool = False,
    ) -> Prepared:
        engine = self.svc.engine("chat")
        t = self.svc.templates(engine)
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
        self.screen("\n".join(m["content"][-engine.n_ctx * prompts.HEAD_CHARS :] for m in messages), usage)
        p = prompts.build_chat(engine, t.chat, msgs, self._reserve(params, fit))
        params.stop = list(dict.fromkeys([*params.stop, *t.chat.stop]))
        usage.prompt_text = "\n".join(m["content"] for m in messages)
        return self._finish(engine, p, params, fit, snippets)

    def plain(self, request: Request, prompt: str, params: SamplingParams, fit: bool = False, truncate: bool = False) -> Prepared:
        """The prompt as the client sent it (OpenAI completions without suffix, Ollama's `raw`); with
        `truncate` (Ollama) an over-long one keeps its end instead of being refused (OpenAI)."""
        engine = self.svc.engine("complete")
        usage = usage_of(request.state)
        self.screen(prompt[-engine.n_ctx * prompts.HEAD_CHARS :], usage)
        p = prompts.build_plain(engine, prompt, self._reserve(params, fit), keep_end=truncate)
        usage.prompt_text = prompt
        return self._finish(engine, p, params, fit)

    def _chat_context(self, principal: Principal, msgs: list[dict[str, str]], repos: list[str], engine: Engine) -> list[Any]:
        """Repositories named in the request (extension field or `@repo` in the last user message)."""
        if not self.svc.retriever or not self.svc.settings.retrieval.enabled:
            return []
        if repos and not self._indexing_licensed():
            self.svc.require_feature("index")
        if not self._indexing_licensed():
            return []
        readable = set(self.svc.retriever.readable_repos(principal.groups))
        for r in repos:
            if r not in readable:
                raise Forbidden(f"repository {r!r} is not indexed or not readable by you")
        last = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        named = list(dict.fromkeys([*repos, *self.svc.retriever.mentioned_repos(principal.groups, last)]))
        if not named:
            return []
        return self.svc.retriever.snippets_for_chat(
            groups=principal.groups,
            repos=named,
            query=last,
            k=8,
            budget_tokens=max(256, self.svc.settings.retrieval.budget_tokens * 3),
            count_tokens=_counter(engine),
        )


def screen_pending(usage: Usage) -> None:
    """Screen the text `Preparer.screen` left for later, once: the kinds it holds go into the request's record."""
    text, usage.unscreened = usage.unscreened, None
    if text is not None:
        prompts.screen_text(text, "redact", usage)


def _counter(engine: Engine) -> Callable[[str], int]:
    """Token counts of a user's text for retrieval's budget (control tokens not parsed, no BOS)."""
    return lambda text: len(engine.encode([prompts.Part(text)], bos=False))
