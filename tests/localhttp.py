"""`LocalHTTP(Handler)`: an `http.server` request handler class served on 127.0.0.1 (a free port) by a thread, for the
other party a test talks to (an identity provider, an update channel, a proxy that answers an error page). `.url`,
`.port`; `close()`, or use it as a context manager. Every test folder can import it (`tests/` is on the path)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHTTP:
    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> LocalHTTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
