"""Errors a user can cause: the CLI prints them in one line, the server maps them to each protocol's shape."""

from __future__ import annotations


class CodemoatError(Exception):
    """Base for every error that should reach the user as one clear line (no traceback)."""

    status = 400
    code = "invalid_request_error"


class NotFound(CodemoatError):
    status = 404
    code = "not_found"


class Unauthorized(CodemoatError):
    status = 401
    code = "invalid_api_key"


class Forbidden(CodemoatError):
    status = 403
    code = "permission_denied"


class Unavailable(CodemoatError):
    """The model is not loaded (no license, lease expired, loading)."""

    status = 503
    code = "model_unavailable"


class Overloaded(Unavailable):
    """Every generation slot stayed busy longer than a request may wait (`server.max_queue_wait_s`):
    each protocol's "overloaded, retry" error (503 with Retry-After; Ollama's "server busy")."""

    code = "server_overloaded"
    retry_after = 1.0

    def __init__(
        self,
        message: str = "the server is busy: no generation slot became free within server.max_queue_wait_s; retry in a moment",
    ):
        super().__init__(message)


class RateLimited(CodemoatError):
    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after
