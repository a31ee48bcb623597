"""Prompt templates for fill-in-the-middle, per model family (chat templates: `engines.chat_templates`).

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
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import CodemoatError


@dataclass(frozen=True)
class Part:
    """A piece of a prompt. Only a template's own markers are `special` (tokenised with control
    tokens parsed); a user's text never is, so `<eos>` written in source code stays text."""

    text: str
    special: bool = False


def text_of(parts: Iterable[Part]) -> str:
    return "".join(p.text for p in parts)


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

    def parts(
        self,
        prefix: str,
        suffix: str = "",
        extra: Sequence[FileSnippet] = (),
        path: str | None = None,
        repo: str | None = None,
    ) -> list[Part]:
        """The prompt as parts: the template's markers are special tokens, everything else is text
        (a user's `<eos>` stays text; see `Part`)."""
        out = self._context(extra, path, repo)
        if self.spaced:
            out += [
                Part(self.prefix, True),
                Part(f" {prefix} "),
                Part(self.suffix, True),
                Part(f"{suffix} "),
                Part(self.middle, True),
            ]
        else:
            out += [Part(self.prefix, True), Part(prefix), Part(self.suffix, True), Part(suffix), Part(self.middle, True)]
        return out

    def render(
        self,
        prefix: str,
        suffix: str = "",
        extra: Sequence[FileSnippet] = (),
        path: str | None = None,
        repo: str | None = None,
    ) -> str:
        """The prompt for completing between `prefix` and `suffix`, with `extra` files as context."""
        return text_of(self.parts(prefix, suffix, extra, path, repo))

    def _context(self, extra: Sequence[FileSnippet], path: str | None, repo: str | None) -> list[Part]:
        if not extra:
            return []
        if not self.file_sep:
            return [Part(path_comments(extra, path))]
        parts = []
        if self.repo_name and repo:
            parts += [Part(self.repo_name, True), Part(f"{repo}\n")]
        for s in extra:
            parts += [Part(self.file_sep, True), Part(f"{s.path}\n{s.text.rstrip()}\n")]
        if path:
            parts += [Part(self.file_sep, True), Part(f"{path}\n")]
        return parts

    def go_template(self) -> str:
        """The template as Ollama's `/api/show` gives it (a Go template over `.Prompt` and `.Suffix`)."""
        if self.spaced:
            fim = f"{self.prefix} {{{{ .Prompt }}}} {self.suffix}{{{{ .Suffix }}}} {self.middle}"
        else:
            fim = f"{self.prefix}{{{{ .Prompt }}}}{self.suffix}{{{{ .Suffix }}}}{self.middle}"
        return f"{{{{- if .Suffix }}}}{fim}{{{{- else }}}}{{{{ .Prompt }}}}{{{{- end }}}}"


def path_comments(extra: Sequence[FileSnippet], path: str | None = None) -> str:
    """Other files as path-commented text (for templates without file tokens, and models without FIM)."""
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
            "qwen",
            "<|fim_prefix|>",
            "<|fim_suffix|>",
            "<|fim_middle|>",
            stop=(
                "<|endoftext|>",
                "<|fim_prefix|>",
                "<|fim_suffix|>",
                "<|fim_middle|>",
                "<|fim_pad|>",
                "<|file_sep|>",
                "<|repo_name|>",
                "<|im_end|>",
            ),
            file_sep="<|file_sep|>",
            repo_name="<|repo_name|>",
            markers=("<|fim_prefix|>", "<|fim_pad|>"),
        ),
        FimTemplate(
            "deepseek",
            "<｜fim▁begin｜>",
            "<｜fim▁hole｜>",
            "<｜fim▁end｜>",
            stop=("<｜end▁of▁sentence｜>", "<|EOT|>", "<｜fim▁begin｜>"),
            markers=("<｜fim▁begin｜>",),
        ),
        FimTemplate(
            "starcoder",
            "<fim_prefix>",
            "<fim_suffix>",
            "<fim_middle>",
            stop=("<|endoftext|>", "<file_sep>", "<fim_prefix>", "<fim_middle>"),
            file_sep="<file_sep>",
            repo_name="<repo_name>",
            markers=("<fim_prefix>",),
        ),
        FimTemplate(
            "codellama",
            "<PRE>",
            "<SUF>",
            "<MID>",
            stop=("<EOT>", "</s>"),
            spaced=True,
            markers=("<PRE>", "<MID>"),
        ),
        FimTemplate(
            "codegemma",
            "<|fim_prefix|>",
            "<|fim_suffix|>",
            "<|fim_middle|>",
            stop=("<|file_separator|>", "<|fim_prefix|>", "<end_of_turn>", "<eos>"),
            file_sep="<|file_separator|>",
            markers=("<|fim_prefix|>", "<|file_separator|>"),
        ),
    ]
}


def fits_vocab(t: FimTemplate, has_token: Callable[[str], bool], strict: bool = False) -> FimTemplate | None:
    """`t` when its prefix/suffix/middle markers are single tokens of the vocabulary (else None);
    without file tokens, other files go in as path comments instead. `strict` (detection) also
    needs the family's distinguishing `markers` (CodeGemma and Qwen share `<|fim_prefix|>`)."""
    needed = (t.prefix, t.suffix, t.middle, *(t.markers if strict else ()))
    if not all(has_token(m) for m in needed):
        return None
    if t.file_sep and not has_token(t.file_sep):
        return replace(t, file_sep=None, repo_name=None)
    if t.repo_name and not has_token(t.repo_name):
        return replace(t, repo_name=None)
    return t


def detect_fim(metadata: dict[str, Any], has_token: Callable[[str], bool], configured: str | None = None) -> FimTemplate | None:
    """The FIM template for a model: configured, else from its architecture/name, else from the
    special tokens in its vocabulary. None when the model has no FIM tokens at all. A configured
    template whose markers are not single tokens of this model is refused (the markers would
    otherwise be split into ordinary text, and the model would see noise)."""
    if configured:
        try:
            t = FIM_TEMPLATES[configured]
        except KeyError:
            raise CodemoatError(f"unknown FIM template {configured!r}: choose from {', '.join(FIM_TEMPLATES)}") from None
        fitted = fits_vocab(t, has_token)
        if fitted is None:
            missing = [m for m in (t.prefix, t.suffix, t.middle) if not has_token(m)]
            usable = [n for n, c in FIM_TEMPLATES.items() if fits_vocab(c, has_token)]
            raise CodemoatError(
                f"FIM template {configured!r} does not fit this model: {', '.join(missing)} "
                f"{'is not a single token' if len(missing) == 1 else 'are not single tokens'} of its vocabulary "
                f"(templates that fit: {', '.join(usable) or 'none, the model has no FIM tokens'})"
            )
        return fitted
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
    if by_meta and (t := fits_vocab(FIM_TEMPLATES[by_meta], has_token, strict=True)):
        return t
    # Vocabulary decides: order matters (codegemma and qwen share <|fim_prefix|>).
    for cand in ("codegemma", "qwen", "deepseek", "starcoder", "codellama"):
        if t := fits_vocab(FIM_TEMPLATES[cand], has_token, strict=True):
            return t
    return None
