"""The llama.cpp engine on a real GGUF: generation, sampling controls, memfd loading, cancellation."""

import os

import numpy as np
import pytest

from codemoat.engines.base import PromptTooLong, SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine, _valid_utf8_prefix
from codemoat.engines.memfd import F_SEAL_GROW, F_SEAL_SHRINK, MemfdBuffer
from codemoat.errors import CodemoatError
from enginehelp import run


@pytest.fixture(scope="module")
def engine(random_gguf):
    e = LlamaCppEngine.from_path(random_gguf, n_ctx=512, n_threads=1)
    yield e
    e.close()


def test_facts(engine):
    assert engine.n_ctx == 512
    assert engine.has_token("<|fim_prefix|>") and not engine.has_token("def")
    assert engine.token_text("eos") == "<|endoftext|>"
    ids = engine.tokenize("<|fim_prefix|>def add(a, b):")
    assert ids[0] == engine.tokenize("<|fim_prefix|>")[0]
    assert engine.detokenize(ids) == "def add(a, b):"  # control tokens are the template's, never text


def test_greedy_is_deterministic_and_bounded(engine):
    p = SamplingParams(max_tokens=12, temperature=0)
    a, b = run(engine.complete("def add(", p)), run(engine.complete("def add(", p))
    assert a.text == b.text and a.completion_tokens == 12 and a.finish_reason == "length"


def test_seed_reproduces_sampling(engine):
    mk = lambda s: SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=s)
    x = [run(engine.complete("class ", mk(7))).text for _ in range(2)]
    y = {run(engine.complete("class ", mk(s))).text for s in range(5)}
    assert x[0] == x[1]
    assert len(y) > 1  # different seeds differ


def test_stop_sequences_cut_text(engine):
    full = run(engine.complete("def add(", SamplingParams(max_tokens=24, temperature=0))).text
    cut_at = full[3:6]
    assert cut_at
    stopped = run(engine.complete("def add(", SamplingParams(max_tokens=24, temperature=0, stop=[cut_at])))
    assert stopped.text == full[: full.index(cut_at)]
    assert stopped.finish_reason == "stop"


def test_stream_concatenates_to_complete(engine):
    p = SamplingParams(max_tokens=20, temperature=0)

    async def collect():
        return [c async for c in engine.stream("import os\n", p)]

    chunks = run(collect())
    assert chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == run(engine.complete("import os\n", p)).text
    assert sum(len(c.token_ids) for c in chunks) == 20


def test_logits_processor_is_applied(engine):
    banned = engine.tokenize("(")[0]
    seen = []

    def ban(input_ids, logits):
        seen.append(len(input_ids))
        logits[:] = -np.inf
        logits[banned] = 0.0
        return logits

    out = run(engine.complete("x", SamplingParams(max_tokens=5, temperature=0.7, logits_processors=[ban])))
    assert out.text == "(" * 5
    assert len(seen) == 5


def test_prompt_too_long(engine):
    with pytest.raises(PromptTooLong, match="context is 512 tokens"):
        run(engine.complete("def " * 600, SamplingParams(max_tokens=8)))


def test_cancel_frees_the_worker(engine):
    async def go():
        agen = engine.stream("def ", SamplingParams(max_tokens=400, temperature=0.8))
        first = await agen.__anext__()
        await agen.aclose()  # the client went away
        nxt = await engine.complete("def ", SamplingParams(max_tokens=3, temperature=0))
        return first, nxt

    first, nxt = run(go())
    assert nxt.completion_tokens == 3


def test_logits_match_between_path_and_memfd(random_gguf, engine):
    data = random_gguf.read_bytes()
    mem = LlamaCppEngine.from_bytes(data, model_id="mem", n_ctx=512, n_threads=1)
    try:
        assert np.allclose(mem.logits("def add("), engine.logits("def add("), atol=1e-5)
        assert mem.health()["sealed"] is True
    finally:
        mem.close()


def test_memfd_is_sealed_anonymous_and_zeroed(random_gguf):
    data = random_gguf.read_bytes()
    buf = MemfdBuffer.from_bytes(data)
    assert buf.seals() & F_SEAL_SHRINK and buf.seals() & F_SEAL_GROW
    assert os.readlink(buf.path).startswith("/memfd:")  # no disk path behind it
    with pytest.raises(OSError):
        os.ftruncate(buf.fd, 10)  # sealed: cannot shrink
    # zeroing happens through our own mapping before release; a duplicate fd lets us look after
    fd_copy = os.dup(buf.fd)
    buf.close()
    with open(f"/proc/self/fd/{fd_copy}", "rb") as f:
        assert f.read(4096) == bytes(4096)
    os.close(fd_copy)


def test_bad_model_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(100))
    with pytest.raises(CodemoatError, match=f"cannot load model {bad.stem}: llama.cpp cannot read it"):
        LlamaCppEngine.from_path(bad)
    with pytest.raises(CodemoatError, match="not found"):
        LlamaCppEngine.from_path(tmp_path / "missing.gguf")


def test_utf8_prefix():
    s = "é✓".encode()
    assert _valid_utf8_prefix(s) == len(s)
    assert _valid_utf8_prefix(s[:-1]) == 2
    assert _valid_utf8_prefix(s[:1]) == 0


def test_empty_prompt_is_refused_by_the_engine(engine):
    p = SamplingParams(max_tokens=4, temperature=0)
    assert engine.tokenize("") == []  # this model adds no BOS: "" is zero tokens

    async def drain():
        return [c async for c in engine.stream("", p)]

    for attempt in (lambda: run(engine.complete("", p)), lambda: run(drain()), lambda: engine.logits("")):
        with pytest.raises(CodemoatError, match="the prompt is empty"):
            attempt()
    assert run(engine.complete("def add(", p)).completion_tokens == 4  # the worker is still serving


CLOSE_UNDER_TOKENISERS = """
import sys, threading, time
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.errors import CodemoatError

text = "def add(a, b):\\n    return a + b  # résumé ünïcode\\n" * 20000  # one tokenisation: tens of ms
for rnd in range(8):
    eng = LlamaCppEngine.from_path(sys.argv[1], model_id="t", n_ctx=256, n_threads=1)
    going, errors = threading.Event(), []

    def tokenise():
        going.set()
        while True:
            try:
                eng.tokenize(text)
                eng.detokenize(eng.tokenize("def f(x):"))
            except CodemoatError as e:  # closed: a 503 that says why
                return
            except Exception as e:
                errors.append(repr(e))
                return

    threads = [threading.Thread(target=tokenise) for _ in range(2)]
    for t in threads:
        t.start()
    going.wait()
    time.sleep(0.01 * (rnd % 4))
    eng.close()  # while the tokenisations run
    for t in threads:
        t.join()
    assert not errors, errors
print("survived")
"""


def test_close_while_server_threads_tokenise_waits_for_them(tiny_gguf):
    """The inline engine (`model.isolation = inline`): close() (a license revoked, an adapter swap) freed the
    native model while a request's tokenisation ran in it on a server thread, and the whole server died with
    SIGSEGV (the tokenizer read a freed vocabulary). close() now waits for the calls inside the model to leave
    it, and a call after close is refused. Run in its own process, so that the crash is this test's failure."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", CLOSE_UNDER_TOKENISERS, str(tiny_gguf)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])
