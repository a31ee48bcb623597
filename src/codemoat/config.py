"""One settings tree: the TOML file, then `CODEMOAT_*` environment variables, then flags.

Every field has a description that doubles as help text (`codemoat config show`).
Nested sections read from the environment with a double underscore:
`CODEMOAT_SERVER__PORT=9000`, `CODEMOAT_MODEL__PATH=acme.moat`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ServerSettings(BaseModel):
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
    log_level: str = Field("info", description="uvicorn log level.")
    max_body_mb: float = Field(
        8, ge=0, description="Largest request body accepted, in MiB; a larger one gets 413 (0 = no limit)."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) of the reverse proxies in front of the server (HAProxy's). A request "
        "from one of them is taken to come from the address its X-Forwarded-For names (the nearest not itself a "
        "trusted proxy): the address its audit record, per-address limits and sign-in bounds see. Empty (the "
        "default): X-Forwarded-For is ignored, from every peer, loopback included.",
    )

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


class ModelSettings(BaseModel):
    # checked on assignment too, so that nothing reaches the server unchecked
    model_config = ConfigDict(validate_assignment=True)

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
        description="Run the engine in a supervised child process, restarted after a crash, a hang or a spin (llama.cpp), or inline in the server's process (no restart and no watchdog: a stuck inline engine holds every request while /health stays 200).",
    )
    answer_timeout_s: float = Field(
        120.0,
        ge=0,
        description="An engine process (model.isolation = process) that owes requests an answer and for this long sends nothing (no token, no error) and does no work (its threads neither run nor wait for a core or the disk; a long prefill does) is hung: its requests get 503 and it is restarted, as after a crash; 0 = never.",
    )
    spin_timeout_s: float = Field(
        300.0,
        ge=0,
        description="A batching engine process (model.isolation = process, model.parallel > 1) that owes requests an answer, sends nothing and makes no decode step (a step: one llama_decode, at most model.batch_tokens prompt tokens) while one of its threads runs on a core for this long (time waiting for a core, on a loaded machine, does not count) is spinning: its requests get 503 and it is restarted, as after a crash; 0 = never. Keep it above the slowest step: a large model's prompt step on a loaded CPU can take minutes.",
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
        from .engines.templates import FIM_TEMPLATES

        if name and name not in FIM_TEMPLATES:
            raise ValueError(f"unknown FIM template {name!r}: choose from {', '.join(FIM_TEMPLATES)}")
        return name


class VaultSettings(BaseModel):
    clock_tolerance_s: int = Field(300, description="How far the clock may go back before a license is refused.")
    lease_renew_fraction: float = Field(0.5, gt=0, lt=1, description="Renew a lease after this fraction of its TTL.")
    keyserver_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Each connect, read and write of a key server request; a whole answer (the first lease, a renewal, the release at shutdown) may take 6 times this, then the key server counts as unreachable (a release is abandoned: the seat frees at the lease's end).",
    )
    tpm: Literal["auto", "on", "off"] = Field(
        "auto",
        description="`machine-id` adds the TPM's keys: auto (when tpm_device exists and tpm2-pytss is installed), on, off.",
    )
    tpm_device: str = Field("/dev/tpmrm0", description="The TPM resource manager's device (TCTI device:PATH).")
    socket: str | None = Field(
        None,
        description="unix:PATH of a `codemoat vaultd`: serve gets the model from it as a sealed memfd and never opens the key, license or container (model.id names the model).",
    )
    overlap_load: Literal["auto", "off", "read", "map"] = Field(
        "auto",
        description="Decrypt a sealed GGUF while llama.cpp loads it instead of before (llama.cpp engine in the server's process, model.isolation = inline): map = llama.cpp maps the memfd and parses the header and vocabulary meanwhile, then waits for the whole file before touching a weight; read = use_mmap off, llama.cpp copies each tensor once its chunks are authenticated (its progress callback waits); off = decrypt, then map; auto = map while the memfd gets 4 KiB pages (shmem huge pages not allowed), else off (bench/results/vault.md).",
    )


class RetrievalSettings(BaseModel):
    enabled: bool = Field(True, description="Add cross-file context from indexed repositories to completions.")
    budget_tokens: int = Field(512, ge=0, description="Tokens of retrieved context a completion prompt may hold.")
    k: int = Field(5, ge=0, description="Snippets retrieved per completion.")
    index_snapshot_grace_s: float = Field(
        600.0,
        ge=0,
        description="With a snapshot directory as the index (replicas on several machines): seconds an index snapshot is kept after a newer one is published.",
    )


class AuditSettings(BaseModel):
    retain_text: bool = Field(False, description="Keep prompt and completion text in the audit log (secrets redacted first).")
    checkpoint_every: int = Field(100, ge=1, description="Sign a checkpoint of the audit chain every N records.")
    sign_every: int = Field(
        0,
        ge=0,
        description="Sign the audit chain's head once N records follow it unsigned (0: every record on SQLite, 64 on PostgreSQL).",
    )
    sign_interval_ms: float = Field(
        1000.0, gt=0, description="Sign the audit chain's head at the latest this long after a record was left unsigned."
    )
    alarm_throttle_rpm: int = Field(
        0, ge=0, description="Requests/min allowed for an hour to a user flagged by a distillation alarm (0 = flag only)."
    )


class PolicySettings(BaseModel):
    secrets: Literal["redact", "block"] = Field(
        "redact", description="Secrets found in prompts: redact them from what is kept, or refuse the request."
    )
    egress_allow: list[str] = Field(default_factory=list, description="Extra host[:port] destinations the server may connect to.")
    requests_per_minute: int = Field(0, ge=0, description="Per-token request limit (0 = none).")
    tokens_per_day: int = Field(0, ge=0, description="Per-user generated-token limit per day (0 = none).")


class DirectorySettings(BaseModel):
    """The company directory as the source of truth for users and groups (`codemoat.directory`)."""

    ldap_url: str | None = Field(
        None, description="LDAP server, ldap://host:389 or ldaps://host:636 (unset: no directory; users are made by hand)."
    )
    start_tls: bool = Field(False, description="Upgrade an ldap:// connection with StartTLS before binding.")
    ca_file: str | None = Field(
        None, description="CA certificate file that the server's TLS certificate must chain to (LDAPS and StartTLS)."
    )
    bind_dn: str | None = Field(None, description="The service account that searches the directory.")
    bind_password_file: str | None = Field(
        None, description="File holding the service account's password (a mounted secret; never in the config)."
    )
    user_base: str = Field("", description="Base DN under which users are searched.")
    user_filter: str = Field(
        "(&(objectClass=inetOrgPerson)(uid={username}))",
        description="Filter finding one user; {username} is escaped per RFC 4515 before it is put in.",
    )
    user_attr: str = Field("uid", description="Attribute holding the user name codemoat uses.")
    users_filter: str = Field("(objectClass=inetOrgPerson)", description="Filter listing every user for `directory sync`.")
    disabled_filter: str | None = Field(
        "(pwdAccountLockedTime=*)",
        description="Users matching this filter are disabled (lose tokens and groups at the next sync); unset: none.",
    )
    group_base: str = Field("", description="Base DN under which groups are searched.")
    group_filter: str = Field("(objectClass=groupOfNames)", description="Filter selecting group entries.")
    group_member_attr: str = Field(
        "member", description="Group attribute listing member DNs (users or, for nested groups, other groups)."
    )
    group_name_attr: str = Field("cn", description="Attribute holding a group's name.")
    group_map: dict[str, str] = Field(
        default_factory=dict,
        description="Directory group name -> codemoat group; only mapped groups grant access (an empty map mirrors every group under its own name, except `admin` and `everyone`).",
    )
    admin_groups: list[str] = Field(
        default_factory=list,
        description="codemoat groups whose members' self-service tokens get the admin scope. Set directory.group_map too: without it these are the identity provider's own group names, and where users may create groups there (Google Groups, GitLab, Entra self-service) anyone can make one (serve warns at start).",
    )
    token_ttl_days: int = Field(30, ge=1, le=3650, description="Lifetime of a token made by `codemoat login`.")
    sync_interval_s: int = Field(
        300, ge=0, description="How often `serve` mirrors the directory (0: never; run `codemoat directory sync`)."
    )
    max_staleness_s: int = Field(
        86400,
        ge=0,
        description="While the directory is unreachable, directory users keep their last-known groups this long; after it, their requests are refused.",
    )
    timeout_s: float = Field(5, gt=0, description="Connect and operation timeout for the directory, in seconds.")
    ldap_pool_size: int = Field(
        4,
        ge=1,
        le=64,
        description="LDAP connections kept open per pool (searches as the service account; password checks), each used by one sign-in at a time.",
    )
    oidc_issuer: str | None = Field(
        None,
        description="OpenID Connect issuer URL for browser sign-in (its /.well-known/openid-configuration is read); unset: no OIDC.",
    )
    oidc_client_id: str | None = Field(None, description="This server's client id at the OpenID provider.")
    oidc_client_secret_file: str | None = Field(
        None, description="File holding the OIDC client secret (a mounted secret; never in the config)."
    )
    oidc_redirect_url: str | None = Field(
        None, description="This server's public callback URL, registered at the provider: https://HOST/auth/oidc/callback."
    )
    oidc_user_claim: str = Field("preferred_username", description="ID-token claim that names the codemoat user.")
    oidc_shares_ldap_names: bool = Field(
        False,
        description="With LDAP and OIDC both set: the OpenID provider names the same people as the LDAP directory (Keycloak or Entra ID over this LDAP), so an OIDC sign-in may take a name the LDAP directory holds. Off: it is refused.",
    )
    oidc_groups_claim: str = Field(
        "groups", description="ID-token claim listing the user's directory groups (mapped through group_map)."
    )
    oidc_leeway_s: int = Field(60, ge=0, le=600, description="Clock skew allowed when checking an ID token's exp/iat/nbf.")
    oidc_console_redirect_url: str | None = Field(
        None,
        description="The admin console's OIDC callback, registered at the provider too (unset: /admin/oidc/callback on oidc_redirect_url's host).",
    )
    oidc_display_name: str = Field(
        "your company account", description="How the console's sign-in button names the OpenID provider (Sign in with ...)."
    )
    oidc_pending_per_address: int = Field(
        50,
        ge=1,
        le=100_000,
        description="Unfinished browser sign-ins (GET /auth/oidc/start, /admin/oidc/start) one client address may hold for their 10 minutes; past it: 429.",
    )
    oidc_pending_max: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Unfinished browser sign-ins kept in all; past it new ones get 503 (those under way still finish).",
    )
    device_code_ttl_s: int = Field(
        300,
        ge=10,
        le=1800,
        description="Life of a `codemoat login` device code (RFC 8628), at most the provider's own: short, so a phished code soon dies.",
    )
    insecure_transport: bool = Field(
        False,
        description="Allow an http:// OIDC issuer, or an ldap:// URL without StartTLS, on a host other than loopback: whoever is on that path can then sign in as anyone (their own ID-token keys; any bind answered yes). Off: such a setting is refused at start.",
    )

    @model_validator(mode="after")
    def _tls_off_loopback(self) -> DirectorySettings:
        plain = []
        if self.oidc_issuer and self.oidc_issuer.lower().startswith("http://"):
            plain.append(("oidc_issuer", self.oidc_issuer, "use https://"))
        if self.ldap_url and self.ldap_url.lower().startswith("ldap://") and not self.start_tls:
            plain.append(("ldap_url", self.ldap_url, "use ldaps:// or start_tls = true"))
        for name, url, fix in plain:
            if not self.insecure_transport and not loopback_url(url):
                raise ValueError(
                    f"directory.{name} {url!r} is reached without TLS, so anyone on the path can sign in as any user: "
                    f"{fix} (or set directory.insecure_transport = true on a path you trust)"
                )
        return self


def loopback_url(url: str) -> bool:
    """The URL's host is localhost or a loopback address."""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        host = urlsplit(url).hostname or ""
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class UpdateSettings(BaseModel):
    channel_url: str | None = Field(
        None,
        description="The vendor's online update channel (`codemoat update fetch` polls it; the only host it may reach). Off by default: bundles travel on removable media.",
    )
    handoff: bool = Field(
        True,
        description="`codemoat serve` listens on $CODEMOAT_HOME/run/serve-PID.sock (mode 0600, its own account or root only) so that `codemoat update apply` swaps an installed model or served adapter in without a restart; off: installs serve from the next start (or the admin swap route).",
    )


