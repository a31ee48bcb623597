"""Prompt building over real llama.cpp engines (issues 13 items 1-6, 14 item 7, 15 A1/A6/B3): the
model's own formats, control tokens only where the template puts them, BOS once, fitting instead
of 400, the suffix said to be dropped when the model cannot read it, secrets screened across fields."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient

from codemoat.accounts import Accounts
from codemoat.config import load_settings
from codemoat.db import open_db
from codemoat.engines.base import SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.engines.chat_templates import chat_template_for
from codemoat.engines.templates import FIM_TEMPLATES, FileSnippet, Part
from codemoat.errors import CodemoatError
from codemoat.serve import prompts
from codemoat.serve.app import create_app
from codemoat.serve.prompts import FimInput
from kept_holder import KeptHolder


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """Gemma-style vocabulary, no FIM tokens, add_bos_token, no chat template (a base Gemma 3 GGUF)."""
    from special_models import build_special_gguf

    path = build_special_gguf(tmp_path_factory.mktemp("m") / "gemma-style.gguf", "gemma", extra_specials=("<|fim_middle|>",))
    e = LlamaCppEngine.from_path(path, model_id="gem", n_ctx=512, n_threads=1)
    yield e
    e.close()


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    from special_models import build_special_gguf

    e = LlamaCppEngine.from_path(
        build_special_gguf(tmp_path_factory.mktemp("m") / "l3.gguf", "llama3"), model_id="l3", n_ctx=512, n_threads=1
    )
    yield e
    e.close()


@pytest.fixture(scope="module")
def qwen(random_gguf):
    """The tiny model with Qwen-style FIM tokens."""
    e = LlamaCppEngine.from_path(random_gguf, model_id="tiny", n_ctx=512, n_threads=1)
    yield e
    e.close()


@contextmanager
def client(engine, **settings):
    s = load_settings(**settings)
    accounts = Accounts(open_db())
    holder = KeptHolder(engine.model_id)
    holder.set(engine)
    app = create_app(s, holder=holder, accounts=accounts)
    _, tok = accounts.create_token("alice")
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {tok}"
        yield c


def ids_of(engine, text):
    return engine.encode([Part(text)], bos=False)


# -- control tokens only where the template puts them; BOS once (issue 13 items 3, 5) -----------
def test_user_text_never_becomes_a_control_token(gemma):
    eos = gemma._model.token_eos()
    turn = gemma.encode([Part("<start_of_turn>", True)], bos=False)
    chat = chat_template_for(gemma.metadata, gemma.has_token, gemma.token_text)
    p = prompts.build_chat(gemma, chat, [{"role": "user", "content": "if tok == '<eos>' or t == '<start_of_turn>':"}], 16)
    assert eos not in p.ids  # the user's `<eos>` is text
    assert p.ids.count(turn[0]) == 2  # the template's own two turn openers are control tokens
    f = FimInput("x = '<eos>'", "")
    assert eos not in prompts.build_fim(gemma, None, f, 16).ids


def test_bos_once(gemma):
    bos = gemma._model.token_bos()
    chat = chat_template_for(gemma.metadata, gemma.has_token, gemma.token_text)
    assert chat.source.startswith("{{ bos_token }}")
    ids = prompts.build_chat(gemma, chat, [{"role": "user", "content": "hi"}], 16).ids
    assert ids[0] == bos and ids[1] != bos  # the template writes BOS and the model adds one: [2, 2, ...] before
    assert gemma.tokenize("<bos>def")[:2] == [bos, *ids_of(gemma, "def")[:1]]
    assert gemma.tokenize("def")[0] == bos  # and BOS is still added where the text has none


def test_chat_format_of_a_gguf_without_template(gemma, llama3):
    for engine, name in ((gemma, "gemma"), (llama3, "llama3")):
        with client(engine) as c:
            show = c.post("/api/show", json={"model": engine.model_id}).json()
            assert show["model_info"]["codemoat.chat_format"] == name
            r = c.post(
                "/v1/chat/completions",
                json={"model": engine.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            assert r.status_code == 200, r.text
    t = chat_template_for(llama3.metadata, llama3.has_token, llama3.token_text)
    ids = prompts.build_chat(llama3, t, [{"role": "user", "content": "hi"}], 16).ids
    header = llama3.encode([Part("<|start_header_id|>", True)], bos=False)[0]
    assert ids.count(header) == 2 and ids[0] == llama3._model.token_bos() and ids[1] == header


# -- control tokens never leak into text (issue 15 A6) -------------------------------------------
class Force:
    """Forces the given tokens, one per step (a random model generates what a test needs)."""

    def __init__(self, *tokens):
        self.tokens = list(tokens)
        self.step = 0

    def __call__(self, input_ids, logits):
        if self.step < len(self.tokens):
            logits[:] = -1e9
            logits[self.tokens[self.step]] = 0.0
        self.step += 1
        return logits


def generate(engine, prompt, params):
    async def run():
        out = []
        async for c in engine.stream(prompt, params):
            out.append(c)
        return out

    return asyncio.run(run())


def test_generated_control_tokens_are_not_text(gemma):
    mid = gemma.encode([Part("<|fim_middle|>", True)], bos=False)[0]
    word = ids_of(gemma, "print")
    chunks = generate(gemma, "def", SamplingParams(max_tokens=3, temperature=0, logits_processors=[Force(word[0], mid, word[0])]))
    text = "".join(c.text for c in chunks)
    assert "<|fim_middle|>" not in text and text.count("print") == 2
    assert sum(len(c.token_ids) for c in chunks) == 3  # counted all the same
    # a control token that a stop string names ends the answer
    chunks = generate(
        gemma,
        "def",
        SamplingParams(max_tokens=5, temperature=0, stop=["<|fim_middle|>"], logits_processors=[Force(word[0], mid)]),
    )
    assert "".join(c.text for c in chunks) == "print" and chunks[-1].finish_reason == "stop"


# -- greedy is reproducible whatever came before (issue 13 item 6) -------------------------------
@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Hidden size 256: wide enough that llama.cpp's sums depend on the batch a position is evaluated in."""
    from tinymodel import build_tiny_gguf

    e = LlamaCppEngine.from_path(build_tiny_gguf(tmp_path_factory.mktemp("m") / "wide.gguf", n_embd=256), n_ctx=512, n_threads=1)
    yield e
    e.close()


