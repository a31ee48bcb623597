"""`codemoat tco`: the cost of this deployment against per-token and per-seat clouds, with every input's source."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .apps import app
from .common import ConfigOpt, JsonFlag, console, emit


def parse_sets(items: list[str]) -> dict[str, float]:
    """`name=value` pairs for the model's inputs (one-line errors)."""
    from dataclasses import fields

    from ..errors import CodemoatError
    from ..tco import Inputs

    names = {f.name for f in fields(Inputs)} - {"sources"}
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in names:
            raise CodemoatError(f"unknown tco input {name!r}: use NAME=VALUE with one of {', '.join(sorted(names))}")
        try:
            v = float(value)
        except ValueError:
            raise CodemoatError(f"tco input {name}: {value!r} is not a number") from None
        out[name] = int(v) if name in ("developers", "gpus_per_server", "months") and v.is_integer() else v
    return out


def _money(v: float) -> str:
    return f"${v:,.0f}" if abs(v) >= 100 else f"${v:,.2f}"


@app.command("tco")
def tco(
    *,
    developers: Annotated[int | None, typer.Option(help="Developers (seats) to plan for.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any input as NAME=VALUE (repeatable), e.g. server_price=42000.")
    ] = None,
    prices: Annotated[
        Path | None, typer.Option(help="Cloud price file (TOML) instead of the dated one shipped with codemoat.")
    ] = None,
    measure: Annotated[bool, typer.Option(help="Measure demand from this server's usage history when it has enough.")] = True,
    config: ConfigOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Monthly and 36-month cost on-prem and for each cloud alternative, break-even, capacity, utilisation."""
    from .. import paths
    from ..config import load_settings
    from ..tco import case

    overrides = parse_sets(set_ or [])
    if developers is not None:
        overrides["developers"] = developers
    engine = None
    if measure:
        from ..db import open_db

        engine = open_db(load_settings(config).database_url or paths.db_url())
    r = case(overrides, engine=engine, prices=prices)

    def human(_d):
        from rich.table import Table

        i = r.inputs
        console.print(
            f"[bold]{i.developers} developers[/bold], {i.active_share:.0%} active: {r.tokens_in_month / 1e6:,.1f}M tokens in, "
            f"{r.tokens_out_month / 1e6:,.1f}M out, {r.accepted_month:,.0f} accepted completions a month",
            highlight=False,
        )
        console.print(
            f"on-prem: {r.servers} server(s), {r.gpus} GPU(s), utilisation {r.gpu_utilisation:.1%} of working hours, "
            f"carries {r.developers_capacity:,} developers at the peak",
            highlight=False,
        )
        t = Table(title=f"cost over {i.months} months", title_justify="left")
        for col in (
            "option",
            "monthly",
            f"{i.months} months",
            "on-prem cheaper from",
            "per dev-month",
            "per 1k accepted",
            "as of",
        ):
            t.add_column(col, justify="left" if col in ("option", "as of") else "right")
        for o in [r.onprem, *r.alternatives]:
            be = "-" if o.kind == "on-prem" else (f"month {o.break_even_month}" if o.break_even_month else "never")
            t.add_row(
                o.name,
                _money(o.monthly),
                _money(o.cumulative[-1]),
                be,
                _money(o.per_developer_month),
                "-" if o.per_1000_accepted is None else _money(o.per_1000_accepted),
                o.as_of or "",
            )
        console.print(t)
        for line in r.verdict:
            console.print(line, highlight=False, markup=False)
        measured = [k for k in ("completions_per_dev_day", "acceptance", "peak_factor") if i.source(k).startswith("measured")]
        console.print(
            f"inputs: {'measured here: ' + ', '.join(measured) if measured else 'published defaults'}; "
            "`--json` lists every input with its source",
            style="dim",
            highlight=False,
        )

    emit(r.to_dict(), as_json, human)
