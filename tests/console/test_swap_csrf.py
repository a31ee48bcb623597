"""The model swap route (`POST /admin/api/model/swap`) from a browser signed in to the console: a
page on another origin that posts JSON as text/plain rides the console's session cookie only if
the admin API accepts cookies. It takes bearer tokens only (review of issue 21)."""

from __future__ import annotations

from consoleapp import make, signed_in
from fastapi.testclient import TestClient

from codemoat.audit.log import AuditLog


def _swaps(url: str) -> list[str]:
    from codemoat.db import open_db

    return [r["route"] for r in AuditLog(open_db(url)).records(kind="update", limit=50)]


def test_swap_takes_a_bearer_token_never_the_console_cookie(home, tiny_llm):
    url = f"sqlite:///{home / 'codemoat.db'}"
    app, accounts = make(url, tiny_llm)
    _, admin = accounts.create_token("root", user="root", scopes=("admin",))
    with TestClient(app, base_url="http://testserver") as c:
        assert signed_in(c, admin).status_code == 303 and c.cookies  # a live console session in this browser
        forged = '{"adapter": "fee", "x": "="}'  # what <form enctype="text/plain"> can send cross-site
        for headers in ({"content-type": "text/plain", "origin": "http://evil.example"}, {"content-type": "application/json"}):
            r = c.post("/admin/api/model/swap", content=forged, headers=headers)
            assert r.status_code == 401, (headers, r.text)
        assert _swaps(url) == []  # the route never ran
        r = c.post("/admin/api/model/swap", json={"adapter": "fee"}, headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 400 and "adapter" in r.text and "Traceback" not in r.text, r.text  # it ran, and failed
        assert _swaps(url) == ["update swap_failed"]


def test_swap_body_that_is_not_json_text_is_a_400(home, tiny_llm):
    """An admin's hostile or broken body: deep nesting was a 500 (RecursionError), a lone surrogate in the
    model path a 500 (UnicodeEncodeError while answering); both a one-line 400 now."""
    url = f"sqlite:///{home / 'codemoat.db'}"
    app, accounts = make(url, tiny_llm)
    _, admin = accounts.create_token("root", user="root", scopes=("admin",))
    h = {"Authorization": f"Bearer {admin}", "content-type": "application/json"}
    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as c:
        for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"model": "\\ud800"}', b'{"model": "/m.gguf", "license": "\\udfff"}'):
            r = c.post("/admin/api/model/swap", content=raw, headers=h)
            assert r.status_code == 400 and "Traceback" not in r.text, (raw[:30], r.status_code, r.text[:200])
        assert app.state.trust.log.verify().ok