class FirstLogits:
    def __init__(self):
        self.logits = None

    def __call__(self, input_ids, logits):
        if self.logits is None:
            self.logits = np.array(logits, copy=True)
        return logits


def test_greedy_logits_do_not_depend_on_the_previous_request(wide):
    """A prompt that shares a cached prefix (here, with tokens the last request generated one at a
    time) gets bit-identical logits to the same prompt on a fresh cache."""
    first = wide.tokenize("def add(a, b):\n    return a + b\n" * 8)
    out = [t for c in generate(wide, first, SamplingParams(max_tokens=60, temperature=0)) for t in c.token_ids]
    again = first + out[:50] + ids_of(wide, "print(i)")[:3]
    # a sampled request in between reuses any cached prefix (cheaper); what it computed is not reused after
    generate(wide, again[:-20] + ids_of(wide, "x = 1"), SamplingParams(max_tokens=4, temperature=0.8))
    after, fresh = FirstLogits(), FirstLogits()
    generate(wide, again, SamplingParams(max_tokens=2, temperature=0, logits_processors=[after]))
    wide.logits("x")  # resets the cache
    generate(wide, again, SamplingParams(max_tokens=2, temperature=0, logits_processors=[fresh]))
    assert np.array_equal(after.logits, fresh.logits)


# -- fitting instead of 400 (issue 15 A1) --------------------------------------------------------
def llama_vscode_request():
    """llama.vscode's ordinary /infill request: 256 lines before the cursor, 64 after, 16 extra chunks."""
    prefix = "".join(f"    total = total + values[{i}] * weight_{i}  # line {i}\n" for i in range(256))
    suffix = "".join(f"    check(total, {i})\n" for i in range(64))
    extra = [
        {"filename": f"src/mod{i}.py", "text": "".join(f"def helper_{i}_{j}(x):\n    return x + {j}\n" for j in range(20))}
        for i in range(16)
    ]
    return {
        "input_prefix": prefix,
        "input_suffix": suffix,
        "input_extra": extra,
        "prompt": "    total = ",
        "n_predict": 128,
        "temperature": 0,
        "stream": False,
    }


