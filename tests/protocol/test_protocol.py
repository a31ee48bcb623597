"""Wire formats: what each protocol's clients send parses, and what they must not send is refused."""

import pytest
from pydantic import ValidationError

from codemoat.protocol import infill, ollama, openai, tabby
from codemoat.protocol.common import as_stop_list


def test_openai_chat_content_parts_and_unknown_fields():
    req = openai.ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]}
            ],
            "logprobs": False,
            "frequency_penalty": 0.1,  # accepted and ignored, as the reference servers do
        }
    )
    assert req.messages[0].text() == "ab"


@pytest.mark.parametrize("bad", [{"n": 2}, {"temperature": 3}, {"top_p": 0}, {"max_tokens": -1}])
def test_openai_completion_bounds(bad):
    with pytest.raises(ValidationError):
        openai.CompletionRequest.model_validate({"model": "m", "prompt": "x", **bad})


def test_stop_lists():
    assert as_stop_list(None) == [] and as_stop_list("\n") == ["\n"] and as_stop_list(["a", ""]) == ["a"]


def test_ollama_defaults_stream_and_options():
    g = ollama.GenerateRequest.model_validate(
        {"model": "m", "prompt": "p", "suffix": "s", "options": {"num_predict": 5, "stop": ["\n"]}}
    )
    assert g.stream is True and g.options.num_predict == 5
    final = ollama.generate_final("m", "", "stop", 3, 4, 10)
    assert final["done"] and final["eval_count"] == 4 and final["created_at"].endswith("Z")


def test_infill_and_tabby_shapes():
    r = infill.InfillRequest.model_validate({"input_prefix": "a", "input_extra": [{"filename": "f.py", "text": "x"}]})
    assert r.input_extra[0].filename == "f.py" and r.stream is False
    t = tabby.CompletionRequest.model_validate(
        {
            "segments": {
                "prefix": "a",
                "git_url": "https://x/y.git",
                "declarations": [{"filepath": "d.py", "body": "def d(): ..."}],
            }
        }
    )
    assert t.segments.declarations[0].filepath == "d.py"
    with pytest.raises(ValidationError):
        tabby.CompletionRequest.model_validate({"language": "python"})  # segments are required
    assert tabby.completion("cmpl-1", "x")["choices"] == [{"index": 0, "text": "x"}]


def test_error_shapes():
    assert openai.error("m", "invalid_request_error", "c") == {
        "error": {"message": "m", "type": "invalid_request_error", "param": None, "code": "c"}
    }
    assert ollama.error("m") == {"error": "m"}
    assert infill.error("m", 400, "invalid_request_error") == {
        "error": {"code": 400, "message": "m", "type": "invalid_request_error"}
    }


@pytest.mark.parametrize("text", ["", " foo", 'say "hi"\n\t\\', "naïve — 日本語 😀", "\x00\x1f\u2028", "\ud800"])
@pytest.mark.parametrize("ident", ["cmpl-0123abcd", 'odd "id" é'])
def test_a_streamed_completion_event_is_the_completion_object_encoded(text, ident, monkeypatch):
    """The pre-encoded events of a stream (`CompletionChunks`) are the bytes `completion(...)` (a chat's:
    `chat_chunk(...)`) encodes to."""
    import json

    from codemoat.serve.streaming import json_text

    monkeypatch.setattr(openai, "now", lambda: 1733370000)
    encoded = openai.CompletionChunks(ident, "codemoat-tiny", json_text)(text)
    assert encoded == json_text(openai.completion(ident, "codemoat-tiny", text, None, None))
    assert json.loads(encoded)["choices"][0]["text"] == text
    delta = openai.CompletionChunks(ident, "codemoat-tiny", json_text, chat=True)(text)
    assert delta == json_text(openai.chat_chunk(ident, "codemoat-tiny", {"content": text}, None))
    assert json.loads(delta)["choices"][0]["delta"]["content"] == text
