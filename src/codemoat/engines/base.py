"""The one interface every inference engine implements.

An engine turns a prompt into tokens. Adding one is one class and one registry entry
(`codemoat.engines.ENGINES`); heavy imports (llama_cpp, torch, vllm) stay inside its module.

    class MyEngine(Engine):
        name = "mine"
        async def stream(self, prompt, params):       # the only generation method to write
            for piece in ...:
                yield Chunk(text=piece, token_ids=[...])
            yield Chunk(text="", finish_reason="stop")
        def tokenize(self, text, special=True): ...
        def detokenize(self, ids): ...

`stream` is an async iterator so that a batching engine (vLLM) can interleave many requests;
engines that generate synchronously run in a worker thread and check `cancelled` between tokens,
so a client that disconnects stops its generation.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np

from ..errors import CodemoatError, Unavailable

if TYPE_CHECKING:
    from .memfd import MemfdBuffer


class LogitsProcessor(Protocol):
    """Rewrites next-token logits in place or returns new ones; `input_ids` is prompt + generated so far.

    Processors run in order on every sampled token (watermarking, grammar, bans).
    """

    def __call__(self, input_ids: Sequence[int], logits: np.ndarray) -> np.ndarray: ...


#: llama.cpp's LLAMA_DEFAULT_SEED: the seed its sampler (and its server) takes as "pick one at random"
RANDOM_SEED = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """How to sample one generation. `temperature == 0` means greedy."""

    max_tokens: int = 64
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    # Opaque per-request watermark settings (codemoat.trace); engines that cannot apply a
    # per-request processor (vLLM) key a start-up processor on it instead.
    watermark: Any | None = None
    # llama.cpp server's `t_max_predict_ms`: once this many ms have passed since the first generated
    # token, generation ends at the next token that holds a newline (editors stay responsive and
    # still get whole lines). None: no time limit.
    time_limit_ms: float | None = None
    # llama.cpp server's `n_indent`: a generated line after the first whose indentation (spaces and
    # tabs) is less than this ends generation, cut before its first other character. 0: off.
    n_indent: int = 0
    # the LoRA adapter this request is served with (a name the engine loaded; None: the base model)
    adapter: str | None = None
    # whose cached prompt this request may reuse: the server sets the caller's user, and an engine
    # reuses KV cells (a prefix another request left) only between requests with the same key, so
    # no one learns from the time to first token that someone else sent a prefix (a secret in a file)
    cache_key: str | None = None
    # when (`time.monotonic()`, one clock for every process of the machine) a request still waiting for a
    # slot is refused with `Overloaded` instead (`server.max_queue_wait_s`); None: it waits as long as it takes
    queue_deadline: float | None = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # it crosses to the engine process with every request: as its fields in order, not a dict of them
        # (pickled in 2 µs, not 18; unpickled in 50 µs, not 61, on the caches a 60 MB model's decode leaves)
        return (SamplingParams, tuple(getattr(self, f) for f in _PARAM_FIELDS))


_PARAM_FIELDS = tuple(f.name for f in fields(SamplingParams))

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Timings:
    """Where one generation's time went, measured on the engine's worker (llama.cpp server's `timings`):
    from the start of the job to the first generated token (the prompt's evaluation), then to the end."""

    prompt_ms: float
    predicted_ms: float
    cached: int | None = None  # prompt tokens whose KV cells were reused, not evaluated again (None: not known)


@dataclass
class Chunk:
    """A piece of generated text; the last chunk of a stream has `finish_reason` set (and `timings`,
    where the engine measures them)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    timings: Timings | None = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


class PromptTooLong(CodemoatError, ValueError):
    """The prompt does not leave room for generation in the context window (the one "too long"
    error: engines raise it, and the server when a prompt cannot be fitted)."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, n_ctx: int, max_tokens: int, at_least: bool = False):
        self.prompt_tokens, self.n_ctx, self.max_tokens = prompt_tokens, n_ctx, max_tokens
        super().__init__(
            f"prompt is {'more than ' if at_least else ''}{prompt_tokens} tokens and max_tokens is {max_tokens}, "
            f"but the model's context is {n_ctx} tokens"
        )


class EmptyPrompt(CodemoatError):
    """A prompt of zero tokens: there is nothing to continue from (llama.cpp fails an assertion on it)."""

    def __init__(self) -> None:
        super().__init__("the prompt is empty: it has zero tokens, and the model needs at least one to continue from")


class Engine(abc.ABC):
    """A loaded model. Thread-safe: the server calls it from many requests at once.

    Construction, the same for a plaintext file and a sealed (decrypted in memory) model:

        cls.from_path(path, **opts)             # a model file or folder
        cls.from_buffer(buf, parts, **opts)     # a decrypted model in a sealed `MemfdBuffer`

    `opts` are the same keywords for every engine (`engines.factory.engine_options`): `model_id`,
    `n_ctx`, `n_threads`, `n_gpu_layers`; an engine ignores those it has no use for, and takes
    `safe_options` when the supervisor asks for its safe configuration.
    """

    name: str = "base"
    #: identifier the API shows for this model
    model_id: str = "model"
    #: keywords that pick a configuration correct on any CPU (perhaps slower); the supervisor
    #: restarts an engine with them after repeated crashes
    safe_options: ClassVar[dict[str, Any]] = {}
    #: the engine can run in a supervised child process (`engines.supervised`): built there with
    #: `from_path` (a memfd's /proc/self/fd path too), while `front()` tokenises in the server
    isolatable: ClassVar[bool] = False
    #: the supervisor's incident callback (`kind, detail`), set by the model holder
    on_incident: Any = None
    #: why this engine was closed (the holder's reason: license revoked, lease expired), named in the 503 of a
    #: request that took the engine just before it closed
    closed_why: str = "engine closed"

    @classmethod
    def from_path(cls, path: str | Path, **opts: Any) -> Engine:
        """Load a model file or folder."""
        raise CodemoatError(f"the {cls.name} engine cannot load a model file")

    @classmethod
    def from_buffer(cls, buf: MemfdBuffer, parts: Mapping[str, tuple[int, int]] | None = None, **opts: Any) -> Engine:
        """Load a decrypted model held in `buf`: one file (`parts` None), or a folder's files at
        (offset, size). The engine owns `buf` from here and zeroes it when it closes."""
        buf.close(zero=True)
        raise CodemoatError(
            f"the {cls.name} engine cannot serve a sealed model (decrypted in memory); "
            'use model.engine = "llamacpp" or "transformers"'
        )

    @classmethod
    def front(cls, path: str, **opts: Any) -> Engine:
        """This model's tokenizer and metadata without its weights (the server's side of a supervised engine)."""
        raise CodemoatError(f"the {cls.name} engine cannot run in a separate process")

    @property
    def state(self) -> str:
        """Whether the engine takes requests now: "ready", or why not ("restarting" after a crash)."""
        return "ready"

    @property
    @abc.abstractmethod
    def n_ctx(self) -> int:
        """Context length in tokens."""

    @property
    def metadata(self) -> dict[str, Any]:
        """Model metadata (GGUF key/values or a transformers config) used to pick templates."""
        return {}

    def has_token(self, text: str) -> bool:
        """Whether `text` is a single special token of this model (for template detection)."""
        return False

    def token_text(self, which: str) -> str:
        """Text of the model's "bos" or "eos" token ("" if none)."""
        return ""

    @abc.abstractmethod
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; with `special`, control tokens written in the text are parsed."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` (control tokens rendered as text)."""

    def encode(self, parts: Sequence[Any], bos: bool = True) -> list[int]:
        """Token ids of a prompt given as parts (`templates.Part`: text, special): control tokens are
        parsed only in special parts; with `bos`, the model's BOS (if it wants one) appears once at
        the start, whether or not the template wrote it."""
        return [t for p in parts if p.text for t in self.tokenize(p.text, p.special)]

    @abc.abstractmethod
    def stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        """Generate from `prompt` (text, or token ids already built by `encode`); the last chunk
        carries `finish_reason`. Closing the iterator (client gone) cancels generation."""

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenize(prompt))

    def check_count(self, n: int, max_tokens: int) -> None:
        """Every engine's rule for a prompt of `n` tokens: `EmptyPrompt` for none, `PromptTooLong`
        when it leaves no room for `max_tokens` in the context."""
        if n == 0:
            raise EmptyPrompt()
        if n + max(1, max_tokens) > self.n_ctx:
            raise PromptTooLong(n, self.n_ctx, max_tokens)

    def warm(self) -> None:
        """A request for this engine is being prepared, and none is under way: an engine whose first step would
        wait for something to wake (an engine process: `SupervisedEngine.warm`) may start that now. Nothing else."""

    def check_prompt(self, prompt: str | list[int], max_tokens: int) -> int:
        """Token count of `prompt`, checked by `check_count`."""
        n = len(prompt) if isinstance(prompt, list) else self.count_tokens(prompt)
        self.check_count(n, max_tokens)
        return n

    async def complete(self, prompt: str | list[int], params: SamplingParams) -> Completion:
        """Generate to the end and return the whole text."""
        n_prompt = self.check_prompt(prompt, params.max_tokens)
        parts: list[str] = []
        n_out = 0
        reason: FinishReason = "length"
        async for chunk in self.stream(prompt, params):
            parts.append(chunk.text)
            n_out += len(chunk.token_ids)
            if chunk.finish_reason:
                reason = chunk.finish_reason
        return Completion("".join(parts), n_prompt, n_out, reason)

    def logits(self, prompt: str) -> np.ndarray:
        """Next-token logits after `prompt` (float32, vocab-sized); for parity checks and tracing.
        Engines that cannot expose them (a remote vLLM) raise `CodemoatError`."""
        from ..errors import CodemoatError

        raise CodemoatError(f"the {self.name} engine does not expose logits")

    def health(self) -> dict[str, Any]:
        return {"engine": self.name, "model": self.model_id, "n_ctx": self.n_ctx}

    def closed_error(self) -> Unavailable:
        """The error of a request on this engine once it is closed: a 503 that says why (`closed_why`)."""
        return Unavailable(f"model {self.model_id!r} is not available: {self.closed_why}")

    def close(self) -> None:
        """Release the model and zero any plaintext buffers this engine owns."""
