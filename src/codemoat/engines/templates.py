"""Prompt templates: fill-in-the-middle per model family, and chat via the model's own Jinja template.

FIM formats follow each model's published card:
- Qwen2.5-Coder: `<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>`; repository context as
  `<|repo_name|>R\\n<|file_sep|>path\\ncode...` before it (Qwen2.5-Coder technical report, §3).
- DeepSeek-Coder: `<｜fim▁begin｜>P<｜fim▁hole｜>S<｜fim▁end｜>`.
- StarCoder / StarCoder2: `<fim_prefix>P<fim_suffix>S<fim_middle>`; StarCoder2 joins files with `<file_sep>`.
- CodeLlama: `<PRE> P <SUF>S <MID>` (Rozière et al. 2023, "Code Llama", §2.3).
- CodeGemma: `<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>`, files joined by `<|file_separator|>`.
Clients send raw prefix and suffix; the server picks the template from the model's metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import CodemoatError


@dataclass(frozen=True)
class FileSnippet:
    """Cross-file context: a path and some of its text."""

    path: str
    text: str


@dataclass(frozen=True)
class FimTemplate:
    name: str
    prefix: str
    suffix: str
    middle: str
    stop: tuple[str, ...]
    #: how other files are joined in front of the prompt: "file_sep" tokens or path comments
    file_sep: str | None = None
    repo_name: str | None = None
    #: CodeLlama puts a space after its sentinels
    spaced: bool = False
    markers: tuple[str, ...] = field(default=())

    def render(
        self,
        prefix: str,
        suffix: str = "",
        extra: Sequence[FileSnippet] = (),
        path: str | None = None,
        repo: str | None = None,
    ) -> str:
        """The prompt for completing between `prefix` and `suffix`, with `extra` files as context."""
        head = self._context(extra, path, repo)
        if self.spaced:
            return f"{head}{self.prefix} {prefix} {self.suffix}{suffix} {self.middle}"
        return f"{head}{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}"

    def _context(self, extra: Sequence[FileSnippet], path: str | None, repo: str | None) -> str:
        if not extra:
            return ""
        if self.file_sep:
            parts = []
            if self.repo_name and repo:
                parts.append(f"{self.repo_name}{repo}\n")
            for s in extra:
                parts.append(f"{self.file_sep}{s.path}\n{s.text.rstrip()}\n")
            if path:
                parts.append(f"{self.file_sep}{path}\n")
            return "".join(parts)
        return "".join(f"{comment_for(s.path)} {s.path}\n{s.text.rstrip()}\n\n" for s in extra) + (
            f"{comment_for(path)} {path}\n" if path else ""
        )


def comment_for(path: str | None) -> str:
    """Line-comment marker for a file's language (path comments for templates without file tokens)."""
    ext = (path or "").rsplit(".", 1)[-1].lower()
    if ext in {"py", "rb", "sh", "bash", "yaml", "yml", "toml", "r", "pl", "ex", "exs", "jl", "cmake", "mk"}:
        return "#"
    if ext in {"sql", "lua", "hs"}:
        return "--"
    return "//"


FIM_TEMPLATES: dict[str, FimTemplate] = {
    t.name: t
    for t in [
        FimTemplate(
            "qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
            stop=("<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|im_end|>"),
            file_sep="<|file_sep|>", repo_name="<|repo_name|>",
            markers=("<|fim_prefix|>", "<|fim_pad|>"),
        ),
        FimTemplate(
            "deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>",
            stop=("<｜end▁of▁sentence｜>", "<|EOT|>", "<｜fim▁begin｜>"),
            markers=("<｜fim▁begin｜>",),
        ),
        FimTemplate(
            "starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>",
            stop=("<|endoftext|>", "<file_sep>", "<fim_prefix>", "<fim_middle>"),
            file_sep="<file_sep>", repo_name="<repo_name>",
            markers=("<fim_prefix>",),
        ),
        FimTemplate(
            "codellama", "<PRE>", "<SUF>", "<MID>", stop=("<EOT>", "</s>"), spaced=True, markers=("<PRE>", "<MID>"),
        ),
        FimTemplate(
            "codegemma", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
            stop=("<|file_separator|>", "<|fim_prefix|>", "<end_of_turn>", "<eos>"),
            file_sep="<|file_separator|>",
            markers=("<|fim_prefix|>", "<|file_separator|>"),
        ),
    ]
}


def detect_fim(metadata: dict[str, Any], has_token: Callable[[str], bool], configured: str | None = None) -> FimTemplate | None:
    """The FIM template for a model: configured, else from its architecture/name, else from the
    special tokens in its vocabulary. None when the model has no FIM tokens at all."""
    if configured:
        try:
            return FIM_TEMPLATES[configured]
        except KeyError:
            raise CodemoatError(f"unknown FIM template {configured!r}: choose from {', '.join(FIM_TEMPLATES)}") from None
    arch = str(metadata.get("general.architecture", "")).lower()
    name = str(metadata.get("general.name", "")).lower() + " " + str(metadata.get("general.basename", "")).lower()
    by_meta = None
    if arch == "gemma" or "codegemma" in name:
        by_meta = "codegemma"
    elif arch in {"starcoder", "starcoder2", "gpt_bigcode"} or "starcoder" in name:
        by_meta = "starcoder"
    elif "deepseek" in name:
        by_meta = "deepseek"
    elif "codellama" in name or "code llama" in name:
        by_meta = "codellama"
    elif arch == "qwen2" or "qwen" in name:
        by_meta = "qwen"
    if by_meta and all(has_token(m) for m in FIM_TEMPLATES[by_meta].markers):
        return FIM_TEMPLATES[by_meta]
    # Vocabulary decides: order matters (codegemma and qwen share <|fim_prefix|>).
    for cand in ("codegemma", "qwen", "deepseek", "starcoder", "codellama"):
        t = FIM_TEMPLATES[cand]
        if all(has_token(m) for m in t.markers):
            return t
    return None


# ---------------------------------------------------------------- chat -----
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_CHAT = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


class ChatTemplate:
    """A Jinja2 chat template (the GGUF's `tokenizer.chat_template`), rendered in a sandbox."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", stop: Iterable[str] = ()):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str) -> None:
            raise CodemoatError(f"chat template: {msg}")

        env.globals["raise_exception"] = raise_exception
        try:
            self._t = env.from_string(source)
        except TemplateError as e:
            raise CodemoatError(f"chat template does not parse: {e}") from None
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.stop = tuple(s for s in stop if s)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        for m in messages:
            if m.get("role") not in {"system", "user", "assistant", "tool"}:
                raise CodemoatError(f"unknown message role {m.get('role')!r}")
        try:
            return self._t.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise CodemoatError(f"chat template failed: {e}") from None


def chat_template_for(metadata: dict[str, Any], has_token: Callable[[str], bool], token_text: Callable[[str], str], configured: str | None = None) -> ChatTemplate:
    """The configured template, else the model's own, else ChatML when its tokens exist, else plain text."""
    bos = token_text("bos")
    eos = token_text("eos")
    src = configured or metadata.get("tokenizer.chat_template")
    if src:
        stops = [eos] + [t for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|EOT|>", "<|endoftext|>") if has_token(t)]
        return ChatTemplate(str(src), bos, eos, stops)
    if has_token("<|im_start|>") and has_token("<|im_end|>"):
        return ChatTemplate(CHATML, bos, eos, ["<|im_end|>", eos, "<|endoftext|>"])
    return ChatTemplate(PLAIN_CHAT, bos, eos, ["### User:", eos, "<|endoftext|>", "<|file_sep|>"])
