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
    """Run the CLI; errors a user can cause print one line, never a traceback (and, under `--json`, a JSON
    object on stdout: `common.print_error`)."""
    import typer

    from . import common
    from ..errors import CodemoatError

    common.json_errors, common.json_written = common.asks_for_json(sys.argv[1:]), False
    one_line = common.print_error
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
        one_line(e.format_message() + hint, e.exit_code)
        sys.exit(e.exit_code)
    except Exception as e:  # last resort: one line, traceback only on request
        if os.environ.get("CODEMOAT_DEBUG"):
            raise
        one_line(explain(e))
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def explain(e: Exception) -> str:
    """The one line for an exception nothing named: what went wrong in the user's terms where the kind says it,
    else the exception's name and words. A database error's text from SQLAlchemy holds the statement and its
    parameters (a token hash, a name, a password): only the driver's first line is said."""
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(e, sa_exc.DBAPIError):
        from ..db import driver_words

        if isinstance(e, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return f"the database failed ({driver_words(e)}): check database_url, and that the database is up and writable"
        return f"the database refused the command ({type(e.orig or e).__name__}); CODEMOAT_DEBUG=1 shows the details"
    if isinstance(e, OverflowError):
        return f"a number given is out of range ({e}): give a smaller value"
    if isinstance(e, UnicodeEncodeError):
        bad = e.object[e.start : e.end] if isinstance(e.object, str) else ""
        if any("\udc80" <= c <= "\udcff" for c in bad):  # bytes that were not UTF-8, as Python kept them
            return f"a name or value given holds bytes that are not UTF-8 ({ascii(bad)}): give it as UTF-8 text"
        return f"{ascii(bad)} cannot be written as {e.encoding}: use a UTF-8 locale (LANG=C.UTF-8), or --json"
    return f"{type(e).__name__}: {e}"


if __name__ == "__main__":
    main()
