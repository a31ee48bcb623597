"""An adapter sealed to this machine: the vault's container, signed and opened with the machine key.

The plaintext is `adapter.json` (what it was trained on: base digest, repositories and their groups,
evaluation) + `adapter.gguf` + `adapter_model.safetensors` + `adapter_config.json`, each a part of one
`.moat` container. The container is signed with this machine's Ed25519 key (its `vendor_key` must be
this machine's) and its content key is wrapped to this machine's X25519 key (kept in the first part's
entry of the signed manifest), so the file opens only here and any changed byte is refused. Opened
adapters live in memory; llama.cpp reads the GGUF from a memfd, vLLM the safetensors (engines.vllm_lora).

An entry `update:NAME` in `model.adapters` is a vendor adapter installed by `codemoat update apply`
(codemoat.updates.adapters): no repositories, served to the groups the admin gave it. Its bundle names
the base it was released for (the plaintext SHA-256 of the customer's copy), checked at `update
apply` and again whenever an engine is built with it: an adapter for another base (a model updated
since, or `model.path` changed) is not served, with one line in the log, and the base serves on
(a swap to it is refused with that line). Under `serve --vault` the vault daemon, which alone reads
the machine key, hands it over as a sealed memfd with its base's digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CodemoatError
from ..text import acts_on_a_terminal, shown
from ..vault.codec import b64e, unwrap
from ..vault.codec import wrap as wrap_key
from ..vault.container import SealedFile
from ..vault.sealer import seal_bytes
from ..vault.machine import MachineKey


log = logging.getLogger("codemoat.serve")

CONTEXT = b"codemoat-adapter-v1\x00"
MODEL_PREFIX = "adapter:"


@dataclass
class Adapter:
    meta: dict[str, Any]  # adapter.json
    gguf: bytes
    safetensors: bytes
    peft_config: str
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def repos(self) -> list[str]:
        return [r["name"] for r in self.meta["repos"]]


def seal_adapter(adapter: Adapter, out: Path, machine: MachineKey | None = None) -> Path:
    """Write `adapter` to `out`, readable only on this machine."""
    machine = machine or MachineKey.load_or_create()
    blobs = [
        ("adapter.json", json.dumps(adapter.meta, sort_keys=True).encode()),
        ("adapter.gguf", adapter.gguf),
        ("adapter_model.safetensors", adapter.safetensors),
        ("adapter_config.json", adapter.peft_config.encode()),
    ]
    key = os.urandom(32)
    file_id = os.urandom(16).hex()
    parts, at = [], 0
    for name, b in blobs:
        parts.append({"name": name, "offset": at, "size": len(b)})
        at += len(b)
    parts[0]["wrapped_key"] = wrap_key(machine.x25519.public_key(), key, CONTEXT + file_id.encode())
    out = Path(out)
    seal_bytes(
        b"".join(b for _, b in blobs),
        out,
        signing_key=machine.ed25519,
        content_key=key,
        model_id=MODEL_PREFIX + adapter.name,
        fmt="gguf",
        customer="local",
        customer_id=machine.id,
        parts=parts,
        file_id=file_id,
    )
    return out


def open_adapter(path: Path, machine: MachineKey | None = None) -> Adapter:
    """The adapter sealed at `path`; refuses another machine's adapter, a model file, or any change."""
    path = Path(path).expanduser()
    sf = SealedFile(path)  # checks the signature against the key the manifest names
    m = sf.manifest
    if not str(m.model_id).startswith(MODEL_PREFIX):
        raise CodemoatError(f"{path.name} is not a codemoat adapter (it holds {m.model_id!r})")
    machine = machine or MachineKey.load()
    if m.vendor_key != b64e(machine.ed25519_public) or m.customer_id != machine.id:
        raise CodemoatError(f"{path.name} was not sealed on this machine ({machine.id})")
    wrapped = m.parts[0].get("wrapped_key") if m.parts else None
    key = unwrap(machine.x25519, wrapped, CONTEXT + m.file_id.encode(), "adapter key")
    plain = bytes(sf.decrypt(key, check_sha256=True))
    got = {p["name"]: plain[p["offset"] : p["offset"] + p["size"]] for p in m.parts}
    try:
        meta = json.loads(got["adapter.json"])
        return Adapter(meta, got["adapter.gguf"], got["adapter_model.safetensors"], got["adapter_config.json"].decode(), path)
    except (KeyError, ValueError):
        raise CodemoatError(f"{path.name} is damaged: adapter parts are missing") from None


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter opened for serving: its GGUF (for vLLM: its safetensors, with `peft_config`) in a memfd
    the engine (and its child or worker processes) opens."""

    name: str
    repos: tuple[tuple[str, tuple[str, ...]], ...]  # (repository, its groups when the adapter was trained)
    base_sha256: str | None  # the base it is for (None: a vendor adapter whose bundle names none)
    fd: int
    groups: tuple[str, ...] = ()  # a vendor adapter's: who is served with it (tuned adapters: by `repos`)
    version: str | None = None  # a vendor adapter's installed version
    peft_config: str = ""  # adapter_config.json, when the memfd holds the safetensors (vLLM)

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"


_LOADED: dict[str, tuple[float, LoadedAdapter]] = {}  # resolved path -> (mtime, adapter)
#: vendor adapter name -> why the last engine built was not given it (another base); read by a swap
REFUSED: dict[str, str] = {}


def load_adapters(
    paths: list[str],
    base_sha256: str | None,
    *,
    cached_only: bool = False,
    safetensors: bool = False,
    legacy_sha256: str | None = None,
) -> list[LoadedAdapter]:
    """The configured adapters, opened once per process (the memfds stay open while it serves);
    one tuned on another base, or two with one name, are refused with one line. `cached_only`:
    those already opened (the server's view of what the engine loaded), without reading any file.
    `safetensors`: the memfds hold peft's safetensors (vLLM's format) instead of the GGUF.
    `legacy_sha256`: the served folder's pre-v2 digest (`listing_identity`), also accepted."""
    out: list[LoadedAdapter] = []
    for p in paths:
        if p.startswith(VENDOR_PREFIX) and safetensors:
            raise CodemoatError(f"vendor adapter {p!r} ships as GGUF only: the llama.cpp engine serves it, not vLLM")
        if p.startswith(VENDOR_PREFIX):
            name = p[len(VENDOR_PREFIX) :]
            if not cached_only:
                before = _LATEST.get(name)
                got = _vendor_adapter(name)
                if not _fits(got, base_sha256):
                    if before is None:
                        _LATEST.pop(name, None)
                    else:
                        _LATEST[name] = before
                    continue
                REFUSED.pop(name, None)
            elif (got := _LATEST.get(name)) is None:
                continue
            if any(o.name == got.name for o in out):
                raise CodemoatError(f"two adapters are named {got.name!r}: rename one (codemoat tune --out NAME.moat)")
            out.append(got)
            continue
        path = Path(p).expanduser()
        suffix = "#safetensors" if safetensors else ""
        if cached_only:
            hit = _LOADED.get(str(path.resolve()) + suffix)
            if hit is not None:
                out.append(hit[1])
            continue
        if not path.is_file():
            raise CodemoatError(f"adapter not found: {shown(str(path))}")
        key, mtime = str(path.resolve()) + suffix, path.stat().st_mtime
        hit = _LOADED.get(key)
        if hit is None or hit[0] != mtime:
            a = open_adapter(path)
            if not a.name or acts_on_a_terminal(a.name):  # `tune --out .moat` wrote "" before tune refused it
                raise CodemoatError(
                    f"adapter {path.name}: its recorded name {shown(a.name[:100])!r} is not a name that serving and the "
                    "audit log can use: tune it again with --out NAME.moat"
                )
            if safetensors and not a.safetensors:
                raise CodemoatError(f"adapter {a.name!r} ({path.name}) holds no safetensors part for vLLM")
            fd = os.memfd_create(f"codemoat-adapter-{a.name}")
            os.write(fd, a.safetensors if safetensors else a.gguf)
            repos = tuple((r["name"], tuple(r["groups"])) for r in a.meta["repos"])
            config = a.peft_config if safetensors else ""
            # vLLM serves the base's Hugging Face weights: tune records their digest as hf_sha256 (None: tuned on
            # a GGUF with no .hf folder beside it, or before tune recorded it)
            base = a.meta["base"].get("hf_sha256") if safetensors else a.meta["base"]["sha256"]
            hit = _LOADED[key] = (mtime, LoadedAdapter(a.name, repos, base, fd, peft_config=config))
        got = hit[1]
        if safetensors and got.base_sha256 is None:
            raise CodemoatError(
                f"adapter {got.name!r} ({path.name}) records no Hugging Face base for vLLM (tuned on a GGUF without "
                "its .hf folder beside it, or by an older codemoat): tune it again with the folder in place"
            )
        if legacy_sha256 is not None and got.base_sha256 == legacy_sha256:
            log.warning("adapter %r records its base's pre-v2 digest: tune it again to record the folder's v2 identity", got.name)
        elif base_sha256 is None or got.base_sha256 != base_sha256:
            served = "Hugging Face weights vLLM serves" if safetensors else "model served"
            raise CodemoatError(f"adapter {got.name!r} ({path.name}) was tuned on another base model than the {served}")
        if any(o.name == got.name for o in out):
            raise CodemoatError(f"two adapters are named {got.name!r}: rename one (codemoat tune --out NAME.moat)")
        out.append(got)
    return out


