"""End to end: Tabby completions and editor events through a real `codemoat serve`, read back by
`codemoat usage report` after the server has stopped (persisted, not counted in memory)."""

from __future__ import annotations

import csv
import io
import json

import httpx
import pytest
from conftest import create_token, run_cli

pytestmark = pytest.mark.slow


def test_tabby_events_become_an_acceptance_rate_that_survives_a_restart(serve_process, tiny_gguf):
    ann = create_token("--name", "ann", "--user", "ann", "--scopes", "complete")
    eve = create_token("--name", "eve", "--user", "eve", "--scopes", "complete")
    server = serve_process(["--model", str(tiny_gguf)])
    ids = []
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {ann}"}) as c:
        for lang, path in (("python", "a.py"), ("python", "b.py"), (None, "web/app.ts")):
            r = c.post(
                "/v1/completions",
                json={"language": lang, "segments": {"prefix": "def f():\n    return ", "suffix": "\n", "filepath": path}},
            )
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        for i in ids:
            assert c.post("/v1/events", json={"type": "view", "completion_id": i, "choice_index": 0}).status_code == 200
        assert (
            c.post("/v1/events?select_kind=line", json={"type": "select", "completion_id": ids[0], "choice_index": 0}).status_code
            == 200
        )
        assert c.post("/v1/events", json={"type": "select", "completion_id": ids[0], "choice_index": 0}).status_code == 200
    # another user replays ann's ids: not ann's completions, so never counted
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {eve}"}) as c:
        for i in ids:
            assert c.post("/v1/events", json={"type": "select", "completion_id": i, "choice_index": 0}).status_code == 200
    scraper = create_token("--name", "prom", "--user", "prom", "--scopes", "metrics")
    m = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {scraper}"}, timeout=60).text
    assert 'codemoat_usage_acceptance_ratio{window="1d"} 0.3333' in m and 'codemoat_usage_engaged_users{window="28d"} 1.0' in m
    assert 'codemoat_usage_completions{window="7d"} 3.0' in m
    server.stop()

    r = run_cli("usage", "report", "--by", "language", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    rows = {x["key"]: x for x in rep["rows"]}
    assert rows["python"]["completions"] == 2 and rows["python"]["views"] == 2 and rows["python"]["selects"] == 1
    assert rows["python"]["acceptance"] == 0.5 and rows["python"]["accepted_lines"] == 1
    assert rows["typescript"]["views"] == 1 and rows["typescript"]["selects"] == 0
    assert rep["total"]["acceptance"] == round(1 / 3, 4) and rep["unmatched_events"] == 3
    assert rep["active_users"]["1d"] == 2 and rep["engaged_users"]["1d"] == 1
    r = run_cli("usage", "report", "--by", "user", "--csv")
    assert r.returncode == 0, r.stderr
    table = {row["key"]: row for row in csv.DictReader(io.StringIO(r.stdout))}
    assert table["ann"]["completions"] == "3" and table["ann"]["selects"] == "1" and "eve" not in table
    bad = run_cli("usage", "report", "--by", "nothing")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "cannot group usage by" in bad.stderr