def test_llama_vscode_request_is_fitted_not_refused(qwen):
    with client(qwen) as c:
        r = c.post("/infill", json=llama_vscode_request())
        assert r.status_code == 200, r.text
        assert 0 < r.json()["tokens_evaluated"] <= 512 - 128 and r.json()["truncated"] is True


def test_fim_keeps_the_end_of_the_prefix_and_the_start_of_the_suffix(qwen):
    req = llama_vscode_request()
    f = FimInput(
        req["input_prefix"] + req["prompt"],
        req["input_suffix"],
        extra=[FileSnippet(e["filename"], e["text"]) for e in req["input_extra"]],
    )
    p = prompts.build_fim(qwen, FIM_TEMPLATES["qwen"], f, 128)
    assert p.truncated and len(p.ids) <= 512 - 128
    assert "# line 255\n    total = <|fim_suffix|>    check(total, 0)\n" in p.text
    assert "# line 0\n" not in p.text and "check(total, 63)" not in p.text
    assert "src/mod0.py" not in p.text  # extra context gets only the room left
    # a request that fits is not touched
    small = prompts.build_fim(
        qwen, FIM_TEMPLATES["qwen"], FimInput("def f(", "):\n", extra=[FileSnippet("u.py", "x = 1")], path="m.py"), 16
    )
    assert not small.truncated and small.text == FIM_TEMPLATES["qwen"].render(
        "def f(", "):\n", [FileSnippet("u.py", "x = 1")], path="m.py"
    )
    assert small.ids == qwen.encode(FIM_TEMPLATES["qwen"].parts("def f(", "):\n", [FileSnippet("u.py", "x = 1")], path="m.py"))


def test_thousands_of_extra_files_keep_the_newest(qwen):
    extra = [FileSnippet(f"f{i}.py", f"v{i} = {i}\n" * 3) for i in range(20000)]  # ~0.7 MB, far past the context
    p = prompts.build_fim(qwen, FIM_TEMPLATES["qwen"], FimInput("x = ", "", extra=extra), 16)
    assert p.truncated and len(p.ids) <= 512 - 16
    assert "<|file_sep|>f19999.py\n" in p.text and "<|file_sep|>f0.py\n" not in p.text


@pytest.mark.parametrize("route", ["openai", "ollama", "tabby"])
def test_every_fim_route_fits(qwen, route):
    prefix, suffix = "x = 1\n" * 600, "y = 2\n" * 300
    with client(qwen) as c:
        if route == "openai":
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": prefix, "suffix": suffix, "max_tokens": 8})
        elif route == "ollama":
            r = c.post(
                "/api/generate",
                json={"model": "tiny", "prompt": prefix, "suffix": suffix, "stream": False, "options": {"num_predict": 8}},
            )
        else:
            r = c.post(
                "/v1/completions",
                json={
                    "language": "python",
                    "segments": {"prefix": prefix, "suffix": suffix},
                    "debug_options": {"return_prompt": True},
                },
            )
        assert r.status_code == 200, r.text
        if route == "tabby":
            prompt = r.json()["debug_data"]["prompt"]  # the end of the prefix, the start of the suffix
            assert (
                prompt.startswith("<|fim_prefix|>")
                and "x = 1\n<|fim_suffix|>y = 2\n" in prompt
                and prompt.endswith("<|fim_middle|>")
            )


def test_chat_keeps_the_system_message_and_the_newest_turns(qwen):
    chat = chat_template_for(qwen.metadata, qwen.has_token, qwen.token_text)
    msgs = [{"role": "system", "content": "You are terse."}]
    for i in range(40):
        msgs += [{"role": "user", "content": f"question {i} " + "word " * 20}, {"role": "assistant", "content": f"answer {i}"}]
    msgs.append({"role": "user", "content": "the last question"})
    p = prompts.build_chat(qwen, chat, msgs, 64)
    assert p.truncated and len(p.ids) <= 512 - 64
    assert p.text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert p.text.endswith("the last question<|im_end|>\n<|im_start|>assistant\n")
    assert "question 0 " not in p.text and "answer 39" in p.text
    # one message too long alone keeps its end
    p = prompts.build_chat(qwen, chat, [{"role": "user", "content": "word " * 2000 + "THE END"}], 64)
    assert p.truncated and len(p.ids) <= 512 - 64 and "THE END" in p.text
    with client(qwen) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 8})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] <= 512 - 8


