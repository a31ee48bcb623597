"""llama.cpp's CPU configuration (model.cpu_buffers): the self-test in a child process, its forced
failures (SIGSEGV, hang, wrong logits) picking the safe path with one log line, the cached verdict,
and quantised models (the bundled one in five types, a hidden-1024 one) serving on either path."""

from __future__ import annotations

import asyncio
import json
import logging
import stat

import numpy as np
import pytest

from codemoat.config import load_settings
from codemoat.engines import cpu
from codemoat.engines.base import SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.errors import CodemoatError

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
AMX = {"amx_int8", "amx_tile", "amx_bf16"}


def complete(engine, prompt: str = "def add(a, b):\n    return"):
    return asyncio.run(engine.complete(prompt, GREEDY))


def load(path, **kw) -> LlamaCppEngine:
    return LlamaCppEngine.from_path(path, n_ctx=256, n_threads=1, **kw)


def no_selftest(monkeypatch):
    def refuse(**_):
        raise AssertionError("the self-test ran")

    monkeypatch.setattr(cpu, "selftest", refuse)


@pytest.fixture(scope="module")
def extra_ok() -> bool:
    """Whether the extra buffer types pass the self-test here: where they do not (an AMX Xeon with the
    llama.cpp bug), forcing them would crash this test process, so those decodes are skipped."""
    return cpu.selftest().use_extra_bufts


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "codemoat.engines" and r.levelno >= logging.WARNING]


def test_selftest_verdict_on_this_cpu(caplog):
    _, flags = cpu.cpu_info()
    with caplog.at_level(logging.INFO, "codemoat.engines"):
        c = cpu.selftest()
    assert "failed to run" not in c.reason, c.reason
    if not AMX & flags:  # AMD EPYC and pre-AMX Intel: the repacked kernels are known to be correct
        assert c.use_extra_bufts and c.reason.startswith("self-test passed"), c.reason
        assert warnings_of(caplog) == []
    else:  # an AMX Xeon: either verdict, but a failure is one line that names AMX
        assert c.use_extra_bufts or ("amx" in c.reason.lower() and len(warnings_of(caplog)) == 1)


def test_forced_crash_serves_on_the_safe_path_with_one_log_line(quantised, monkeypatch, caplog, home):
    model = quantised("Q4_K_M")
    monkeypatch.setenv(cpu.FAULT_ENV, "segv")
    with caplog.at_level(logging.INFO, "codemoat.engines"):
        eng = load(model)
    try:
        [line] = warnings_of(caplog)
        _, flags = cpu.cpu_info()
        assert "crashed a Q4_0 decode with SIGSEGV on this CPU" in line and "serving on the safe path" in line
        assert cpu.feature(flags, cpu.system_info()) in line and "\n" not in line
        assert eng.health()["cpu_buffers"] == {"path": "safe", "reason": line}
        text = complete(eng)
        assert text.completion_tokens >= 1
    finally:
        eng.close()
    # the safe path gives what model.cpu_buffers = safe gives
    safe = load(model, cpu_buffers="safe")
    try:
        assert complete(safe).text == text.text
    finally:
        safe.close()
    # the verdict is cached (0600): the next start runs no test and says nothing, even without the fault
    cache = home / cpu.CACHE_FILE
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert [v["use_extra_bufts"] for v in json.loads(cache.read_text()).values()] == [False]
    monkeypatch.delenv(cpu.FAULT_ENV)
    no_selftest(monkeypatch)
    caplog.clear()
    again = load(model)
    try:
        assert again.cpu.use_extra_bufts is False and warnings_of(caplog) == []
    finally:
        again.close()


@pytest.mark.parametrize(
    "fault, words",
    [("hang", "hung for more than 6 s in a Q4_0 decode"), ("mismatch", "gave logits unlike the safe path's at step 0")],
)
def test_hang_and_wrong_logits_pick_the_safe_path(fault, words, monkeypatch, caplog):
    monkeypatch.setenv(cpu.FAULT_ENV, fault)
    with caplog.at_level(logging.INFO, "codemoat.engines"):
        c = cpu.selftest(timeout=6 if fault == "hang" else cpu.TIMEOUT_S)  # a real decode: no short limit
    assert not c.use_extra_bufts and words in c.reason and c.reason.endswith("serving on the safe path")
    assert warnings_of(caplog) == [c.reason]


