"""Shared CLI plumbing: the options many commands take, one-line errors, `--json` or one-line output,
and this home's audit log as a command opens it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from ..audit.log import AuditLog
    from ..config import Settings

console = Console()
err_console = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ConfigOpt = Annotated[Path | None, typer.Option(help="TOML configuration file.", envvar="CODEMOAT_CONFIG")]
VendorDir = Annotated[
    Path, typer.Option("--vendor", help="The vendor's directory (keys and database).", envvar="CODEMOAT_VENDOR")
]


# Set by `main` when the command line asks for `--json`: a failure is then also told on stdout, as JSON.
json_errors = False
# Set once a JSON result is on stdout: a failure after it (login's token shown, then not saved) is the stderr
# line and the exit status only, so stdout stays one JSON document and the result in it stays readable.
json_written = False


def asks_for_json(args: list[str], command: Any = None) -> bool:
    """Whether a command line asks for JSON output: known before it is parsed, so that a usage error is
    machine-readable too. Read as click reads it (`command`, the app's click command, says which options take
    a value): `--json` given as another option's value (`tokens create --name --json`) or after `--` is not the flag,
    and its failure is then the stderr line alone, as the user asked."""
    if "--json" not in args:
        return False
    if command is None:
        import typer

        from .apps import app  # its commands are added as `main` imports their modules

        command = typer.main.get_command(app)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            return False
        if token.startswith("--"):
            name, has_value, _ = token.partition("=")
            if name == "--json" and not has_value:
                return True  # also where the command has no --json: its usage error is then JSON
            if not has_value:
                i += _values_taken(command, name)
        elif token.startswith("-") and token != "-":
            i += _short_values_taken(command, token)
        elif hasattr(command, "commands") and token in command.commands:
            command = command.commands[token]  # a group's first word names its command; its options follow
    return False


def _option(command: Any, name: str) -> Any:
    return next((p for p in command.params if name in getattr(p, "opts", ()) + getattr(p, "secondary_opts", ())), None)


def _values_taken(command: Any, name: str) -> int:
    """How many following words option `name` of `command` takes as its value (0: a flag, or none such)."""
    p = _option(command, name)
    if p is None or p.param_type_name != "option" or p.is_flag or p.count or getattr(p, "_flag_needs_value", False):
        return 0
    return max(p.nargs, 1)


def _short_values_taken(command: Any, token: str) -> int:
    """Click's reading of `-abc`: flags one after another, until one that takes a value takes the rest of the
    word or, where nothing is left, the next words."""
    for at, letter in enumerate(token[1:], start=2):
        taken = _values_taken(command, "-" + letter)
        if taken:
            return taken if at == len(token) else taken - 1
    return 0


def print_error(message: str, code: int = 1) -> None:
    """`error: <the message's first non-empty line>` on stderr, its text never read as markup. Under `--json`,
    stdout also gets `{"ok": false, "error": <that line>, "code": <the exit status>}` (its exact text): a script
    parses the failure as it parses a result (`verify --json` said `{"ok": false, "error"}` before), and the line
    on stderr stays for people. Not when the command already wrote its JSON result: that stays the one document."""
    from rich.markup import escape

    first = next((line.strip() for line in str(message).splitlines() if line.strip()), "")
    # a server's or a file's words may be in it: shown, not acted on by the terminal
    err_console.print(f"[red]error:[/red] {escape(terminal_text(first))}", highlight=False, soft_wrap=True)
    if json_errors and not json_written:
        sys.stdout.write(json.dumps({"ok": False, "error": first, "code": code}) + "\n")
        sys.stdout.flush()


def terminal_text(text: str) -> str:
    """Text from outside (a model's answer, a repository's file, a server's error) as a terminal may print it: newlines
    and tabs kept (it is code), a CRLF made a newline, and any other character a terminal acts on written as `\\xNN`
    or `\\uNNNN` (`codemoat.text.shown`). A model writes what its prompt leads it to, and its prompt holds retrieved
    repository text: an escape sequence a committer put there (OSC 52 writes the clipboard, others rewrite what the
    screen shows) reached the terminal as sent. rich strips only BEL, BS, VT, FF and CR, not ESC. `--json` output
    keeps the exact text."""
    from ..text import shown

    return shown(text.replace("\r\n", "\n"), keep="\n\t")


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit non-zero."""
    print_error(message, code)
    raise typer.Exit(code)


def emit(data: Any, as_json: bool, human: Callable[[Any], None] | None = None) -> None:
    """Print `data` as JSON, or through `human` for people."""
    global json_written
    if as_json or human is None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        json_written = True
    else:
        human(data)


def emit_failed(data: Any, as_json: bool, human: Callable[[Any], None] | None, message: str, code: int = 1) -> None:
    """Print a result that is itself a failure (audit verify's report of a bad record, index update with a repository
    that could not be read, an update a running server could not serve), then exit `code`. Under `--json` it was the
    result and a bare exit status: a script saw no `error`. The result stays the one document, and a dict result now
    also carries `"ok": false, "error", "code"`, as every `--json` failure does; a list cannot, so the one line goes to
    stderr beside it. For people, `human` tells the failure."""
    if not as_json and human is not None:
        human(data)
    elif isinstance(data, dict):
        first = next((line.strip() for line in str(message).splitlines() if line.strip()), "")
        emit({**data, "ok": False, "error": first, "code": code}, True)
    else:
        emit(data, True)
        print_error(message, code)
    raise typer.Exit(code)


def table(*headers: Any, **kw: Any) -> Any:
    """A rich Table whose cells wrap onto more lines and are never cut short with "…" (a narrow terminal, or
    output piped at 80 columns); a header may be a ready `Column` (`id_column`)."""
    from rich.table import Column, Table

    return Table(*(h if isinstance(h, Column) else Column(h, overflow="fold") for h in headers), **kw)


def id_column(rows: list[dict[str, Any]]) -> Any:
    """A table's "id" column that is never cut short (`lic_24b…` cannot be passed to `license show`):
    on a narrow terminal the other columns give way."""
    from rich.table import Column

    return Column("id", no_wrap=True, min_width=max((len(str(r["id"])) for r in rows), default=2))


def say(text: str, **kw: Any) -> None:
    """One line for people on stdout: names and paths in it are not highlighted, and it is not cut
    at the terminal's width (a path or a token copied from it stays whole)."""
    console.print(text, highlight=False, soft_wrap=True, **kw)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path`; an error is the one line "cannot write PATH: why"."""
    from ..errors import CodemoatError

    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise CodemoatError(f"cannot write {path}: {e.strerror}") from None


def refuse_replacing(path: Path, force: bool, replacing: str = "") -> None:
    """The one line "PATH exists: pass --force to replace it" when something is at `path` and not `force`
    (every command that writes an --out path says it before doing the work)."""
    from ..errors import CodemoatError

    if not force and (path.exists() or path.is_symlink()):
        why = f" ({replacing})" if replacing else ""
        raise CodemoatError(f"{path} exists: pass --force to replace it{why}")


def check_writable(path: Path, force: bool = False, replacing: str = "") -> None:
    """One clear line now, rather than a failure after the work is done, when `path` cannot be written
    (or holds a file that only `--force` may replace)."""
    from ..errors import CodemoatError

    if path.is_dir():
        raise CodemoatError(f"{path} is a folder: name a file to write")
    refuse_replacing(path, force, replacing)
    parent = path.parent
    if not parent.is_dir():
        raise CodemoatError(f"folder {parent} does not exist")


def open_audit_log(s: Settings, *, batched: bool = False) -> AuditLog:
    """This home's audit log (`database_url`, else the home's database) with its head and verified files.
    `batched`: signatures as the server batches them (`audit.sign_every`, `audit.sign_interval_ms`),
    which `verify` needs to know; else every append is signed at once (a one-shot command appends
    nothing later that would sign it)."""
    from .. import paths
    from ..audit.heads import sign_every_for
    from ..audit.log import AuditLog, head_file_for, verified_file_for
    from ..db import open_db

    url = s.database_url or paths.db_url()
    engine = open_db(url)
    batching = (
        {"sign_every": sign_every_for(s.audit.sign_every, engine), "sign_interval_ms": s.audit.sign_interval_ms}
        if batched
        else {}
    )
    return AuditLog(
        engine,
        checkpoint_every=s.audit.checkpoint_every,
        head_file=head_file_for(url, paths.home()),
        verified_file=verified_file_for(url, paths.home()),
        **batching,
    )