@pytest.mark.parametrize("model", ["qwen", "gemma"])
def test_thousands_of_empty_turns_are_tokenised_once_and_the_fewest_dropped(model, request, monkeypatch):
    """3,000 empty turns (nothing for the character cut to drop before rendering) were rendered and tokenised
    whole at each step of the bisection that finds the fewest oldest turns to drop: 14 tokenisations of up
    to 6,000 parts (session 9). Each distinct part is tokenised once now, and the prompt is what the engine's
    own encoding of the kept turns gives, with one turn more not fitting."""
    engine = request.getfixturevalue(model)
    chat = chat_template_for(engine.metadata, engine.has_token, engine.token_text)
    turns = [{"role": ("user", "assistant")[i % 2], "content": ""} for i in range(3000)]
    system, last = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}
    parts_tokenised: list[int] = []
    real = engine.encode

    def counted(parts, bos=True):
        parts_tokenised.append(len(parts))
        return real(parts, bos)

    monkeypatch.setattr(engine, "encode", counted)
    p = prompts.build_chat(engine, chat, [system, *turns, last], 64)
    monkeypatch.undo()
    assert p.truncated and sum(parts_tokenised) <= 12, parts_tokenised  # a handful of distinct parts, once each
    kept = next(n for n in range(1, len(turns)) if engine.encode(chat.parts([system, *turns[-n:], last])) == p.ids)
    assert 0 < kept < len(turns)
    assert len(engine.encode(chat.parts([system, *turns[-kept - 1 :], last]))) > 512 - 64  # one more does not fit


def test_prompt_that_cannot_fit_is_one_error(qwen):
    from codemoat.engines.base import PromptTooLong

    with pytest.raises(PromptTooLong) as e:
        prompts.build_fim(qwen, FIM_TEMPLATES["qwen"], FimInput("a", "b"), 512)
    assert isinstance(e.value, CodemoatError) and e.value.code == "context_length_exceeded"
    with client(qwen) as c:  # OpenAI's plain completions still refuse an over-long prompt, as OpenAI does
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "def " * 700, "max_tokens": 8})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


# -- a model without FIM tokens (issue 13 item 1) ------------------------------------------------
def test_model_without_fim_tokens_keeps_context_and_says_the_suffix_is_dropped(gemma):
    with client(gemma) as c:
        show = c.post("/api/show", json={"model": "gem"}).json()
        assert "insert" not in show["capabilities"] and show["template"] == "{{ .Prompt }}"
        assert c.get("/health").json()["prompts"] == {"fim_template": None, "suffix": "dropped", "chat_format": "gemma"}
        r = c.post("/v1/completions", json={"model": "gem", "prompt": "def f(", "suffix": "):\n", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-codemoat-suffix"] == "dropped"
        r = c.post("/v1/completions", json={"model": "gem", "prompt": "def f(", "max_tokens": 2})  # no suffix: nothing dropped
        assert r.status_code == 200 and "x-codemoat-suffix" not in r.headers
        r = c.post(
            "/v1/completions",
            json={
                "language": "python",
                "debug_options": {"return_prompt": True},
                "segments": {
                    "prefix": "total = add(",
                    "suffix": ")\n",
                    "filepath": "app.py",
                    "declarations": [{"filepath": "lib/math.py", "body": "def add(a, b):\n    return a + b\n"}],
                },
            },
        )
        dbg = r.json()["debug_data"]
        assert r.headers["x-codemoat-suffix"] == "dropped" and dbg["suffix"] == "dropped"
        assert dbg["prompt"] == "# lib/math.py\ndef add(a, b):\n    return a + b\n\n# app.py\ntotal = add("
        r = c.post(
            "/infill",
            json={
                "input_prefix": "x = ",
                "input_suffix": "\n",
                "n_predict": 2,
                "input_extra": [{"filename": "u.py", "text": "y = 1\n"}],
            },
        )
        assert r.status_code == 200 and r.headers["x-codemoat-suffix"] == "dropped"


def test_model_with_fim_tokens_uses_the_suffix(qwen):
    with client(qwen) as c:
        show = c.post("/api/show", json={"model": "tiny"}).json()
        assert "insert" in show["capabilities"] and show["template"] == FIM_TEMPLATES["qwen"].go_template()
        assert c.get("/health").json()["prompts"]["suffix"] == "used"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "def f(", "suffix": "):\n", "max_tokens": 2})
        assert r.status_code == 200 and "x-codemoat-suffix" not in r.headers