def test_settings_extra_and_safe_are_honoured_without_a_test(quantised, monkeypatch, extra_ok):
    monkeypatch.setenv(cpu.FAULT_ENV, "segv")  # a test, were one run, would pick the safe path
    no_selftest(monkeypatch)
    import llama_cpp.llama_cpp as lib

    seen = []  # what reaches llama.cpp's C loader (vocab-only probes aside)
    real = lib.llama_model_load_from_file

    def spy(path, params):
        if not params.vocab_only:
            seen.append(params.use_extra_bufts)
        return real(path, params)

    monkeypatch.setattr(lib, "llama_model_load_from_file", spy)
    model = quantised("Q4_0")
    extra, safe = load(model, cpu_buffers="extra"), load(model, cpu_buffers="safe")
    try:
        assert extra.health()["cpu_buffers"] == {"path": "extra", "reason": "model.cpu_buffers = extra"}
        assert safe.health()["cpu_buffers"] == {"path": "safe", "reason": "model.cpu_buffers = safe"}
        assert seen == [True, False]
        if extra_ok:
            assert complete(extra).completion_tokens >= 1 and complete(safe).completion_tokens >= 1
    finally:
        extra.close()
        safe.close()
    forced = load(model, cpu_buffers="extra", use_extra_bufts=False)  # the supervisor's fallback wins
    try:
        assert forced.health()["cpu_buffers"]["path"] == "safe" and seen[-1] is False
    finally:
        forced.close()
    assert lib.llama_model_default_params().use_extra_bufts is True  # llama.cpp's default is back after each load
    with pytest.raises(CodemoatError, match="invalid configuration: model.cpu_buffers"):
        load_settings(**{"model.cpu_buffers": "fast"})
    with pytest.raises(CodemoatError, match="auto, extra or safe"):
        cpu.choose("fast")


def test_float_models_need_no_test_and_quantised_ones_are_recognised(tiny_gguf, quantised, wide_q4_k_m, tmp_path, monkeypatch):
    no_selftest(monkeypatch)
    c = cpu.choose("auto", tiny_gguf)
    assert c.use_extra_bufts and "no quantised tensors" in c.reason
    assert not cpu.is_quantised(tiny_gguf)
    assert all(cpu.is_quantised(quantised(q)) for q in ("Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"))
    assert cpu.is_quantised(wide_q4_k_m)
    # a GGUF whose header cannot be parsed counts as quantised (the cautious answer); what is no GGUF
    # at all does not (llama.cpp refuses it, nothing to test)
    (tmp_path / "junk.gguf").write_bytes(b"not a model")
    (tmp_path / "cut.gguf").write_bytes(tiny_gguf.read_bytes()[:5000])
    assert cpu.is_quantised(tmp_path / "cut.gguf")
    assert not cpu.is_quantised(tmp_path / "junk.gguf") and not cpu.is_quantised(tmp_path / "missing.gguf")


def test_cache_is_keyed_by_cpu_and_build_and_survives_corruption(quantised, monkeypatch, home):
    runs = []

    def fake(**_):
        runs.append(1)
        return cpu.Choice(False, "stub verdict")

    monkeypatch.setattr(cpu, "selftest", fake)
    model = quantised("Q8_0")
    assert cpu.choose("auto", model).reason == "stub verdict" and len(runs) == 1
    assert cpu.choose("auto", model).reason == "stub verdict" and len(runs) == 1  # cached
    name, flags = cpu.cpu_info()
    monkeypatch.setattr(cpu, "cpu_info", lambda: (name, flags ^ {"amx_int8"}))  # another CPU (AMX or not): its own verdict
    cpu.choose("auto", model)
    assert len(runs) == 2
    monkeypatch.setattr(cpu, "system_info", lambda: "CPU : AMX_INT8 = 1 | REPACK = 1 |")  # another build
    cpu.choose("auto", model)
    assert len(runs) == 3
    (home / cpu.CACHE_FILE).write_text("{not json")
    assert cpu.cached(cpu.cache_key()) is None
    cpu.choose("auto", model)
    assert len(runs) == 4 and cpu.cached(cpu.cache_key()) == cpu.Choice(False, "stub verdict")


