"""Response headers that the service decides while it builds a prompt (`request.state.prompt_headers`),
e.g. `X-Codemoat-Suffix: dropped` when the model cannot use the code after the cursor. Pure ASGI,
so that streamed answers carry them too (their headers go out after the route has returned)."""

from __future__ import annotations


class PromptHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with(message):
            if message["type"] == "http.response.start":
                extra = (scope.get("state") or {}).get("prompt_headers")
                if extra:
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), *((k.lower().encode(), v.encode()) for k, v in extra.items())],
                    }
            await send(message)

        return await self.app(scope, receive, send_with)
