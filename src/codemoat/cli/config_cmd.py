"""`codemoat config show`: every setting, its value and what it does."""

from __future__ import annotations


from rich.table import Table

from .apps import config_app
from .common import ConfigOpt, JsonFlag, console, emit


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
        t = Table("setting", "value", "environment", "description")
        for r in d:
            t.add_row(r["setting"], repr(r["value"]), r["env"], r["description"])
        console.print(t)

    emit(rows, as_json, human)