def _fits(vendor: LoadedAdapter, base_sha256: str | None) -> bool:
    """A vendor adapter fits the served base when its bundle names that base (or names none: bundles
    from before `base` are refused at install, so only one installed earlier has none)."""
    if vendor.base_sha256 is None or base_sha256 is None or vendor.base_sha256 == base_sha256:
        return True
    why = (
        f"vendor adapter {vendor.name!r} {vendor.version} is for base model {vendor.base_sha256[:12]}, not the served "
        f"model {base_sha256[:12]}: not served (apply its release for this model)"
    )
    log.warning("%s", why)
    REFUSED[vendor.name] = why
    return False


VENDOR_PREFIX = "update:"
_LATEST: dict[str, LoadedAdapter] = {}  # vendor adapter name -> the version opened last


#: `serve --vault`: fetches `update:NAME` from vaultd (which alone reads the machine key the payload
#: is sealed to) as a sealed memfd with its facts; set by engines.loader.open_vaulted
_VENDOR_SOURCE: Any = None


def set_vendor_source(fetch: Any) -> None:
    global _VENDOR_SOURCE
    _VENDOR_SOURCE = fetch


def _vaulted_adapter(name: str) -> LoadedAdapter:
    """Vendor adapter `name` as vaultd hands it (its current installed version), kept once per version."""
    got = _VENDOR_SOURCE(VENDOR_PREFIX + name)
    f = got.facts
    groups, version, bundle_id, base = f.get("groups"), f.get("version"), f.get("bundle_id"), f.get("base_sha256")
    if not (
        isinstance(bundle_id, str)
        and isinstance(version, str)
        and isinstance(groups, list)
        and groups
        and (base is None or isinstance(base, str))
    ):
        os.close(got.fd)
        raise CodemoatError(f"the vault daemon's answer for adapter {name!r} names no version or groups")
    key = f"{VENDOR_PREFIX}{name}@{bundle_id}"
    hit = _LOADED.get(key)
    if hit is None:
        hit = _LOADED[key] = (0.0, LoadedAdapter(name, (), base, got.fd, tuple(str(g) for g in groups), version))
    else:
        os.close(got.fd)  # this version is open already
    _LATEST[name] = hit[1]
    return hit[1]


