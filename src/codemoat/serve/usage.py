"""What one request used, as the audit record keeps it: filled by the routes and the service,
read by the trust layer once the response has finished (`request.state.usage`).

Every field is either a number, a value the server chose (its own model id, retrieved snippet
ids, a route's protocol), one of a fixed set (`event`, `secrets` kinds), or text that is stored
only redacted and only with `audit.retain_text`. Nothing a caller sent is kept verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engines.base import Timings

# Tabby's editor events (tabby-agent's postEvent, Continue's and llama.vscode's acceptance events):
# any other `type` is recorded as "other", so that a caller's text never reaches the audit log.
EVENT_TYPES = frozenset({"view", "select", "dismiss", "accept", "accepted", "completion", "chat"})
# HTTP methods as recorded; any other token a client sends is "other".
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def event_type(value: object) -> str:
    """The enumerated event type for a caller's `type` field ("other" when it is not one we know)."""
    return value if isinstance(value, str) and value in EVENT_TYPES else "other"


def method_name(value: object) -> str:
    return value if isinstance(value, str) and value in METHODS else "other"


@dataclass
class Usage:
    protocol: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    repos: list[str] = field(default_factory=list)
    snippets: list[str] = field(default_factory=list)
    prompt_text: str = ""  # kept (redacted) only with audit.retain_text; screened for secret kinds
    completion_text: str = ""
    event: str | None = None  # one of EVENT_TYPES or "other"
    secrets: set[str] = field(default_factory=set)  # kinds found, never the values
    unscreened: str | None = None  # the client's text still to be screened for `secrets` (`prepare.screen_pending`), never kept
    note: str | None = None  # why the server refused or cut the request short (the server's words)
    timings: Timings | None = None  # the engine's, from the stream's last chunk (/infill's answer shows them)
    # for usage analytics (codemoat.usage): the id the client saw, the language, an editor event's keys
    completion_id: str | None = None
    language: str | None = None  # the client's word or the file's extension; codemoat.usage maps it to a fixed set
    choice_index: int | None = None
    select_kind: str | None = None
    adapter: str | None = None  # the LoRA adapter that answered (codemoat tune), None: the base model

    @property
    def cached_tokens(self) -> int | None:
        """The prompt's tokens the engine found in its cache (OpenAI's `cached_tokens`, llama.cpp's `cache_n`),
        None when the engine does not say."""
        return self.timings.cached if self.timings is not None else None


def usage_of(scope_or_state) -> Usage:
    """The request's `Usage`, created on first use (`scope["state"]` dict or a Starlette `State`)."""
    if isinstance(scope_or_state, dict):
        u = scope_or_state.get("usage")
        if not isinstance(u, Usage):
            u = scope_or_state["usage"] = Usage()
        return u
    u = getattr(scope_or_state, "usage", None)
    if not isinstance(u, Usage):
        u = Usage()
        scope_or_state.usage = u
    return u
