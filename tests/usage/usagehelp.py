"""What the usage tests record: a request's real `Usage` (codemoat.serve.usage), as the trust layer
hands it to `UsageStore.record`, and the completion ids a client would see."""

from __future__ import annotations

from typing import Any

from codemoat.serve.usage import Usage


def usage(**kw: Any) -> Usage:
    """A Tabby completion of 100 prompt and 10 completion tokens, unless `kw` says otherwise."""
    return Usage(**{"protocol": "tabby", "prompt_tokens": 100, "completion_tokens": 10, **kw})


def cid(n: int) -> str:
    """The `n`th completion id, as the server writes them."""
    return f"cmpl-{n:024x}"
