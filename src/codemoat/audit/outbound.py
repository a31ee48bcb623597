"""Everything this machine ever sent off it: the lines the lease client appends to `$CODEMOAT_HOME/outbound.jsonl`.

The vault's lease client writes each request body there verbatim *before* sending it (and the
answer's status after); this module only reads it back, unchanged, for `codemoat audit outbound`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import CodemoatError
from ..paths import outbound_log as outbound_file


def read_outbound(path: Path | None = None) -> list[dict[str, Any]]:
    """Each line as written. A line that is not a JSON object is shown as `{"line": n, "raw": text}`
    rather than hidden; one that is not valid UTF-8 also carries `"not_utf8": true`, its bad bytes
    shown as U+FFFD, and the lines after it are still read."""
    p = path or outbound_file()
    try:
        data = paths.read_own(p, "outbound log", None)  # a FIFO or a link put in the home: one line
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CodemoatError(f"cannot read {p}: {e.strerror}") from None
    out: list[dict[str, Any]] = []
    # split on \n only: the lines are JSON, and str.splitlines would also cut at U+2028 inside a string
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.append({"line": n, "raw": raw.decode("utf-8", "replace"), "not_utf8": True})
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            row = None
        out.append(row if isinstance(row, dict) else {"line": n, "raw": line})
    return out
