"""FIM and chat templates: each family's published format, and detection from model facts."""

import pytest

from codemoat.engines.chat_templates import ChatTemplate, chat_template_for
from codemoat.engines.templates import FIM_TEMPLATES, FileSnippet, detect_fim
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


QWEN = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>")
DEEPSEEK = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")
STARCODER = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
CODELLAMA = ("<PRE>", "<SUF>", "<MID>")
CODEGEMMA = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>")


@pytest.mark.parametrize(
    "meta, tokens, expected",
    [
        ({"general.architecture": "qwen2", "general.name": "Qwen2.5 Coder 1.5B"}, QWEN, "qwen"),
        ({"general.architecture": "llama", "general.name": "codemoat-tiny"}, (*QWEN, "<|file_sep|>"), "qwen"),
        ({"general.architecture": "llama", "general.name": "deepseek-coder-1.3b-base"}, DEEPSEEK, "deepseek"),
        ({"general.architecture": "starcoder2"}, STARCODER, "starcoder"),
        ({"general.architecture": "llama", "general.name": "CodeLlama-7b"}, CODELLAMA, "codellama"),
        ({"general.architecture": "gemma", "general.name": "codegemma-2b"}, CODEGEMMA, "codegemma"),
        # no name hint: the vocabulary decides, and codegemma is not mistaken for qwen
        ({"general.architecture": "llama"}, CODEGEMMA, "codegemma"),
    ],
)
def test_detect_fim(meta, tokens, expected):
    assert detect_fim(meta, vocab(*tokens)).name == expected


def test_detect_fim_none_and_configured():
    assert detect_fim({"general.architecture": "llama"}, vocab()) is None
    assert detect_fim({}, vocab(*STARCODER), "starcoder").name == "starcoder"
    with pytest.raises(CodemoatError, match="unknown FIM template"):
        detect_fim({}, vocab(), "nonsense")


def test_detect_fim_needs_all_three_markers():
    # a Gemma 3 vocabulary: <|fim_prefix|> and friends are absent, so no FIM template however it is named
    assert (
        detect_fim({"general.architecture": "gemma3", "general.name": "gemma-3-270m"}, vocab("<start_of_turn>", "<end_of_turn>"))
        is None
    )
    assert detect_fim({"general.architecture": "gemma"}, vocab("<|fim_prefix|>", "<|file_separator|>")) is None


