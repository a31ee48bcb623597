"""Vendor adapters installed by `codemoat update apply`, opened for serving.

`model.adapters = ["update:NAME"]` serves the current version of the adapter bundle NAME (a LoRA
GGUF the vendor released for the served base model) to the groups the admin gave it at `update
apply --groups` (default: everyone). A newer version applied later is swapped in without downtime by
`POST /admin/api/model/swap {"adapter": NAME}` (engines.loader.swap_adapter). The payload is sealed
to this machine's key (vault.payload): opening it needs the machine key, so serve opens it itself,
or under `serve --vault` (whose account cannot read the key) `codemoat vaultd` opens it and hands
it over as a sealed memfd (`update:NAME`, cli/vaultd_cmd.VendorAdapters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CodemoatError
from ..vault.machine import MachineKey
from ..vault.payload import open_payload
from .bundle import check_gguf, payload_context

PREFIX = "update:"


@dataclass(frozen=True)
class InstalledAdapter:
    name: str
    version: str
    bundle_id: str
    groups: tuple[str, ...]
    gguf: bytes = field(repr=False)
    base_sha256: str | None = None  # the base model it was released for (its bundle's `base`)


def is_reference(entry: str) -> bool:
    """`update:NAME` in `model.adapters`: an installed vendor adapter, not a file."""
    return entry.startswith(PREFIX)


def current(name: str, root: Path | None = None) -> dict:
    """The state entry of adapter `name`'s installed version (no decryption)."""
    from .store import UpdateStore

    cur = UpdateStore(root).current(f"adapter:{name}")
    if cur is None:
        raise CodemoatError(f"no adapter bundle named {name!r} is installed (`codemoat update apply FILE`)")
    return cur


def open_installed(name: str, root: Path | None = None, machine: MachineKey | None = None) -> InstalledAdapter:
    """The current version of installed adapter `name`, decrypted (refuses another machine's or a changed payload)."""
    from .store import read_installed

    machine = machine or MachineKey.load()
    cur = current(name, root)
    try:
        manifest, blob = read_installed(Path(cur["dir"]))
    except (OSError, ValueError):
        raise CodemoatError(f"installed adapter {name!r} is damaged: run `codemoat update list`") from None
    data = open_payload(blob, manifest["keys"], machine, payload_context(manifest))
    check_gguf(data, name)
    groups = tuple(cur.get("groups") or ["everyone"])
    base = (cur.get("base") or {}).get("sha256")
    return InstalledAdapter(name, cur["version"], cur["bundle_id"], groups, data, base)
