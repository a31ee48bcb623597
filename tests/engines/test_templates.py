"""FIM and chat templates: each family's published format, and detection from model facts."""

import pytest

from codemoat.engines.templates import (
    FIM_TEMPLATES, ChatTemplate, FileSnippet, chat_template_for, detect_fim,
)
from codemoat.errors import CodemoatError


def vocab(*tokens):
    return lambda t: t in tokens


@pytest.mark.parametrize(
    "name, expected",
    [
        ("qwen", "<|fim_prefix|>def f(<|fim_suffix|>)\n<|fim_middle|>"),
        ("deepseek", "<｜fim▁begin｜>def f(<｜fim▁hole｜>)\n<｜fim▁end｜>"),
        ("starcoder", "<fim_prefix>def f(<fim_suffix>)\n<fim_middle>"),
        ("codellama", "<PRE> def f( <SUF>)\n <MID>"),
        ("codegemma", "<|fim_prefix|>def f(<|fim_suffix|>)\n<|fim_middle|>"),
    ],
)
def test_fim_formats(name, expected):
    assert FIM_TEMPLATES[name].render("def f(", ")\n") == expected


def test_qwen_repo_level_context():
    t = FIM_TEMPLATES["qwen"]
    p = t.render("x = helper(", ")", [FileSnippet("lib/util.py", "def helper(a):\n    return a\n")], path="app.py", repo="acme")
    assert p == (
        "<|repo_name|>acme\n<|file_sep|>lib/util.py\ndef helper(a):\n    return a\n"
        "<|file_sep|>app.py\n<|fim_prefix|>x = helper(<|fim_suffix|>)<|fim_middle|>"
    )


def test_path_comments_for_templates_without_file_tokens():
    p = FIM_TEMPLATES["deepseek"].render("a", "b", [FileSnippet("util.go", "func H() {}")], path="main.go")
    assert p.startswith("// util.go\nfunc H() {}\n\n// main.go\n<｜fim▁begin｜>a")
    p = FIM_TEMPLATES["codellama"].render("a", "b", [FileSnippet("u.py", "def h(): pass")], path="m.py")
    assert p.startswith("# u.py\ndef h(): pass\n")


@pytest.mark.parametrize(
    "meta, tokens, expected",
    [
        ({"general.architecture": "qwen2", "general.name": "Qwen2.5 Coder 1.5B"}, ("<|fim_prefix|>", "<|fim_pad|>"), "qwen"),
        ({"general.architecture": "llama", "general.name": "codemoat-tiny"}, ("<|fim_prefix|>", "<|fim_pad|>", "<|file_sep|>"), "qwen"),
        ({"general.architecture": "llama", "general.name": "deepseek-coder-1.3b-base"}, ("<｜fim▁begin｜>",), "deepseek"),
        ({"general.architecture": "starcoder2"}, ("<fim_prefix>",), "starcoder"),
        ({"general.architecture": "llama", "general.name": "CodeLlama-7b"}, ("<PRE>", "<MID>"), "codellama"),
        ({"general.architecture": "gemma", "general.name": "codegemma-2b"}, ("<|fim_prefix|>", "<|file_separator|>"), "codegemma"),
        # no name hint: the vocabulary decides, and codegemma is not mistaken for qwen
        ({"general.architecture": "llama"}, ("<|fim_prefix|>", "<|file_separator|>"), "codegemma"),
    ],
)
def test_detect_fim(meta, tokens, expected):
    assert detect_fim(meta, vocab(*tokens)).name == expected


def test_detect_fim_none_and_configured():
    assert detect_fim({"general.architecture": "llama"}, vocab()) is None
    assert detect_fim({}, vocab(), "starcoder").name == "starcoder"
    with pytest.raises(CodemoatError, match="unknown FIM template"):
        detect_fim({}, vocab(), "nonsense")


def test_chat_template_from_gguf_metadata():
    src = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    t = chat_template_for({"tokenizer.chat_template": src}, vocab(), lambda w: "</s>" if w == "eos" else "<s>")
    assert t.render([{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"
    assert "</s>" in t.stop


def test_chatml_fallback_and_plain_fallback():
    t = chat_template_for({}, vocab("<|im_start|>", "<|im_end|>"), lambda w: "")
    assert t.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    plain = chat_template_for({}, vocab(), lambda w: "")
    assert plain.render([{"role": "user", "content": "hi"}]).endswith("### User:\nhi\n\n### Assistant:\n")


def test_chat_template_errors_are_clean():
    with pytest.raises(CodemoatError, match="does not parse"):
        ChatTemplate("{% for %}")
    t = ChatTemplate("{{ raise_exception('only user messages') }}")
    with pytest.raises(CodemoatError, match="only user messages"):
        t.render([{"role": "user", "content": "x"}])
    with pytest.raises(CodemoatError, match="unknown message role"):
        ChatTemplate("x").render([{"role": "wizard", "content": "x"}])


def test_chat_template_is_sandboxed():
    t = ChatTemplate("{{ ''.__class__.__mro__ }}")
    with pytest.raises(Exception):
        t.render([{"role": "user", "content": "x"}])
