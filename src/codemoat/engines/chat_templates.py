"""Chat templates: the model's own Jinja template (`tokenizer.chat_template`) rendered in a sandbox, or,
for a GGUF without one, a known family's format recognised by its turn tokens.

`ChatTemplate.parts` keeps the template's text (special tokens parsed) apart from each message's
content (never parsed), so a user cannot write a turn token. Fill-in-the-middle templates are in
`engines.templates`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import CodemoatError
from .templates import Part, text_of

# Chat formats for GGUFs without `tokenizer.chat_template`, recognised by their turn tokens. Each
# follows its model card's template (the Jinja in the family's tokenizer_config.json), written
# with `{{ "\n" }}` so that trim_blocks cannot eat a newline the format needs.
CHAT_FORMATS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    # name: (tokens that identify it, template, stop strings)
    "gemma": (
        ("<start_of_turn>", "<end_of_turn>"),
        (
            "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}"
            "{% if m['role'] == 'system' %}{% set ns.sys = ns.sys + m['content'] + '\n\n' %}"
            "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}{{ '\n' }}"
            "{% if m['role'] != 'assistant' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}"
            "{{ m['content'] }}<end_of_turn>{{ '\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model{{ '\n' }}{% endif %}"
        ),
        ("<end_of_turn>", "<start_of_turn>"),
    ),
    "llama3": (
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        (
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ '\n\n' }}"
            "{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{{ '\n\n' }}{% endif %}"
        ),
        ("<|eot_id|>", "<|start_header_id|>"),
    ),
    "chatml": (
        ("<|im_start|>", "<|im_end|>"),
        (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\n' }}{{ m['content'] }}<|im_end|>{{ '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
        ),
        ("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
    ),
    "phi3": (
        ("<|user|>", "<|assistant|>", "<|end|>"),
        (
            "{% for m in messages %}<|{{ m['role'] }}|>{{ '\n' }}{{ m['content'] }}<|end|>{{ '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{{ '\n' }}{% endif %}"
        ),
        ("<|end|>", "<|user|>", "<|endoftext|>"),
    ),
    "mistral": (
        ("[INST]", "[/INST]"),
        (
            "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}"
            "{% if m['role'] == 'system' %}{% set ns.sys = ns.sys + m['content'] + '\n\n' %}"
            "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
            "{% else %}[INST] {{ ns.sys }}{% set ns.sys = '' %}{{ m['content'] }} [/INST]{% endif %}{% endfor %}"
        ),
        ("[INST]",),
    ),
    # DeepSeek-Coder instruct: "### Instruction:" / "### Response:" turns, each answer ended by <|EOT|>
    "deepseek-coder": (
        ("<|EOT|>",),
        (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{{ '\n' }}"
            "{% elif m['role'] == 'assistant' %}### Response:{{ '\n' }}{{ m['content'] }}{{ '\n' }}<|EOT|>{{ '\n' }}"
            "{% else %}### Instruction:{{ '\n' }}{{ m['content'] }}{{ '\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}### Response:{{ '\n' }}{% endif %}"
        ),
        ("<|EOT|>", "### Instruction:"),
    ),
}
CHATML = CHAT_FORMATS["chatml"][1]
PLAIN_CHAT = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
# Stands in for a message's content while the template is rendered, so that the template's own
# text (special tokens parsed) and the user's (never parsed) can be told apart afterwards.
_SLOT = "\ue000{}\ue001"
_SLOT_RE = re.compile("\ue000(\\d+)\ue001")


class ChatTemplate:
    """A Jinja2 chat template (the GGUF's `tokenizer.chat_template`), rendered in a sandbox."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", stop: Iterable[str] = (), name: str = "custom"):
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
        self.name = name
        self.bos_token, self.eos_token = bos_token, eos_token
        self.stop = tuple(dict.fromkeys(s for s in stop if s))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        for m in messages:
            if m.get("role") not in {"system", "user", "assistant", "tool"}:
                raise CodemoatError(f"unknown message role {m.get('role')!r}")
        try:
            return self._t.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise CodemoatError(f"chat template failed: {e}") from None

    def parts(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[Part]:
        """The rendered prompt as parts: the template's text is special, each message's content is
        not. Templates that trim the content are followed (found by rendering with the real text)."""
        slotted = [{**m, "content": _SLOT.format(i)} for i, m in enumerate(messages)]
        shape = self.render(slotted, add_generation_prompt)
        real = self.render(messages, add_generation_prompt)

        def fill(strip: bool) -> list[Part]:
            out: list[Part] = []
            pos = 0
            for m in _SLOT_RE.finditer(shape):
                if m.start() > pos:
                    out.append(Part(shape[pos : m.start()], True))
                c = str(messages[int(m.group(1))]["content"])
                out.append(Part(c.strip() if strip else c))
                pos = m.end()
            if pos < len(shape):
                out.append(Part(shape[pos:], True))
            return out

        exact = fill(False)
        if text_of(exact) != real:
            trimmed = fill(True)
            if text_of(trimmed) == real:
                return trimmed
        return exact


def chat_template_for(
    metadata: dict[str, Any], has_token: Callable[[str], bool], token_text: Callable[[str], str], configured: str | None = None
) -> ChatTemplate:
    """The configured template, else the model's own, else a known family's recognised by its turn
    tokens (Gemma, Llama 3, ChatML, Phi-3, Mistral, DeepSeek-Coder), else plain text. `name` says which."""
    bos = token_text("bos")
    eos = token_text("eos")
    src = configured or metadata.get("tokenizer.chat_template")
    if src:
        stops = [eos] + [
            t for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|EOT|>", "<|endoftext|>", "<|end|>") if has_token(t)
        ]
        return ChatTemplate(str(src), bos, eos, stops, name="configured" if configured else "model")
    for name, (tokens, template, stops) in CHAT_FORMATS.items():
        if all(has_token(t) for t in tokens):
            return ChatTemplate(template, bos, eos, [*stops, eos], name=name)
    return ChatTemplate(PLAIN_CHAT, bos, eos, ["### User:", eos, "<|endoftext|>", "<|file_sep|>"], name="plain")
