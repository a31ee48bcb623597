"""Helpers shared by the vault tests: seal and license in one call, run the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cli_errors import one_line_error  # noqa: F401 (the vault tests import it from here)
from codemoat.vault.machine import MachineKey


def bundle(
    vendor,
    model: Path,
    out_dir: Path,
    machine: MachineKey | list[MachineKey],
    *,
    customer: str = "acme",
    days: float = 30,
    **issue,
) -> tuple[Path, Path, dict]:
    """Seal `model` for `customer` and license it to `machine`; returns (moat, lic, license document)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    moat = out_dir / f"{customer}.moat"
    if not moat.exists():
        vendor.seal(model, customer, moat, chunk_size=issue.pop("chunk_size", None))
    else:
        issue.pop("chunk_size", None)
    machines = machine if isinstance(machine, list) else [machine]
    doc = vendor.issue_license(
        customer=customer, model=moat, machines=[m.identity() for m in machines], expires=int(time.time() + days * 86400), **issue
    )
    lic = out_dir / f"{doc['license']['id']}.lic"
    lic.write_text(json.dumps(doc, indent=2) + "\n")
    return moat, lic, doc


def cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["CODEMOAT_HOME"] = str(home)
    env.pop("CODEMOAT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "codemoat.cli.main", *args], capture_output=True, text=True, env=env, timeout=120
    )
