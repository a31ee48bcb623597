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

from ..usage.rollup import LANG_DIMS, USER_DIMS, facts, per_hour, whole_days

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


def measured(engine: Engine, *, days: int = 28, now: float | None = None) -> dict[str, tuple[float, str]]:
    """Inputs measured from the last `days` days of usage, each as (value, "measured: …"); {} without enough history."""
    start = whole_days(days, time.time() if now is None else now)  # the last `days` UTC days: the daily roll-up alone
    f, fu = facts(since=start, dims=LANG_DIMS), facts(since=start, dims=USER_DIMS)
    with engine.connect() as c:
        r = c.execute(
            sa.select(*(sa.func.sum(f.c[k]) for k in ("completions", "chats", "c_prompt", "c_output", "h_prompt", "h_output")))
        ).one()
        n, chats, c_prompt, c_output, h_prompt, h_output = (int(v or 0) for v in r)
        if n < MIN_COMPLETIONS:
            return {}
        made = sa.select(fu.c.user, fu.c.day).where(fu.c.completions + fu.c.chats > 0).distinct().subquery()
        dev_days = int(c.execute(sa.select(sa.func.count()).select_from(made)).scalar() or 0)
        views, selects = c.execute(sa.select(sa.func.sum(f.c.views), sa.func.sum(f.c.selects))).one()
        peak, mean = per_hour(c, since=start)
    stats: dict[str, Any] = {
        "completion": (n, c_prompt / n, c_output / n),
        "chat": (chats, h_prompt / chats if chats else 0.0, h_output / chats if chats else 0.0),
    }
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
