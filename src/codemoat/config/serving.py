"""The `[server]` and `[model]` sections: where `codemoat serve` listens and what it admits, and which model it
serves with which engine."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator


def bind_host(host: str) -> str:
    """`host` to listen on, unless empty: bind("") is every interface, so an unset shell variable (`--host
    "$HOST"`) would open a server to the network. ValueError (one line) names what to write instead. Also the
    key server's and the update channel's --host."""
    if not host.strip():
        raise ValueError("an empty address listens on every interface: write 0.0.0.0 (or ::) if that is meant")
    return host


def netloc(host: str, port: int) -> str:
    """`host:port` as a URL writes it: an IPv6 literal in brackets (RFC 3986 3.2.2: `[::1]:8080`; `::1:8080` reads
    as host ':' and port ':1:8080'). What the update channel's egress rule allows, too."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def http_url(host: str, port: int) -> str:
    """The URL of a listener on `host` and `port`, as a server says where it listens (`http://[::1]:8080`): the
    key server's, the update channel's and serve's first line."""
    return f"http://{netloc(host, port)}"


class Section(BaseModel):
    """A settings section: numbers are finite (`max_body_mb = inf` passed `config show`, which printed the invalid
    JSON `Infinity`, then killed `serve` after its model had loaded)."""

    model_config = ConfigDict(allow_inf_nan=False)


#: uvicorn's log levels (`server.log_level`)
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)  # the key server's --log-level checks against the same names


class ServerSettings(Section):
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on (0 picks a free one).")
    max_concurrent: int = Field(
        64, ge=1, description="Generations admitted at once; more wait for a slot (the engine still runs one batch at a time)."
    )
    max_waiting_per_user: int = Field(
        64,
        ge=0,
        description="Requests one user may have waiting for a place of server.max_concurrent at once; more get 429 (0 = no limit). Places go to the user holding the fewest.",
    )
    max_queue_wait_s: float = Field(
        0,
        ge=0,
        description="Longest a request waits for a place of server.max_concurrent and then a slot of the engine (model.parallel) before it is refused with the protocol's overloaded error (503 with Retry-After; Ollama's \"server busy\"); 0 = it waits as long as it takes.",
    )
    log_level: LogLevel = Field("info", description="uvicorn log level: critical, error, warning, info, debug or trace.")
    max_body_mb: float = Field(
        8, ge=0, description="Largest request body accepted, in MiB; a larger one gets 413 (0 = no limit)."
    )
    read_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a client has to send a request once its connection opens (or its first byte comes after an "
        "answer), plus one for every KiB received (a large body on a slow link still arrives) but never more than this "
        "ahead (a stall that long is cut, however much came before); later, it gets 408 and "
        "the connection closes. A connection left silent, a head or a body stopped halfway, no longer holds a "
        "descriptor for good. A request's head over 64 KiB gets 431.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) of the reverse proxies in front of the server (HAProxy's). A request "
        "from one of them is taken to come from the address its X-Forwarded-For names (the nearest not itself a "
        "trusted proxy): the address its audit record, per-address limits and sign-in bounds see; its "
        "X-Forwarded-Proto: https makes the console's and the sign-in's cookies Secure. Empty (the default): both "
        "headers are ignored, from every peer, loopback included.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v  # uvicorn's names are lower-case; INFO is info

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return bind_host(v)

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        import ipaddress

        for item in v:
            try:
                net = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)") from None
            if net.prefixlen == 0:  # every caller could then name any address
                raise ValueError(f"{item!r} is every address: name the proxies themselves")
            if "/" in item and ipaddress.ip_interface(item).ip != net.network_address:
                # uvicorn reads a network strictly: "10.0.0.5/24" would be a literal that no peer matches
                raise ValueError(f"{item!r} has host bits set: write {net}, or the proxy's address alone")
        return v


