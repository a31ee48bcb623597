"""`codemoat usage report`: completions, acceptance and activity, from the shared database."""

from __future__ import annotations

import csv
import sys
from typing import Annotated

import typer

from .apps import usage_app
from .common import ConfigOpt, JsonFlag, console, emit

COLUMNS = (
    "key",
    "completions",
    "chats",
    "users",
    "views",
    "selects",
    "dismisses",
    "acceptance",
    "accepted_chars",
    "accepted_lines",
    "prompt_tokens",
    "completion_tokens",
)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


@usage_app.command("report")
def usage_report(
    *,
    since: Annotated[str, typer.Option(help="From when: an ISO date/time or a duration back from now (7d, 2w).")] = "30d",
    by: Annotated[str, typer.Option(help="One row per: day, user, language, protocol or group.")] = "day",
    user: Annotated[str | None, typer.Option(help="Only this user.")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print the rows as CSV.")] = False,
    config: ConfigOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Acceptance rate (selected / viewed), completions, tokens, active and engaged users, latency."""
    from .. import paths
    from ..audit.log import parse_since
    from ..config import load_settings
    from ..db import open_db
    from ..usage import report

    s = load_settings(config)
    rep = report(open_db(s.database_url or paths.db_url()), by=by, since=parse_since(since), user=user)
    data = rep.to_dict()
    if as_csv:
        w = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in [*data["rows"], data["total"]]:
            w.writerow(r)
        return

    def human(d):
        from rich.table import Table

        t = Table(title=f"usage since {since}, by {by}", title_justify="left")
        for col in ("key", "completions", "chats", "users", "views", "selects", "acceptance", "accepted lines", "tokens in/out"):
            t.add_column(col, justify="left" if col == "key" else "right")
        for r in [*d["rows"], d["total"]]:
            t.add_row(
                r["key"],
                str(r["completions"]),
                str(r["chats"]),
                str(r["users"]),
                str(r["views"]),
                str(r["selects"]),
                _pct(r["acceptance"]),
                str(r["accepted_lines"]),
                f"{r['prompt_tokens']}/{r['completion_tokens']}",
            )
        console.print(t)
        lat = d["latency_ms"]
        console.print(
            f"latency p50 {lat['p50']} ms, p95 {lat['p95']} ms; active users (1/7/28 d) "
            f"{'/'.join(str(v) for v in d['active_users'].values())}, engaged "
            f"{'/'.join(str(v) for v in d['engaged_users'].values())}; events naming no completion of "
            f"their user: {d['unmatched_events']}",
            highlight=False,
            markup=False,
        )

    emit(data, as_json, human)
