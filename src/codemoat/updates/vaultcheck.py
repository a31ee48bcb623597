"""vaultd's health check of a pending model version, in a process of its own.

vaultd (`codemoat vaultd`) never generates: it holds the machine key and hands decrypted models to
`serve --vault` as sealed memfds. A model version `update apply` installed is *pending* until a health
check passed it (updates.store), and vaultd's serves run under another account, without the store: so
before vaultd offers a pending version (at its start with `--model update:model`, or when `update
apply` hands it over) it runs the check itself, here: a child given the sealed memfd (read-only, it
cannot zero or change it) and vaultd's model settings builds the engine a serve would (engines.factory,
in this child: `model.isolation = inline`), runs the fixed prompt (engines.loader.probe) and exits 0.
A crash or an out-of-memory kill of the child is a failed check, not a dead vaultd.

    python -m codemoat.updates.vaultcheck   < {"fd", "size", "model_id", "parts", "sha256", "model": {...}}
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

CHECK_TIMEOUT_S = 600.0  # a large model's load on a busy host; past it the check failed


def check_offer(offer: Any, settings: Any, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
    """Health-check vaultd's `offer` (vault.daemon.Offer) in a child process: None when it passed, else
    why, in one line."""
    req = {
        "fd": offer.fd,
        "size": offer.size,
        "model_id": offer.model_id,
        "parts": offer.facts.get("parts") or {},
        "sha256": offer.facts.get("sha256"),
        "model": settings.model.model_dump(mode="json"),
    }
    env = {k: v for k, v in os.environ.items() if k != "CODEMOAT_DEBUG"}
    try:
        r = subprocess.run(
            [sys.executable, "-m", "codemoat.updates.vaultcheck"],
            input=json.dumps(req),
            capture_output=True,
            text=True,
            pass_fds=(offer.fd,),
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return f"its health check gave no answer in {timeout_s:.0f} s"
    if r.returncode == 0:
        return None
    if r.returncode < 0:
        name = signal.Signals(-r.returncode).name if -r.returncode in signal.valid_signals() else str(-r.returncode)
        return f"its health check ended with {name} (out of memory, a crash in the engine, or a hang its watchdog stopped)"
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
    why = lines[-1].removeprefix("error: ") if lines else f"its health check exited {r.returncode}"
    return why[:300]


def main() -> int:
    from ..config import ModelSettings, load_settings
    from ..engines.child import set_non_dumpable
    from ..engines.factory import build_engine
    from ..engines.loader import probe
    from ..engines.memfd import MemfdBuffer
    from ..errors import CodemoatError

    set_non_dumpable()  # it maps the plaintext
    engine = None
    try:
        req = json.loads(sys.stdin.read())
        settings = load_settings(None)
        settings.model = ModelSettings.model_validate(req["model"])
        settings.model.isolation, settings.model.adapters = "inline", []  # this process is the isolation
        buf = MemfdBuffer.adopt(int(req["fd"]), int(req["size"]))
        buf.sha256 = req.get("sha256")
        parts = {k: tuple(v) for k, v in (req.get("parts") or {}).items()}
        engine = build_engine(settings, buf, req["model_id"], parts)
        probe(engine)
    except Exception as e:  # one line for vaultd's answer, whatever failed (a traceback helps nobody there)
        why = str(e).splitlines()[0] if str(e) else ""
        print(f"error: {why if isinstance(e, CodemoatError) else f'{type(e).__name__}: {why}'}", file=sys.stderr)
        return 1
    finally:
        if engine is not None:
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
