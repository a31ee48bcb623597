"""Everything this machine ever sent off it: the lines the lease client appends to `$CODEMOAT_HOME/outbound.jsonl`.

The vault's lease client writes each request body there verbatim *before* sending it (and the
answer's status after); this module only reads it back, unchanged, for `codemoat audit outbound`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import paths

OUTBOUND = "outbound.jsonl"


def outbound_file() -> Path:
    return paths.home() / OUTBOUND


def read_outbound(path: Path | None = None) -> list[dict[str, Any]]:
    """Each line as written (a line that is not JSON is shown as `{"raw": line}` rather than hidden)."""
    p = path or outbound_file()
    if not p.exists():
        return []
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"line": n, "raw": line})
    return out