def _vendor_adapter(name: str) -> LoadedAdapter:
    """The installed version of vendor adapter `name` in a memfd, opened once per installed version."""
    from ..updates.adapters import current, open_installed

    if _VENDOR_SOURCE is not None:
        return _vaulted_adapter(name)

    key = f"{VENDOR_PREFIX}{name}@{current(name)['bundle_id']}"
    hit = _LOADED.get(key)
    if hit is None:
        a = open_installed(name)
        fd = os.memfd_create(f"codemoat-adapter-{name}")
        os.write(fd, a.gguf)
        hit = _LOADED[key] = (0.0, LoadedAdapter(a.name, (), a.base_sha256, fd, a.groups, a.version))
    _LATEST[name] = hit[1]
    return hit[1]


def release_unused(adapters: Any, keep: Any) -> int:
    """Close the memfds of `adapters` that no engine in `keep` serves (a swapped-out version, once the
    engine that served it has closed) and forget them; returns how many were closed."""
    keep_fds = {a.fd for a in keep}
    closed = 0
    for a in adapters:
        if a.fd < 0 or a.fd in keep_fds:
            continue
        for k, (_, cached) in list(_LOADED.items()):
            if cached is a:
                del _LOADED[k]
        if _LATEST.get(a.name) is a:
            del _LATEST[a.name]
        try:
            os.close(a.fd)
            closed += 1
        except OSError:
            pass
    return closed


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder: Path) -> str:
    """A Hugging Face model folder's identity (`folder_identity`'s first)."""
    return folder_identity(folder)[0]