def test_configured_fim_template_must_fit_the_vocabulary():
    """--fim-template codegemma on a model without its marker tokens is refused in one line (they
    would be split into ordinary text), naming the templates that do fit."""
    with pytest.raises(
        CodemoatError, match=r"'codegemma' does not fit this model: .*<\|fim_prefix\|>.*templates that fit: starcoder"
    ) as e:
        detect_fim({}, vocab(*STARCODER), "codegemma")
    assert "\n" not in str(e.value)
    with pytest.raises(CodemoatError, match="none, the model has no FIM tokens"):
        detect_fim({}, vocab("<start_of_turn>"), "qwen")
    # without its file token, a template still fits; other files then go in as path comments
    t = detect_fim({}, vocab("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), "codegemma")
    assert t.file_sep is None
    assert t.render("a", "b", [FileSnippet("u.py", "x = 1")], path="m.py").startswith("# u.py\nx = 1\n\n# m.py\n<|fim_prefix|>a")


def test_fim_parts_mark_only_the_template_markers_special():
    parts = FIM_TEMPLATES["qwen"].parts("x = '<|fim_middle|>' # ", "<eos>", [FileSnippet("u.py", "<|file_sep|>")], path="m.py")
    assert [p.text for p in parts if p.special] == [
        "<|file_sep|>",
        "<|file_sep|>",
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
    ]
    assert [p.text for p in parts if not p.special] == ["u.py\n<|file_sep|>\n", "m.py\n", "x = '<|fim_middle|>' # ", "<eos>"]


def test_go_template_is_the_template_in_use():
    assert FIM_TEMPLATES["codegemma"].go_template() == (
        "{{- if .Suffix }}<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>{{- else }}{{ .Prompt }}{{- end }}"
    )
    assert "<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>" in FIM_TEMPLATES["codellama"].go_template()


def test_chat_template_from_gguf_metadata():
    src = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    t = chat_template_for({"tokenizer.chat_template": src}, vocab(), lambda w: "</s>" if w == "eos" else "<s>")
    assert t.render([{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"
    assert "</s>" in t.stop


def test_chatml_fallback_and_plain_fallback():
    t = chat_template_for({}, vocab("<|im_start|>", "<|im_end|>"), lambda w: "")
    assert t.name == "chatml"
    assert t.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    plain = chat_template_for({}, vocab(), lambda w: "")
    assert plain.name == "plain"
    assert plain.render([{"role": "user", "content": "hi"}]).endswith("### User:\nhi\n\n### Assistant:\n")


MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "more"},
]


@pytest.mark.parametrize(
    "tokens, name, expected, stop",
    [
        # Gemma: no system role (it opens the first user turn), model turns, BOS from the template
        (
            ("<start_of_turn>", "<end_of_turn>"),
            "gemma",
            "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>\n"
            "<start_of_turn>user\nmore<end_of_turn>\n<start_of_turn>model\n",
            "<end_of_turn>",
        ),
        (
            ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            "llama3",
            "<bos><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nmore<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "<|eot_id|>",
        ),
        (("[INST]", "[/INST]"), "mistral", "<bos>[INST] Be brief.\n\nhi [/INST]yo<eos>[INST] more [/INST]", "[INST]"),
        (
            ("<|user|>", "<|assistant|>", "<|end|>"),
            "phi3",
            "<|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nyo<|end|>\n<|user|>\nmore<|end|>\n<|assistant|>\n",
            "<|end|>",
        ),
        (
            ("<|EOT|>", "<｜fim▁begin｜>"),
            "deepseek-coder",
            "<bos>Be brief.\n### Instruction:\nhi\n### Response:\nyo\n<|EOT|>\n### Instruction:\nmore\n### Response:\n",
            "<|EOT|>",
        ),
    ],
)
def test_chat_family_recognised_by_its_turn_tokens(tokens, name, expected, stop):
    """A GGUF without tokenizer.chat_template gets its family's format, not a made-up one, and says which."""
    t = chat_template_for({}, vocab(*tokens), lambda w: "<bos>" if w == "bos" else "<eos>")
    assert t.name == name
    assert t.render(MSGS) == expected
    assert stop in t.stop


def test_the_models_own_template_wins_and_is_named():
    t = chat_template_for(
        {"tokenizer.chat_template": "{{ messages[0]['content'] }}"}, vocab("<start_of_turn>", "<end_of_turn>"), lambda w: ""
    )
    assert t.name == "model"


def test_chat_parts_never_mark_message_text_special():
    """The template's text is special (its turn tokens are parsed), what users wrote never is."""
    t = chat_template_for({}, vocab("<start_of_turn>", "<end_of_turn>"), lambda w: "<bos>" if w == "bos" else "<eos>")
    msgs = [{"role": "user", "content": "x = '<end_of_turn>' <eos>"}]
    parts = t.parts(msgs)
    assert "".join(p.text for p in parts) == t.render(msgs)
    assert [p.text for p in parts if not p.special] == ["x = '<end_of_turn>' <eos>"]
    # a template that trims the content is followed
    trims = ChatTemplate("[{% for m in messages %}{{ m['content'] | trim }}{% endfor %}]")
    parts = trims.parts([{"role": "user", "content": "  a <eos>  "}])
    assert [(p.text, p.special) for p in parts] == [("[", True), ("a <eos>", False), ("]", True)]


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
    with pytest.raises(CodemoatError, match="unsafe"):
        t.render([{"role": "user", "content": "x"}])
