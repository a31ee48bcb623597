"""An outside attacker's review of prompt assembly: a hostile completion body from any token holder.

Was broken: the client's extra files (llama.cpp's /infill `input_extra`, Tabby's declarations, the
codemoat extension's files) were fitted into the prompt by summing all of them anew each time one went,
and each went off the front of the list: quadratic in their number, and every one of up to `n_ctx * 16`
characters of them was tokenised first. Over HTTP the body guard lets 10,000 JSON objects through: 9,000
small files cost 23 s of the prompt thread at an 8k context (3.7 s now, most of it the model reading the
prompt); past that guard (another route, a larger limit) 50,000 one-character files cost over ten
minutes. The bound test runs in its own interpreter with a bound many times what it costs now and far
less than it cost before (a hang is the failure, not a slow run).
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from conftest import create_token

BOUND = 120  # seconds

FIT = """
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from tinymodel import build_tiny_gguf
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.engines.templates import FileSnippet
from codemoat.serve.prompts import FimInput, build_fim
eng = LlamaCppEngine.from_path(build_tiny_gguf(Path(sys.argv[1]) / "t.gguf", n_ctx=8192), model_id="t", n_ctx=8192, n_threads=1)
f = FimInput("def f(", ")\\n", "b.py", extra=[FileSnippet(f"m{i}.py", "x") for i in range(50_000)])
p = build_fim(eng, None, f, 16)
print(len(p.ids) <= 8192 - 16, p.truncated, "m49999.py" in p.text, "m0.py" not in p.text)
"""


def test_fifty_thousand_tiny_extra_files_are_fitted_in_linear_time(tmp_path):
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        p = subprocess.run([sys.executable, "-c", FIT, str(tmp_path), tests], capture_output=True, text=True, timeout=BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still fitting 50,000 extra files after {BOUND} s (it takes a second or two)")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["True", "True", "True", "True"]  # fits, says so, keeps the newest, drops the oldest


@pytest.mark.slow
def test_extra_files_at_the_body_guards_limit_and_ordinary_ones_over_http(home, tmp_path, serve_process):
    """The negative beside it, over a real server: 9,000 small files (the body guard refuses more than
    10,000 objects) are answered, and three ordinary files all reach the prompt."""
    from tinymodel import build_tiny_gguf

    gguf = build_tiny_gguf(tmp_path / "tiny-8k.gguf", n_ctx=8192)
    auth = {"Authorization": f"Bearer {create_token('--name', 'dev')}"}
    s = serve_process(["--model", str(gguf), "--model-id", "tiny"], env={"CODEMOAT_MODEL__N_CTX": "8192"})

    def infill(prefix: str, extra: list[dict]) -> dict:
        body = {"input_prefix": prefix, "input_suffix": ")\n", "n_predict": 1, "input_extra": extra}
        try:
            r = httpx.post(s.url + "/infill", json=body, headers=auth, timeout=BOUND)
        except httpx.TimeoutException:
            pytest.fail(f"the request held the server for over {BOUND} s")
        assert r.status_code == 200, r.text[:300]
        return r.json()

    assert infill("def f(", [{"filename": "a.py", "text": "x " * 6} for _ in range(9_000)])["truncated"] is True
    few = [{"filename": f"m{i}.py", "text": f"def helper_{i}(x):\n    return x + {i}\n"} for i in range(3)]
    body = infill("y = helper_2(", few)
    assert body["truncated"] is False and body["tokens_evaluated"] > 30  # three files' worth, not the prefix alone
    assert httpx.get(s.url + "/health", timeout=30).status_code == 200
