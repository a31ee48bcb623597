"""Where the model's inputs come from: published defaults (cited), or this server's own history.

With enough history in the usage tables (`MIN_COMPLETIONS` completions in the window), the demand
inputs are measured: completions and chats per active developer-day, their token sizes, the
acceptance rate (with at least `MIN_VIEWS` views) and the peak-hour factor (busiest hour / mean of
the hours with traffic). Everything else keeps its default or what the admin entered.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from ..usage.tables import completions, events

MIN_COMPLETIONS = 100
MIN_VIEWS = 50

ZIEGLER = 'Ziegler et al., "Measuring GitHub Copilot\'s Impact on Productivity", CACM 67(3), 2024'
DEFAULT_SOURCES = {
    "developers": "entered (default: an illustrative 200)",
    "active_share": "estimate: 80% of seats active on a working day",
    "completions_per_dev_day": f"{ZIEGLER}: ~115 completions shown per user per day",
    "acceptance": f"{ZIEGLER}: ~27% of shown completions accepted",
    "completion_prompt_tokens": "estimate: a FIM prompt with cross-file context (codemoat's retrieval budget)",
    "completion_output_tokens": "estimate: one to three lines of code",
    "chats_per_dev_day": "estimate",
    "chat_prompt_tokens": "estimate: a question with retrieved code",
    "chat_output_tokens": "estimate",
    "cached_input_share": "estimate: repeated prefixes billed at the cached-input price",
    "working_days_month": "21 working days a month",
    "working_hours_day": "8 working hours a day",
    "peak_factor": "estimate: the busiest hour carries twice the mean",
    "server_price": "estimate: one 1-GPU (H100 PCIe class) server, list prices vary by vendor",
    "gpus_per_server": "the server above",
    "server_kw": "estimate: GPU (350 W TDP) + host under load",
    "pue": "Uptime Institute Global Data Center Survey 2024: average PUE ~1.56",
    "kwh_price": "US EIA, average commercial electricity price 2024: ~$0.13/kWh",
    "colocation_month": "estimate: one server's rack space and network",
    "support_month": "estimate: the vendor's service subscription",
    "ops_hours_month": "estimate: an admin's time for updates and users",
    "ops_hour_price": "estimate: loaded hourly cost of an admin",
    "depreciation_years": "3-year straight-line depreciation",
    "prefill_tps": "estimate for a 7-8B model on one H100: 16 GFLOP/token at ~50% of 989 dense BF16 TFLOPS",
    "decode_tps": "MLPerf Inference v5.1, Llama 3.1 8B, Server scenario (TTFT/TPOT limits), 1x H100, vLLM 0.10 FP8 "
    "(Red Hat's submission): 5,103 tokens/s",
    "months": "36-month horizon",
}


def _hour(dialect: str):
    # an integer hour number on both backends (SQLite's CAST truncates; PostgreSQL's would round)
    return sa.cast(completions.c.ts / 3600, sa.Integer) if dialect == "sqlite" else sa.func.floor(completions.c.ts / 3600)


def measured(engine: Engine, *, days: int = 28, now: float | None = None) -> dict[str, tuple[float, str]]:
    """Inputs measured from the last `days` days of usage, each as (value, "measured: …"); {} without enough history."""
    start = (time.time() if now is None else now) - days * 86400
    c_in = completions.c.ts >= start
    with engine.connect() as c:
        n = int(
            c.execute(
                sa.select(sa.func.count()).select_from(completions).where(c_in, completions.c.kind == "completion")
            ).scalar()
            or 0
        )
        if n < MIN_COMPLETIONS:
            return {}
        dev_days = int(
            c.execute(
                sa.select(sa.func.count()).select_from(
                    sa.select(completions.c.user, completions.c.day).where(c_in).distinct().subquery()
                )
            ).scalar()
            or 0
        )
        stats: dict[str, Any] = {}
        for kind in ("completion", "chat"):
            r = c.execute(
                sa.select(
                    sa.func.count(), sa.func.avg(completions.c.prompt_tokens), sa.func.avg(completions.c.completion_tokens)
                ).where(c_in, completions.c.kind == kind)
            ).one()
            stats[kind] = (int(r[0] or 0), float(r[1] or 0), float(r[2] or 0))
        e_t = events.c.type
        views, selects = c.execute(
            sa.select(
                sa.func.sum(sa.case((e_t == "view", 1), else_=0)), sa.func.sum(sa.case((e_t == "select", 1), else_=0))
            ).where(events.c.ts >= start, events.c.matched.is_(True))
        ).one()
        hour = _hour(engine.dialect.name).label("h")
        per_hour = sa.select(hour, sa.func.count().label("n")).where(c_in).group_by(hour).subquery()
        peak, mean = c.execute(sa.select(sa.func.max(per_hour.c.n), sa.func.avg(per_hour.c.n))).one()
    where = f"measured: last {days} days of this server's usage"
    out = {
        "completions_per_dev_day": (
            stats["completion"][0] / dev_days,
            f"{where} ({stats['completion'][0]} completions, {dev_days} developer-days)",
        ),
        "chats_per_dev_day": (stats["chat"][0] / dev_days, where),
        "completion_prompt_tokens": (stats["completion"][1], where),
        "completion_output_tokens": (stats["completion"][2], where),
    }
    if stats["chat"][0]:
        out["chat_prompt_tokens"] = (stats["chat"][1], where)
        out["chat_output_tokens"] = (stats["chat"][2], where)
    if (views or 0) >= MIN_VIEWS:
        out["acceptance"] = (float(selects or 0) / float(views), f"{where} ({int(selects or 0)} of {int(views)} viewed)")
    if mean:
        out["peak_factor"] = (float(peak) / float(mean), f"{where} (busiest hour / mean hour with traffic)")
    return out
