"""Shared CLI plumbing: one-line errors, `--json` output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def print_error(message: str) -> None:
    """`error: <the message's first non-empty line>` on stderr, its text never read as markup."""
    from rich.markup import escape

    first = next((line.strip() for line in str(message).splitlines() if line.strip()), "")
    err_console.print(f"[red]error:[/red] {escape(first)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit non-zero."""
    print_error(message)
    raise typer.Exit(code)


def emit(data: Any, as_json: bool, human: Callable[[Any], None] | None = None) -> None:
    """Print `data` as JSON, or through `human` for people."""
    if as_json or human is None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        human(data)
