"""Through a real server: an editor typing on in a long file gets its prefix tokenised from where it grew
(`engines.tokgrow`), with the answers a whole tokenisation gives, and /metrics shows what the tokeniser's
caches took; another user's typing in the same file grows from nothing of the first user's."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from conftest import create_token

FILE = (Path(__file__).resolve().parents[2] / "src" / "codemoat" / "engines" / "tokgrow.py").read_text()


def _counter(text: str, name: str, label: str) -> float:
    m = re.search(rf'^{name}_total\{{[a-z]+="{label}"\}} ([0-9.e+]+)$', text, re.M)
    assert m is not None, f"{name}{{{label}}} not in /metrics"
    return float(m.group(1))


@pytest.mark.slow
def test_typing_on_grows_the_prefix_and_metrics_show_it(serve_process, tiny_gguf):
    alice = {"Authorization": f"Bearer {create_token('--name', 'alice-ed', '--user', 'alice')}"}
    bob = {"Authorization": f"Bearer {create_token('--name', 'bob-ed', '--user', 'bob')}"}
    scrape = {"Authorization": f"Bearer {create_token('--name', 'scraper', '--scopes', 'metrics')}"}
    srv = serve_process(["--model", str(tiny_gguf), "--n-ctx", "2048"])
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        model = c.get("/health", headers=alice).json()["model"]

        def complete(who: dict, prompt: str) -> str:
            r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}, headers=who)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        start = 900
        answers = [complete(alice, FILE[: start + 3 * i]) for i in range(6)]
        m = c.get("/metrics", headers=scrape).text
        grown, whole = (
            _counter(m, "codemoat_tokenizer_long_texts", "grown"),
            _counter(m, "codemoat_tokenizer_long_texts", "whole"),
        )
        assert grown == 5 and whole == 1  # the first keystroke whole, then each from where it grew
        complete(bob, FILE[: start + 15])  # the same text alice sent last: bob's own is tokenised whole
        m = c.get("/metrics", headers=scrape).text
        assert _counter(m, "codemoat_tokenizer_long_texts", "whole") == 2
        assert _counter(m, "codemoat_tokenizer_long_texts", "grown") == 5
        assert _counter(m, "codemoat_tokenizer_cache_lookups", "miss") >= 7
        # the answers are those of a server that tokenises each text whole (a fresh one, nothing to grow from)
        for i, want in enumerate(answers):  # each its own user: tokenised whole
            who = {"Authorization": f"Bearer {create_token('--name', f'x{i}', '--user', f'u{i}')}"}
            assert complete(who, FILE[: start + 3 * i]) == want
        m = c.get("/metrics", headers=scrape).text
        assert _counter(m, "codemoat_tokenizer_long_texts", "whole") == 2 + len(answers)
