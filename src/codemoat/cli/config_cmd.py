"""`codemoat config show`: every setting, its value and what it does."""

from __future__ import annotations


from rich.table import Column, Table

from .apps import config_app
from .common import ConfigOpt, JsonFlag, console, emit, say


@config_app.command("show")
def config_show(
    *,
    config: ConfigOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Show the effective configuration (file, then CODEMOAT_* environment) with descriptions."""
    from ..config import describe, load_settings

    s = load_settings(config).model_dump()
    rows = []
    for name, desc, _default in describe():
        node = s
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        rows.append({"setting": name, "value": node, "env": "CODEMOAT_" + name.upper().replace(".", "__"), "description": desc})

    def human(d):
        # Names whole (they are what a TOML file and the environment take); no environment column, which a
        # 120-column terminal cut short for most settings: its rule is one line, and `--json` lists each.
        width = max((len(r["setting"]) for r in d), default=7)
        t = Table(
            Column("setting", no_wrap=True, min_width=width),
            Column("value", overflow="fold"),
            Column("description", overflow="fold"),
        )
        for r in d:
            t.add_row(r["setting"], repr(r["value"]), r["description"])
        console.print(t)
        say("environment: CODEMOAT_ and the setting in capitals, '.' as '__' (server.port: CODEMOAT_SERVER__PORT)")

    emit(rows, as_json, human)