class Settings(BaseSettings):
    """All of codemoat's configuration."""

    model_config = SettingsConfigDict(env_prefix="CODEMOAT_", env_nested_delimiter="__", extra="ignore")

    server: ServerSettings = Field(default_factory=ServerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    vault: VaultSettings = Field(default_factory=VaultSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    directory: DirectorySettings = Field(default_factory=DirectorySettings)
    update: UpdateSettings = Field(default_factory=UpdateSettings)
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the shared state (default: SQLite under $CODEMOAT_HOME)."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = os.environ.get("CODEMOAT_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml)))
        return tuple(sources)


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from `config` (or `$CODEMOAT_CONFIG`), the environment, then `overrides`
    given as nested dicts or dotted keys (`{"server.port": 9000}`); None values are ignored.
    Unknown keys in the file are ignored (a newer codemoat may know them) with a one-line warning on stderr."""
    toml = str(config) if config is not None else os.environ.get("CODEMOAT_CONFIG")
    if toml:
        unknown = unknown_keys(read_toml(Path(toml)))
        os.environ["CODEMOAT_CONFIG"] = toml  # where `Settings` reads it from
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            print(
                f"warning: {toml}: unknown setting{'s' if len(unknown) > 1 else ''} {names} ignored "
                "(`codemoat config show` lists every setting)",
                file=sys.stderr,
            )
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    # pydantic-settings deep-merges init values over the environment and the TOML file.
    from pydantic import ValidationError

    from .errors import CodemoatError

    try:
        return Settings(**nested)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        msg = first.get("msg")
        if first.get("type") == "value_error" and "error" in first.get("ctx", {}):
            msg = str(first["ctx"]["error"])  # our own validators' words, without pydantic's "Value error, "
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise CodemoatError(f"invalid configuration: {where}: {msg}{more}") from None
    except (OSError, ValueError) as e:  # unreadable or malformed TOML
        raise CodemoatError(f"cannot read configuration: {e}") from None


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file's contents; one line naming the file when it is missing, a folder, or not TOML."""
    import tomllib

    from .errors import CodemoatError
    from .paths import read_regular

    if path.is_dir():
        raise CodemoatError(f"config file {path} is a folder, not a TOML file")
    data = read_regular(path, "config file", 16 << 20)  # a FIFO or /dev/zero is refused, not read for good
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CodemoatError(f"cannot read configuration {path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise CodemoatError(f"cannot read configuration {path}: {e}") from None


def unknown_keys(data: dict[str, Any], model: type[BaseModel] = Settings, prefix: str = "") -> list[str]:
    """Dotted names of the keys in `data` that no setting of `model` has."""
    out: list[str] = []
    for key, value in data.items():
        f = model.model_fields.get(key)
        if f is None:
            out.append(f"{prefix}{key}")
        elif isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) and isinstance(value, dict):
            out.extend(unknown_keys(value, f.annotation, f"{prefix}{key}."))
    return out


def describe(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, description, default) for every setting: the configuration reference."""
    rows: list[tuple[str, str, Any]] = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, f"{prefix}{name}."))
        else:
            default = f.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", f.description or "", default))
    return rows
