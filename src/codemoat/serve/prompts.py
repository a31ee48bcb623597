"""Prompt building: what the model reads, from what a client sent, as token ids built once.

- Fill-in-the-middle (OpenAI and Ollama `suffix`, `/infill`, Tabby's segments) uses the model's FIM
  template, with cross-file context (the client's `input_extra`, retrieved snippets) before it. A
  model without FIM tokens cannot use the suffix: it reads the context as path comments, then the
  prefix, and the prompt says `suffix_dropped`.
- Fitted, never refused for length (llama.cpp's server for /infill, Ollama for chat and raw
  prompts): FIM keeps the end of the prefix and the start of the suffix (`retrieve.fit.split_room`)
  and gives context only the room left, dropping the lowest-ranked snippets, then the client's
  oldest extra files; chat keeps the system messages and the newest turns, then the end of the
  newest. `truncated` says it happened.
- Tokenised once, here: a template's own markers are parsed as control tokens, a user's text never
  is (the text `<eos>` in someone's source stays text), and BOS appears once. The ids go to the engine.
- Screened: with `policy.secrets = "block"`, the client's text as the model reads it, joined (extra
  files, prefix, suffix; or the rendered chat), so a secret split across fields is still one secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from ..audit.redact import find_secrets, screen
from ..engines.base import Engine, PromptTooLong
from ..engines.chat_templates import ChatTemplate
from ..engines.templates import FileSnippet, FimTemplate, Part, comment_for, text_of
from ..retrieve.fit import split_room

# Text is cut to n_ctx * HEAD_CHARS characters (the prefix's end, the suffix's start, a message's
# end) before it is tokenised: a 10 MB prompt must not hold a worker for seconds to be thrown away.
# Code runs at 3-5 characters a token, so the cut never removes text that could have fitted.
HEAD_CHARS = 16


@dataclass
class FimInput:
    """A fill-in-the-middle request, whatever protocol it came in."""

    prefix: str
    suffix: str = ""
    path: str | None = None
    repo: str | None = None
    git_url: str | None = None
    extra: list[FileSnippet] = field(default_factory=list)
    retrieval: bool = True

    @classmethod
    def from_ext(cls, prefix: str, suffix: str, ext: Any | None, extra: list[FileSnippet] | None = None) -> FimInput:
        """A FIM input whose file and repository come from the request's `codemoat` extension."""
        return cls(
            prefix,
            suffix,
            path=ext.path if ext else None,
            repo=ext.repo if ext else None,
            git_url=ext.git_url if ext else None,
            extra=extra or [],
            retrieval=ext.retrieval if ext else True,
        )