def test_fim_template_that_does_not_fit_is_refused_at_start(gemma):
    with pytest.raises(CodemoatError, match="'codegemma' does not fit this model"):
        with client(gemma, **{"model.fim_template": "codegemma"}):
            pass


def test_fim_template_that_does_not_fit_stops_serve_in_one_line(tmp_path):
    """`codemoat serve --fim-template codegemma` on a model without its markers: exit 1, one line."""
    from conftest import run_cli
    from special_models import build_special_gguf

    model = build_special_gguf(tmp_path / "gemma-style.gguf", "gemma")
    r = run_cli("serve", "--model", str(model), "--port", "0", "--fim-template", "codegemma", timeout=120)
    err = [line for line in r.stderr.splitlines() if "codegemma" in line]
    assert r.returncode == 1 and len(err) == 1 and "not single tokens of its vocabulary" in err[0], r.stderr
    assert "Traceback" not in r.stderr


# -- secrets split across fields (issue 14 item 7) -----------------------------------------------
AWS = "AKIAIOSFODNN7EXAMPLE"


@pytest.mark.parametrize("route", ["openai", "tabby", "infill_extra"])
def test_secret_split_across_fields_is_caught(qwen, route):
    a, b = f'key = "{AWS[:9]}', f'{AWS[9:]}"\n'

    def send(c, first, second):
        if route == "openai":
            return c.post("/v1/completions", json={"model": "tiny", "prompt": first, "suffix": second, "max_tokens": 2})
        if route == "tabby":
            return c.post("/v1/completions", json={"language": "python", "segments": {"prefix": first, "suffix": second}})
        return c.post(
            "/infill",
            json={
                "input_prefix": "x = ",
                "n_predict": 2,
                "input_extra": [{"filename": "a.py", "text": first}, {"filename": "b.py", "text": second}],
            },
        )

    with client(qwen, **{"policy.secrets": "block"}) as c:
        r = send(c, a, b)
        assert r.status_code == 400 and "aws_access_key_id" in r.text, r.text
        r = send(c, a, "rest of the line\n")  # the halves alone are no secret
        assert r.status_code == 200, r.text


# -- an editor's unchanged context is not tokenised again (engines.tokcache) -------------------
def test_an_editors_unchanged_suffix_and_extra_files_are_tokenised_once_per_user(qwen, tokenised):
    """llama.vscode sends the text after the cursor and its ring of chunks again on every keystroke: only the
    prefix is tokenised again, for the same user only, and the prompt the engine reads is the same."""
    calls = tokenised
    suffix = "    return total\n\n\ndef refund(order):\n    pass\n" * 8
    chunk = "def helper(a, b):\n    return a * b + 1\n" * 10
    req = {
        "input_prefix": "import os\n",
        "prompt": "def main():\n    total = ",
        "input_suffix": suffix,
        "input_extra": [{"filename": "helpers.py", "text": chunk}],
        "n_predict": 4,
        "temperature": 0,
        "cache_prompt": False,
    }
    s = load_settings()
    accounts = Accounts(open_db())
    holder = KeptHolder(qwen.model_id)
    holder.set(qwen)
    app = create_app(s, holder=holder, accounts=accounts)
    alice, bob = ({"Authorization": f"Bearer {accounts.create_token(u)[1]}"} for u in ("alice", "bob"))
    with TestClient(app) as c:
        assert c.post("/infill", json=req, headers=alice).status_code == 200
        typed = {**req, "prompt": req["prompt"] + "os."}
        calls.clear()
        again = c.post("/infill", json=typed, headers=alice)
        alice_bytes = sum(calls)
        calls.clear()
        other = c.post("/infill", json=typed, headers=bob)
        bob_bytes = sum(calls)
    assert again.status_code == other.status_code == 200
    assert alice_bytes < len(suffix) < len(suffix) + len(chunk) <= bob_bytes  # bob's request tokenised all of it
    a, b = again.json(), other.json()
    assert (a["content"], a["tokens_evaluated"], a["truncated"]) == (b["content"], b["tokens_evaluated"], b["truncated"])
