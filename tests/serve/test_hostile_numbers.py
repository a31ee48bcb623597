"""Attacker's test: a JSON number Python will not convert. Since CPython 3.11 (CVE-2020-10735) `json.loads`
refuses an integer of more than 4,300 digits with a plain ValueError, not a JSONDecodeError; serve.body
caught only the latter, so one such number anywhere in a body (a 5,001-byte request, before any
validation) was an unhandled exception: a 500, not the protocol's 400."""

from __future__ import annotations

import pytest

from test_trust_input import ROUTES, client_for, db, llm  # noqa: F401  (fixtures)

HUGE = "1" * 5000


@pytest.mark.parametrize("path,template,proto", ROUTES)
def test_a_number_too_long_to_convert_is_a_400_in_the_protocols_shape(db, llm, path, template, proto):  # noqa: F811
    with client_for(db, llm) as c:
        body = template % HUGE
        r = c.post(path, content=body.encode(), headers={**c.tokens["alice"], "Content-Type": "application/json"})
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        assert "Traceback" not in r.text and "\n" not in r.text.strip()
        err = r.json()["error"]
        if proto in ("openai", "infill"):
            assert err["type"] == "invalid_request_error"
        msg = err["message"] if isinstance(err, dict) else err  # a body not parsed: /v1/completions answers as OpenAI
        assert "not valid JSON" in msg and "digits" in msg, msg