def test_selftest_feeds_a_multi_token_batch(tmp_path, monkeypatch):
    """llama.cpp's AMX tile kernels, the code that crashes on AMX Xeons, run only for batches of two tokens
    or more: a self-test that fed its prompt one token at a time would pass where every prompt crashes.
    Checked on the safe path, so on any CPU."""
    import llama_cpp.llama_cpp as lib
    from tinymodel import quantise

    sizes = []
    real = lib.llama_decode

    def spy(ctx, batch):
        sizes.append(batch.n_tokens)
        return real(ctx, batch)

    monkeypatch.setattr(lib, "llama_decode", spy)
    model = quantise(cpu.selftest_model(tmp_path), tmp_path / "q4_0.gguf", "Q4_0")
    logits, toks = cpu._decode(str(model), False, 1, None)
    assert sizes[0] >= 8 and sizes[1:] == [1] * len(toks)  # the prompt as one batch, then one token at a time
    assert logits.shape[0] == len(toks) and np.all(np.isfinite(logits))


def test_selftest_model_loads_into_the_amx_buffer(tmp_path, capfd):
    """On an AMX Xeon the self-test's quantised matrices must take llama.cpp's AMX buffer type (row sizes it
    accepts), or the test would not run the AMX kernels at all. Loading only: a decode could crash here."""
    import llama_cpp
    from tinymodel import quantise

    _, flags = cpu.cpu_info()
    if "amx_int8" not in flags or "AMX_INT8 = 1" not in cpu.system_info():
        pytest.skip("needs an AMX CPU (amx_int8) and a llama.cpp build with AMX_INT8")
    for quant in ("Q4_0", "Q8_0", "Q4_K_M"):
        model = quantise(cpu.selftest_model(tmp_path), tmp_path / f"{quant}.gguf", quant)
        capfd.readouterr()
        with cpu.extra_bufts(True):
            llm = llama_cpp.Llama(model_path=str(model), n_ctx=64, n_threads=1, verbose=True)
        llm.close()
        log = capfd.readouterr().err
        assert "AMX model buffer size" in log, quant
        assert log.count("amx repack tensor blk.") == 14, quant  # every layer matrix, 2 layers x 7


@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_quantised_bundled_model_generates_alike_on_both_paths(quant, quantised, extra_ok):
    if not extra_ok:
        pytest.skip("llama.cpp's extra CPU buffer types fail the self-test on this CPU")
    extra, safe = load(quantised(quant), cpu_buffers="extra"), load(quantised(quant), cpu_buffers="safe")
    try:
        a, b = extra.logits("def add(a, b):\n"), safe.logits("def add(a, b):\n")
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
        assert complete(extra).completion_tokens >= 1 and complete(safe).completion_tokens >= 1
    finally:
        extra.close()
        safe.close()


def test_wide_q4_k_m_runs_the_k_quant_kernels_on_both_paths(wide_q4_k_m):
    from tinymodel import tensor_types

    assert tensor_types(wide_q4_k_m).get("Q4_K", 0) >= 8  # the matrices really are Q4_K (rows of 1024)
    eng = load(wide_q4_k_m)  # auto: the self-test decides
    safe = load(wide_q4_k_m, cpu_buffers="safe")
    try:
        a, b = eng.logits("def add(a, b):\n"), safe.logits("def add(a, b):\n")
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
        assert complete(eng).completion_tokens >= 1
        assert eng.health()["cpu_buffers"]["path"] in ("extra", "safe")
    finally:
        eng.close()
        safe.close()
