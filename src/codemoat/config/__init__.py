"""One settings tree: the TOML file, then `CODEMOAT_*` environment variables, then flags.

Every field has a description that doubles as help text (`codemoat config show`).
Nested sections read from the environment with a double underscore:
`CODEMOAT_SERVER__PORT=9000`, `CODEMOAT_MODEL__PATH=acme.moat`.

The larger sections have their own modules (`serving`: [server] and [model]; `directory`: [directory]);
the small ones, the tree and how it is read are here. Import every name from `codemoat.config`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .directory import DirectorySettings, loopback_url
from .serving import ModelSettings, Section, ServerSettings

__all__ = [
    "AuditSettings",
    "DirectorySettings",
    "ModelSettings",
    "PolicySettings",
    "RetrievalSettings",
    "ServerSettings",
    "Settings",
    "UpdateSettings",
    "VaultSettings",
    "describe",
    "load_settings",
    "loopback_url",
    "read_toml",
    "unknown_keys",
]


class VaultSettings(Section):
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


class RetrievalSettings(Section):
    enabled: bool = Field(True, description="Add cross-file context from indexed repositories to completions.")
    budget_tokens: int = Field(512, ge=0, description="Tokens of retrieved context a completion prompt may hold.")
    k: int = Field(5, ge=0, description="Snippets retrieved per completion.")
    index_snapshot_grace_s: float = Field(
        600.0,
        ge=0,
        description="With a snapshot directory as the index (replicas on several machines): seconds an index snapshot is kept after a newer one is published.",
    )


class AuditSettings(Section):
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


class PolicySettings(Section):
    secrets: Literal["redact", "block"] = Field(
        "redact", description="Secrets found in prompts: redact them from what is kept, or refuse the request."
    )
    egress_allow: list[str] = Field(default_factory=list, description="Extra host[:port] destinations the server may connect to.")
    requests_per_minute: int = Field(0, ge=0, description="Per-token request limit (0 = none).")
    tokens_per_day: int = Field(0, ge=0, description="Per-user generated-token limit per day (0 = none).")


class UpdateSettings(Section):
    channel_url: str | None = Field(
        None,
        description="The vendor's online update channel (`codemoat update fetch` polls it; the only host it may reach). Off by default: bundles travel on removable media.",
    )
    handoff: bool = Field(
        True,
        description="`codemoat serve` listens on $CODEMOAT_HOME/run/serve-PID.sock (mode 0600, its own account or root only) so that `codemoat update apply` swaps an installed model or served adapter in without a restart; off: installs serve from the next start (or the admin swap route).",
    )
    start_attempts: int = Field(
        3,
        ge=1,
        description="Starts (`serve` or `vaultd` with update:model) that may try a pending model version, one no health check has passed yet; a version tried this often whose process never came up with it (killed loading it: out of memory, a crash) is recorded failed at the next start without being loaded, and the version before it serves.",
    )
    swap_stall_s: float = Field(
        300.0,
        ge=30,
        le=900,
        description="Seconds one stage of a hand-off swap (loading and checking the new model is one) may last before serve stops telling `update apply` it is under way; apply then gives up on it 60 s later and records the version failed. Raise it for models that take longer than this to load from their disk; a hung swap holds `update apply` this long plus 60 s.",
    )


class Settings(BaseSettings):
    """All of codemoat's configuration."""

    model_config = SettingsConfigDict(env_prefix="CODEMOAT_", env_nested_delimiter="__", extra="ignore", allow_inf_nan=False)

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

    from ..errors import CodemoatError

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

    from ..errors import CodemoatError
    from ..paths import read_regular

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
