"""A token whose text is longer than 32 bytes (a run of 33+ spaces, a `# ----...` rule: 16 in the bundled model,
240 in Qwen2's vocabulary, 379 in Gemma's) keeps its text: llama-cpp-python's `LlamaModel.detokenize` reads each
piece into 32 bytes and dropped a longer one (`llama_token_to_piece` answers minus its length). codemoat detokenises
when it fits a prompt (a cut chat message is encoded again from its text) and in the one-at-a-time engine's
answers (model.parallel = 1). Found by reviewer V4 (session 18)."""

from __future__ import annotations

import asyncio
import ctypes

import numpy as np
import pytest

from codemoat.engines.base import SamplingParams
from codemoat.engines.llamacpp import LlamaCppEngine
from codemoat.engines.templates import Part
from codemoat.serve import prompts


def _long_piece(eng) -> tuple[int, bytes]:
    """A token of the vocabulary whose text is longer than 32 bytes, and that text."""
    lib, vocab = eng._lib, eng._vocab
    buf = ctypes.create_string_buffer(512)
    for t in range(lib.llama_vocab_n_tokens(vocab)):
        n = lib.llama_token_to_piece(vocab, t, buf, 512, 0, False)
        if n > 32 and not lib.llama_vocab_is_control(vocab, t):
            return t, buf.raw[:n]
    pytest.skip("no piece over 32 bytes in this vocabulary")


@pytest.fixture(scope="module", params=[1, 2], ids=["one-at-a-time", "batched"])
def eng(request, tiny_gguf):
    e = LlamaCppEngine.from_path(tiny_gguf, model_id="tiny", n_ctx=512, n_threads=1, parallel=request.param)
    yield e
    e.close()


def test_detokenize_keeps_a_long_piece(eng):
    tok, text = _long_piece(eng)
    assert eng.detokenize([tok]).encode() == text
    src = "x = f(a,\n" + " " * 36 + "b)\n# " + "-" * 64 + "\n"
    assert eng.detokenize(eng.encode([Part(src)], bos=False)) == src


def test_a_cut_chat_message_keeps_its_whitespace_runs(eng):
    """build_chat keeps the newest message's end by detokenising its last tokens and encoding that again:
    what the model reads must be the end of what the client sent."""
    from codemoat.engines.chat_templates import chat_template_for

    chat = chat_template_for(eng.metadata, eng.has_token, eng.token_text, None)
    line = "call(a,\n" + " " * 40 + "b)  # " + "-" * 64 + "\n"
    content = line * 60  # far past 512 tokens
    p = prompts.build_chat(eng, chat, [{"role": "user", "content": content}], 16)
    assert p.truncated
    kept = p.text.split(line[:8], 1)[1]  # from the first whole call( on
    assert line[8:] in p.text, "a 40-space run or the comment rule is missing from the prompt the model reads"
    assert kept


def test_an_answer_keeps_a_long_piece(eng):
    """The generated token's text is in the answer (a logits processor makes the model pick it, then end)."""
    tok, text = _long_piece(eng)
    eog = eng._lib.llama_vocab_eos(eng._vocab)

    def force(input_ids, scores):
        out = np.full_like(scores, -1e9)
        out[tok if len(input_ids) and input_ids[-1] != tok else eog] = 0
        return out

    async def answer() -> str:
        p = SamplingParams(max_tokens=2, temperature=0, logits_processors=[force])
        parts = []
        async for ch in eng.stream(eng.encode([Part("def f():")]), p):
            parts.append(ch.text)
        return "".join(parts)

    assert asyncio.run(answer()).encode().startswith(text)


def test_an_id_outside_the_vocabulary_has_no_text(eng):
    """A token id that is not one of the model's (never produced by its tokenizer or sampler) is no text, not a read
    past llama.cpp's table."""
    n = eng._lib.llama_vocab_n_tokens(eng._vocab)
    assert eng.piece(n) == b"" and eng.piece(-1) == b"" and eng.piece(10**9) == b""
    assert eng.detokenize([n, 10**9]) == ""


def test_bos_and_eos_texts_are_read_whole(eng):
    """`token_text` (the chat templates' BOS/EOS) reads the piece as `piece` does, not into 32 bytes."""
    lib, vocab = eng._lib, eng._vocab
    for which, tid in (("bos", lib.llama_vocab_bos(vocab)), ("eos", lib.llama_vocab_eos(vocab))):
        if tid < 0:
            continue
        n = lib.llama_token_to_piece(vocab, tid, None, 0, 0, True)
        buf = ctypes.create_string_buffer(max(-n, n, 1))
        n = lib.llama_token_to_piece(vocab, tid, buf, len(buf), 0, True)
        assert eng.token_text(which) == buf.raw[:n].decode("utf-8", "replace")
