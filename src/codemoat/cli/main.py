"""Entry point: `codemoat <noun> <verb>`. Commands are thin: parse, call, print."""

from __future__ import annotations

import importlib
import os
import sys

from .apps import app

# Each module adds its commands to the groups in `apps`; none imports heavy libraries at top level.
_MODULES = (
    "serve_cmd",
    "client_cmd",
    "accounts_cmd",
    "config_cmd",
    "vault_cmd",
    "train_cmd",
    "index_cmd",
    "trace_cmd",
    "audit_cmd",
)
for _m in _MODULES:
    try:
        importlib.import_module(f"codemoat.cli.{_m}")
    except ModuleNotFoundError as e:  # a module not written yet must not break the others
        if e.name != f"codemoat.cli.{_m}":
            raise


def main() -> None:
    """Run the CLI; errors a user can cause print one line, never a traceback."""
    from ..errors import CodemoatError

    try:
        app(standalone_mode=True)
    except CodemoatError as e:
        from .common import err_console

        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # last resort: one line, traceback only on request
        if os.environ.get("CODEMOAT_DEBUG"):
            raise
        from .common import err_console

        err_console.print(f"[red]error:[/red] {type(e).__name__}: {e}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
