"""The vendor keys this machine trusts: the first one a license brings is pinned (trust on first use)
in `$CODEMOAT_HOME/trusted-vendors.json`; licenses and revocation lists signed by any other are refused."""

from __future__ import annotations

import json
from pathlib import Path

from .. import paths
from .codec import VaultError, b64d, key_id

TRUST_FILE = "trusted-vendors.json"


def trusted_vendors(path: Path | None = None) -> list[str] | None:
    """The pinned vendor keys (base64), or None before the first license was accepted."""
    p = path or paths.home() / TRUST_FILE
    try:  # a FIFO, device or link put in its place is refused, not read for good or followed
        trusted = json.loads(paths.read_own(p, "trusted vendor list", 1 << 20, VaultError))
        if not isinstance(trusted, list):
            raise ValueError
    except FileNotFoundError:
        return None
    except ValueError:
        raise VaultError(f"trusted vendor list {p} is damaged") from None
    return trusted


def check_trusted_vendor(vendor_key: str, path: Path | None = None, what: str = "license") -> None:
    """Trust on first use (for a license): the first vendor key this machine accepts is pinned; others are refused."""
    p = path or paths.home() / TRUST_FILE
    trusted = trusted_vendors(p)
    if trusted is None and what == "license":
        p.write_text(json.dumps([vendor_key]))
        return
    if vendor_key not in (trusted or []):
        raise VaultError(
            f"{what} is signed by vendor key {key_id(b64d(vendor_key))}, which this machine does not "
            f"trust (trusted keys are listed in {p})"
        )