def folder_identity(folder: Path) -> tuple[str, str | None]:
    """(identity, legacy digest or None) of a Hugging Face model folder: its files as `vendor seal`
    packs them (`vault.seal_model.folder_files`: weights, config, tokenizer files), see `listing_identity`."""
    from ..vault.seal_model import folder_files

    h, listing = hashlib.sha256(), []
    for p in folder_files(folder):
        size = 0
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                size += len(block)
        listing.append((p.name, size))
    return listing_identity(listing, h.hexdigest())


def parts_identity(parts: Any, plaintext_sha256: str) -> tuple[str, str | None]:
    """`folder_identity` of a sealed folder, from its signed manifest: `parts` (a list of {name, offset,
    size}, or name -> (offset, size)) and the plaintext's SHA-256, which every chunk's tag binds; no
    byte is hashed again."""
    rows = parts.items() if hasattr(parts, "items") else ((p["name"], (p["offset"], p["size"])) for p in parts)
    listing = [(Path(name).name, int(size)) for name, (_, size) in sorted(rows, key=lambda r: int(r[1][0]))]
    return listing_identity(listing, plaintext_sha256)


def listing_identity(listing: list[tuple[str, int]], concat_sha256: str) -> tuple[str, str | None]:
    """("v2:" + SHA-256 of the files' names and sizes, in order, and of their bytes' SHA-256, legacy).
    Names and sizes fix where each file starts, so no two folders share it by moving bytes between
    files or renaming one. `legacy` is the digest adapters recorded before v2 (the bytes' SHA-256
    alone), given only while the folder holds no file that digest left out (it covered the weights and
    JSON files only): an adapter recording it keeps serving over the same folder."""
    text = json.dumps({"files": [[n, s] for n, s in listing], "sha256": concat_sha256}, separators=(",", ":"))
    old = all(n.endswith((".json", ".safetensors")) for n, _ in listing)
    return "v2:" + hashlib.sha256(text.encode()).hexdigest(), concat_sha256 if old else None


def open_adapters(paths: list[str], engine: str, source: Any, parts: Any = None) -> list[LoadedAdapter]:
    """The adapters an engine over `source` serves (tuned ones checked against its digest)."""
    if engine not in ("llamacpp", "vllm"):
        raise CodemoatError(f"model.adapters are served by the llama.cpp and vLLM engines, not {engine}")
    # tuned adapters are checked against the weights the engine loads, vendor adapters against the base
    # their bundle names. vLLM loads a Hugging Face folder (X.hf beside X.gguf when --model names the GGUF):
    # its digest is `folder_sha256`, which tune records as the base's `hf_sha256` (load_adapters);
    # llama.cpp loads the GGUF: its file digest. A sealed base's digest is the one its signed header
    # holds, which every chunk's GCM tag binds (MemfdBuffer.sha256, from engines.sealed, or from vaultd
    # for its memfd; for a sealed folder, its `parts_identity`, as folder_sha256's); one without it is hashed
    legacy = None
    if isinstance(source, Path) and (engine == "vllm" or source.is_dir()):
        folder = source if source.is_dir() else source.with_suffix(".hf")
        if engine != "vllm" or not folder.is_dir():
            raise CodemoatError(f"model.adapters under {engine}: no model folder at {folder.name}")
        digest, legacy = folder_identity(folder)
    elif isinstance(source, Path):
        digest = file_sha256(source)
    else:
        digest = source.sha256 or hashlib.sha256(source.view).hexdigest()
        if engine == "vllm" and parts and any(str(n).endswith(".safetensors") for n in dict(parts)):
            digest, legacy = parts_identity(dict(parts), digest)
    return load_adapters(paths, digest, safetensors=engine == "vllm", legacy_sha256=legacy)