@dataclass
class Templates:
    """The model's prompt formats, as detected (or configured) once per loaded engine."""

    fim: FimTemplate | None
    chat: ChatTemplate

    def facts(self) -> dict[str, Any]:
        """What /health, /api/show and the start-up log say about them."""
        return {
            "fim_template": self.fim.name if self.fim else None,
            "suffix": "used" if self.fim else "dropped",
            "chat_format": self.chat.name,
        }


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what the model reads (Tabby's `return_prompt`)
    truncated: bool = False  # fitted into the context: something the client sent was cut or left out
    suffix_dropped: bool = False  # a suffix was sent and the model has no FIM tokens to read it with
    snippets: list[Any] = field(default_factory=list)  # retrieved snippets the prompt holds


def screen_text(text: str, policy: str, usage: Any) -> None:
    """Record the kinds of secrets in `text` (never the values) and, under "block", refuse it."""
    found = find_secrets(text)
    if found:
        usage.secrets.update(f.kind for f in found)
        if policy == "block":
            screen(text, "block")  # raises SecretInPrompt: kinds and lines, one line


def clip_fim(f: FimInput, n_ctx: int) -> tuple[str, str, bool]:
    clip = n_ctx * HEAD_CHARS
    return f.prefix[-clip:], f.suffix[:clip], len(f.prefix) > clip or len(f.suffix) > clip


def fim_document(f: FimInput, n_ctx: int) -> str:
    """The client's text in the order the model reads it, without the template between: what is screened."""
    prefix, suffix, _ = clip_fim(f, n_ctx)
    return "".join(x.text[-n_ctx * HEAD_CHARS :] for x in f.extra) + prefix + suffix


def build_fim(
    engine: Engine,
    fim: FimTemplate | None,
    f: FimInput,
    reserve: int,
    *,
    repo: str | None = None,
    retrieve: Callable[[int], list[Any]] | None = None,
    retrieval_budget: int = 0,
) -> Prompt:
    """The FIM prompt for `f` leaving `reserve` tokens to generate; `retrieve(budget)` is asked for
    snippets once the room the code leaves is known."""
    n_ctx = engine.n_ctx
    prefix, suffix, truncated = clip_fim(f, n_ctx)
    bos = engine.encode([], bos=True)
    if fim is None:
        tail = [Part(prefix)]
        pre_at, suf_at = 0, None
    else:
        tail = fim.parts(prefix, suffix)
        pre_at, suf_at = 1, 3
    tail_ids = [engine.encode([p], bos=False) for p in tail]
    pre = tail_ids[pre_at]
    suf = tail_ids[suf_at] if suf_at is not None else []
    fixed = len(bos) + sum(len(x) for x in tail_ids) - len(pre) - len(suf)
    room = n_ctx - reserve - fixed
    if room < 1:
        raise PromptTooLong(fixed, n_ctx, reserve)
    keep_pre, keep_suf = split_room(len(pre), len(suf), room)
    if keep_pre < len(pre) or keep_suf < len(suf):
        truncated = True
        tail_ids[pre_at] = pre[len(pre) - keep_pre :]
        tail[pre_at] = Part(engine.detokenize(tail_ids[pre_at]))
        if suf_at is not None:
            tail_ids[suf_at] = suf[:keep_suf]
            tail[suf_at] = Part(engine.detokenize(tail_ids[suf_at]))
    left = room - keep_pre - keep_suf
    snippets = retrieve(min(retrieval_budget, left)) if retrieve and left > 32 else []
    extra, clipped = _clip_extra(f.extra, n_ctx * HEAD_CHARS, n_ctx)
    n_extra = len(extra)
    head_parts, head_ids = _context(engine, fim, extra, snippets, f.path, repo, left)
    truncated = truncated or clipped or len(extra) < n_extra
    parts = head_parts + tail
    ids = bos + head_ids + [t for x in tail_ids for t in x]
    return Prompt(ids, text_of(parts), truncated, fim is None and bool(f.suffix), snippets)


def _clip_extra(extra: list[FileSnippet], clip: int, most: int) -> tuple[list[FileSnippet], bool]:
    """The newest extra files within `clip` characters in all and `most` files (more could never fit: each
    costs a token at least, and a client can send hundreds of thousands of one-character files in a body;
    each kept one is tokenised), the oldest kept keeping its end, and whether anything was cut."""
    out: list[FileSnippet] = []
    left = clip
    for x in reversed(extra):
        if left <= 0 or len(out) >= most:
            break
        out.append(x if len(x.text) <= left else FileSnippet(x.path, x.text[-left:]))
        left -= len(x.text)
    return out[::-1], left < 0 or len(out) < len(extra)


def _context(
    engine: Engine,
    fim: FimTemplate | None,
    extra: list[FileSnippet],
    snippets: list[Any],
    path: str | None,
    repo: str | None,
    room: int,
) -> tuple[list[Part], list[int]]:
    """Other files before the code, within `room` tokens: the lowest-ranked snippets go first, then the
    client's extra files from the oldest (llama.cpp keeps the end of its extra context). Both lists
    are cut in place to what the prompt holds. The best snippet goes last, next to the code."""
    file_sep = fim.file_sep if fim else None

    def item(s: FileSnippet) -> list[Part]:
        if file_sep:
            return [Part(file_sep, True), Part(f"{s.path}\n{s.text.rstrip()}\n")]
        return [Part(f"{comment_for(s.path)} {s.path}\n{s.text.rstrip()}\n\n")]

    head: list[Part] = []
    if file_sep and fim and fim.repo_name and repo:
        head = [Part(fim.repo_name, True), Part(f"{repo}\n")]
    if path:
        here = [Part(file_sep, True), Part(f"{path}\n")] if file_sep else [Part(f"{comment_for(path)} {path}\n")]
    else:
        here = []
    cost = {id(x): engine.encode(item(x), bos=False) for x in extra}
    files = {id(s): FileSnippet(s.path, s.text) for s in snippets}
    cost.update({k: engine.encode(item(v), bos=False) for k, v in files.items()})
    head_ids, here_ids = engine.encode(head, bos=False), engine.encode(here, bos=False)
    # what the prompt holds, counted once and then lessened as items go (summing it anew after each one
    # that went, and taking the oldest extra file off the list's front each time, was quadratic in them)
    used = len(head_ids) + len(here_ids) + sum(len(cost[id(x)]) for x in [*extra, *snippets])
    while snippets and used > room:
        used -= len(cost[id(snippets.pop())])  # best first: the last is the lowest-ranked
    gone = 0
    while gone < len(extra) and used > room:
        used -= len(cost[id(extra[gone])])
        gone += 1
    del extra[:gone]
    if not (extra or snippets):
        return [], []
    order = [(item(x), cost[id(x)]) for x in extra] + [(item(files[id(s)]), cost[id(s)]) for s in reversed(snippets)]
    parts = head + [p for ps, _ in order for p in ps] + here
    ids = head_ids + [t for _, c in order for t in c] + here_ids
    return parts, ids


def build_chat(engine: Engine, chat: ChatTemplate, messages: list[dict[str, str]], reserve: int) -> Prompt:
    """The chat prompt leaving `reserve` tokens: system messages and the newest turns are kept, older
    turns dropped, and the newest message keeps its end when it alone is too long."""
    n_ctx = engine.n_ctx
    clip = n_ctx * HEAD_CHARS
    budget = n_ctx - reserve
    msgs = [dict(m) for m in messages]
    truncated = False
    for m in msgs:
        if len(m["content"]) > clip:
            m["content"], truncated = m["content"][-clip:], True
    # turns far beyond the context go before anything is rendered (a client can send thousands)
    chars = sum(len(m["content"]) for m in msgs)
    if chars > clip:
        keep = set(range(len(msgs))) - set(_droppable(msgs))
        for i in _droppable(msgs):
            if chars <= clip:
                keep.add(i)
            else:
                chars -= len(msgs[i]["content"])
        truncated = truncated or len(keep) < len(msgs)
        msgs = [m for i, m in enumerate(msgs) if i in keep]

    tokens = _Tokens(engine)

    def encode(ms: list[dict[str, str]]) -> tuple[list[Part], list[int]]:
        parts = chat.parts(ms)
        return parts, tokens.encode(parts)

    parts, ids = encode(msgs)
    if len(ids) > budget:
        # the fewest oldest turns to drop: a guess from each turn's tokens, checked by rendering, then
        # bisection if it was wrong (3,000 empty turns cost 14 renders and tokenisations of the chat)
        old, every = _droppable(msgs), msgs
        tried: dict[int, tuple[list[Part], list[int]]] = {}

        def without(k: int) -> list[dict[str, str]]:
            gone = set(old[:k])
            return [m for i, m in enumerate(every) if i not in gone]

        def fits(k: int) -> bool:
            tried[k] = encode(without(k))
            return len(tried[k][1]) <= budget

        lo, hi = 0, len(old)
        guess = _guess(tokens, parts, every, old, len(ids) - budget)
        if fits(guess):
            hi = guess
            if guess and not fits(guess - 1):
                lo = guess
        else:
            lo = min(guess + 1, hi)
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
        msgs, truncated = without(lo), True
        parts, ids = tried[lo] if lo in tried else encode(msgs)
    for _ in range(4):  # the newest message alone is too long: keep its end
        over = len(ids) - budget
        if over <= 0:
            return Prompt(ids, text_of(parts), truncated)
        last = engine.encode([Part(msgs[-1]["content"])], bos=False)
        if over >= len(last) or msgs[-1]["role"] == "system":
            break
        msgs[-1]["content"], truncated = engine.detokenize(last[over + 2 :]), True  # +2: the cut may retokenise longer
        parts, ids = encode(msgs)
    if len(ids) <= budget:
        return Prompt(ids, text_of(parts), truncated)
    raise PromptTooLong(len(ids), n_ctx, reserve)


class _Tokens:
    """`engine.encode` with each distinct part tokenised once: fitting a chat renders it again and again,
    and its turns' template text repeats. An engine's encoding is its parts' tokens in order, BOS in front
    if the model wants one and the text did not start with it (`Engine.encode`)."""

    def __init__(self, engine: Engine):
        self.engine, self.seen = engine, {}
        self.bos = engine.encode([], bos=True)

    def of(self, p: Part) -> list[int]:
        key = (p.text, p.special)
        if (got := self.seen.get(key)) is None:
            got = self.seen[key] = self.engine.encode([p], bos=False)
        return got

    def encode(self, parts: list[Part]) -> list[int]:
        ids = [t for p in parts if p.text for t in self.of(p)]
        return ids if not self.bos or ids[: len(self.bos)] == self.bos else self.bos + ids


def _guess(tokens: _Tokens, parts: list[Part], msgs: list[dict[str, str]], old: list[int], over: int) -> int:
    """How many of the oldest turns `old` to drop to save `over` tokens, were each turn its content and the
    template text before it: a first guess (0 if the template does not render each message once)."""
    if sum(not p.special for p in parts) != len(msgs):
        return 0
    cost, i, pending = [0] * len(msgs), 0, 0
    for p in parts:
        pending += len(tokens.of(p)) if p.text else 0
        if not p.special:
            cost[i], i, pending = pending, i + 1, 0
    saved = 0
    for k, j in enumerate(old, 1):
        saved += cost[j]
        if saved >= over:
            return k
    return len(old)


def _droppable(msgs: list[dict[str, str]]) -> list[int]:
    """Indices of the turns that may go, oldest first: not system messages, not the newest."""
    return [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]


def build_plain(engine: Engine, text: str, reserve: int, keep_end: bool) -> Prompt:
    """The client's own prompt (it wrote any template, so its control tokens are parsed). With
    `keep_end` (Ollama) an over-long one keeps BOS and its end; else it is refused (OpenAI)."""
    n_ctx = engine.n_ctx
    clip = n_ctx * HEAD_CHARS
    budget = n_ctx - reserve
    truncated = False
    if len(text) > clip:
        if not keep_end:
            n = len(engine.encode([Part(text[:clip], True)]))
            if n >= n_ctx:
                raise PromptTooLong(n, n_ctx, reserve, at_least=True)
        else:
            text, truncated = text[-clip:], True
    ids = engine.encode([Part(text, True)])
    if keep_end and len(ids) > budget > 0:
        bos = engine.encode([], bos=True)
        body = ids[len(bos) :] if ids[: len(bos)] == bos else ids
        ids = bos + body[len(body) - (budget - len(bos)) :]
        text, truncated = engine.detokenize(ids[len(bos) :]), True
    return Prompt(ids, text, truncated)
