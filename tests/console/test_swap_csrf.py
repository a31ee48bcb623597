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