class ModelSettings(Section):
    # checked on assignment too, so that nothing reaches the server unchecked
    model_config = ConfigDict(validate_assignment=True, allow_inf_nan=False)

    path: str | None = Field(
        None,
        description="Model to serve: a .gguf, a safetensors folder, or a sealed .moat file; `update:model` serves the "
        "model bundle installed by `codemoat update apply` (its current version, with the license it carries).",
    )
    license: str | None = Field(None, description="License file (.lic) for a sealed model.")
    engine: str = Field(
        "llamacpp", description="Inference engine: llamacpp, transformers, vllm, or module:Class of an Engine subclass."
    )
    isolation: Literal["process", "inline"] = Field(
        "process",
        description="Run the engine in a supervised child process, restarted after a crash, a hang or a spin (llama.cpp), or inline in the server's process (a crash takes the server with it; a hang or a spin is found by the same watchdogs, answered 503 and audited, and stops the server: model.exit_on_hang).",
    )
    answer_timeout_s: float = Field(
        120.0,
        ge=0,
        description="An engine process (model.isolation = process) that owes requests an answer and for this long sends nothing (no token, no error) and does no work (its threads neither run nor wait for a core or the disk; a long prefill does) is hung: its requests get 503 and it is restarted, as after a crash; 0 = never. Inline (llama.cpp), the same of the engine's worker thread: a stall (model.exit_on_hang).",
    )
    spin_timeout_s: float = Field(
        300.0,
        ge=0,
        description="A batching engine process (model.isolation = process, model.parallel > 1) that owes requests an answer, sends nothing and makes no decode step (a step: one llama_decode, at most model.batch_tokens prompt tokens) while one of its threads runs on a core for this long (time waiting for a core, on a loaded machine, does not count) is spinning: its requests get 503 and it is restarted, as after a crash; 0 = never. Keep it above the slowest step: a large model's prompt step on a loaded CPU can take minutes. Inline (llama.cpp, model.parallel > 1), the same of the engine's worker thread: a stall (model.exit_on_hang).",
    )
    exit_on_hang: bool = Field(
        True,
        description="model.isolation = inline (llama.cpp): when the engine's worker thread stalls (model.answer_timeout_s, model.spin_timeout_s), its requests and new ones get 503, /health says state stalled (503) and an engine_crashed incident is audited; then true stops the server as SIGTERM does and exits with status 70, for its service manager to start it again (a thread cannot be stopped: only a new process frees the engine); false keeps the server up, answering 503 until the worker takes a job again (if ever), e.g. to inspect the stuck thread.",
    )
    id: str | None = Field(None, description="Model name shown by the API (default: the file's stem).")
    n_ctx: int = Field(4096, ge=64, description="Context window in tokens (capped by the model's own).")
    n_threads: int | None = Field(
        None,
        description="CPU threads for llama.cpp (default: the cores this process may run on: its affinity, e.g. `taskset -c` or a container's cpuset). Replicas sharing a host: cores / replicas each.",
    )
    n_gpu_layers: int = Field(0, description="Layers to offload to a GPU (llama.cpp).")
    cpu_buffers: Literal["auto", "extra", "safe"] = Field(
        "auto",
        description="llama.cpp's extra CPU buffer types (AMX tiles, repacked kernels) for quantised models: auto (a start-up self-test in a child process decides, cached per CPU and llama.cpp build), extra (always on), safe (always off: correct on every x86-64 CPU, slower).",
    )
    parallel: int = Field(
        4,
        ge=1,
        le=64,
        description="llama.cpp: requests decoded together (continuous batching): sequence slots of n_ctx tokens each in one context (KV memory grows with it); 1 decodes one request at a time.",
    )
    batch_tokens: int = Field(
        512,
        ge=32,
        description="llama.cpp, batched: prompt tokens evaluated per step between two decode steps (chunked prefill, so a long prompt does not stall the other requests' tokens).",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM: ranks (GPUs, or CPU core groups: VLLM_CPU_OMP_THREADS_BIND) that split each layer; the KV heads must divide by it.",
    )
    kv_cache_gib: float = Field(
        1.0, gt=0, description="vLLM on CPUs: GiB of memory for its KV cache (VLLM_CPU_KVCACHE_SPACE, unless that is set)."
    )
    enforce_eager: bool = Field(
        True,
        description="vLLM: run the model eagerly (starts in about 15 s); false compiles it (25-50 s more at start, faster decoding).",
    )
    fim_template: str | None = Field(
        None,
        description="Fill-in-the-middle template (qwen, deepseek, starcoder, codellama, codegemma); default: detected from the model.",
    )
    chat_template: str | None = Field(None, description="Jinja2 chat template overriding the model's own.")
    max_tokens_limit: int = Field(
        4096, ge=1, description="Largest max_tokens a request may ask for; also caps a chat answer that sets no limit."
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="LoRA adapters made by `codemoat tune` (sealed .moat files of this machine); "
        "a request gets one only when its user may read every repository it was trained on (llama.cpp and vLLM engines). "
        "`update:NAME` is a vendor adapter installed by `codemoat update apply`, served to the groups given there.",
    )
    fold_adapters: bool = Field(
        True,
        description="Fold each adapter into its own in-memory copy of the base model's weights (as llama.cpp's "
        "export-lora does, never written to disk), served at the base's speed, when the weights it changes are "
        "F32, F16, BF16 or Q8_0 and the base is at most 2 GiB: one more copy of the base in memory per adapter. "
        "Otherwise, or when off, llama.cpp applies the adapter at run time (extra work in every layer). "
        "vLLM on CPU (same 2 GiB bound): a step whose every token has one adapter runs with it folded into "
        "that layer's weights (engines.vllm_fold); steps mixing adapters and the base apply it at run time.",
    )
    default_max_tokens: int = Field(
        64,
        ge=1,
        description="max_tokens of a completion (FIM, Tabby, /infill, OpenAI completions) that sets none; "
        "a chat answer without a limit (OpenAI, Ollama) generates until its stop token or the context is full.",
    )

    @field_validator("fim_template")
    @classmethod
    def _known_fim_template(cls, name: str | None) -> str | None:
        # refused at start-up, not on the first completion request
        from ..engines.templates import FIM_TEMPLATES

        if name and name not in FIM_TEMPLATES:
            raise ValueError(f"unknown FIM template {name!r}: choose from {', '.join(FIM_TEMPLATES)}")
        return name
