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
    "license_cmd",
    "vaultd_cmd",
    "train_cmd",
    "tune_cmd",
    "index_cmd",
    "trace_cmd",
    "audit_cmd",
    "usage_cmd",
    "tco_cmd",
    "directory_cmd",
    "tpm_cmd",
    "updates_cmd",
    "crl_cmd",
)
for _m in _MODULES:
    importlib.import_module(f"codemoat.cli.{_m}")


def main() -> None:
    """Run the CLI; errors a user can cause print one line, never a traceback."""
    import typer

    from ..errors import CodemoatError
    from .common import print_error as one_line

    try:
        # Not standalone: usage errors come back here to be printed as one line, not as a box.
        code = app(standalone_mode=False)
    except CodemoatError as e:
        one_line(str(e))
        sys.exit(1)
    except typer.Abort:
        one_line("aborted")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.TyperException as e:  # a wrong option, a missing argument, a value of the wrong type
        if type(e).__name__ == "NoArgsIsHelpError":  # `codemoat tokens` alone: the help is already printed
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        one_line(e.format_message() + hint)
        sys.exit(e.exit_code)
    except Exception as e:  # last resort: one line, traceback only on request
        if os.environ.get("CODEMOAT_DEBUG"):
            raise
        one_line(f"{type(e).__name__}: {e}")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
