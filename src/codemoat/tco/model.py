"""The cost of running codemoat on the customer's own hardware against paying a cloud per token or per seat.

Demand (per month, over the *active* developers):
    tokens_in  = active · days · (completions · prompt_tokens + chats · chat_prompt_tokens)
    tokens_out = active · days · (completions · output_tokens + chats · chat_output_tokens)
Load, in GPU-seconds per second of working time (throughputs per GPU, at the target latency):
    load = (tokens_in / prefill_tps + tokens_out / decode_tps) / (days · hours · 3600)
    GPUs = ceil(load · peak_factor), servers = ceil(GPUs / gpus_per_server) (at least one)
On-prem per month: servers · price / (12 · depreciation_years) + power (servers · kW · PUE · 730 h ·
$/kWh) + colocation + support + operations. Cumulatively the servers are paid when bought (month 0,
then again each depreciation period), the rest month by month; break-even is the first month whose
cumulative on-prem cost stays at most the alternative's to the horizon. Per-token clouds bill tokens_in (a share of
it at the cached-input price) and tokens_out; per-seat products bill every developer, active or not.
"LLMflation" (a16z, Nov 2024: the price of equal capability falls ~10x a year) is the sensitivity:
per-token prices scaled by 10^(-(month-1)/12).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import CodemoatError
from .prices import PerSeat, PerToken

HOURS_PER_MONTH = 730  # 8,760 / 12


MAX_INPUT = 1e12  # any count, price or rate: a trillion is past every real case


@dataclass
class Inputs:
    """Every number the model uses; `sources` says where each came from (default, measured, entered)."""

    developers: int = 200
    active_share: float = 0.8
    completions_per_dev_day: float = 115.0  # shown to the developer
    acceptance: float = 0.27
    completion_prompt_tokens: float = 1500.0
    completion_output_tokens: float = 30.0
    chats_per_dev_day: float = 5.0
    chat_prompt_tokens: float = 2500.0
    chat_output_tokens: float = 400.0
    cached_input_share: float = 0.5
    working_days_month: float = 21.0
    working_hours_day: float = 8.0
    peak_factor: float = 2.0
    server_price: float = 35000.0
    gpus_per_server: int = 1
    server_kw: float = 1.0
    pue: float = 1.5
    kwh_price: float = 0.13
    colocation_month: float = 300.0  # per server
    support_month: float = 1000.0
    ops_hours_month: float = 8.0
    ops_hour_price: float = 100.0
    depreciation_years: float = 3.0
    prefill_tps: float = 30000.0  # per GPU
    decode_tps: float = 5103.0  # per GPU
    months: int = 36
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "sources":
                continue
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > MAX_INPUT:  # inf too
                # products of such inputs overflow to inf (and inf · 0 to NaN); an int past a float's range cannot even
                # be tested with math.isfinite
                raise CodemoatError(f"tco input {f.name} must be at most {MAX_INPUT:.0e}")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise CodemoatError(f"tco input {f.name} must be a number ≥ 0, not {v!r}")
        for name in (
            "developers",
            "prefill_tps",
            "decode_tps",
            "working_days_month",
            "working_hours_day",
            "gpus_per_server",
            "depreciation_years",
            "months",
        ):
            if getattr(self, name) <= 0:
                raise CodemoatError(f"tco input {name} must be above 0")
        for name in ("active_share", "acceptance", "cached_input_share"):
            if getattr(self, name) > 1:
                raise CodemoatError(f"tco input {name} is a share: between 0 and 1")
        if self.months > 120 or self.months != int(self.months):
            raise CodemoatError("tco: at most 120 months, a whole number of them")

    def source(self, name: str) -> str:
        return self.sources.get(name, "default")


@dataclass
class Option:
    name: str
    kind: str  # on-prem | per-token | per-seat
    monthly: float
    cumulative: list[float]
    per_developer_month: float
    per_1000_accepted: float | None
    break_even_month: int | None = None  # when on-prem becomes cheaper than this option (None: not within the horizon)
    as_of: str | None = None
    source: str | None = None
    llmflation_cumulative: list[float] | None = None  # per-token options only
    llmflation_break_even_month: int | None = None


@dataclass
class Result:
    inputs: Inputs
    tokens_in_month: float
    tokens_out_month: float
    accepted_month: float
    load_avg: float  # GPU-seconds per second of working time
    load_peak: float
    servers: int
    gpus: int
    gpu_utilisation: float  # average over working hours
    developers_capacity: int  # developers these servers carry at the peak
    onprem: Option
    alternatives: list[Option]
    onprem_breakdown: dict[str, float]
    verdict: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = {
            f.name: {"value": getattr(self.inputs, f.name), "source": self.inputs.source(f.name)}
            for f in fields(self.inputs)
            if f.name != "sources"
        }
        return d


def _break_even(onprem: list[float], other: list[float]) -> int | None:
    """The month from which on-prem's cumulative cost stays at or below `other`'s to the horizon (falling
    cloud prices can make the curves cross back), or None."""
    month = None
    for m in range(len(onprem) - 1, -1, -1):
        if onprem[m] > other[m]:
            break
        month = m + 1
    return month


def compute(i: Inputs, per_token: list[PerToken], per_seat: list[PerSeat]) -> Result:
    """The whole cost case (see the module docstring for every formula)."""
    active = i.developers * i.active_share
    days = i.working_days_month
    tokens_in = (
        active * days * (i.completions_per_dev_day * i.completion_prompt_tokens + i.chats_per_dev_day * i.chat_prompt_tokens)
    )
    tokens_out = (
        active * days * (i.completions_per_dev_day * i.completion_output_tokens + i.chats_per_dev_day * i.chat_output_tokens)
    )
    accepted = active * days * i.completions_per_dev_day * i.acceptance
    work_seconds = days * i.working_hours_day * 3600
    load_avg = (tokens_in / i.prefill_tps + tokens_out / i.decode_tps) / work_seconds
    load_peak = load_avg * i.peak_factor
    gpus_needed = max(1, math.ceil(load_peak - 1e-12))
    servers = math.ceil(gpus_needed / i.gpus_per_server)
    gpus = servers * i.gpus_per_server
    utilisation = load_avg / gpus
    capacity = math.floor(gpus * i.developers / load_peak) if load_peak > 0 else 0

    capex = servers * i.server_price
    breakdown = {
        "hardware (depreciation)": capex / (12 * i.depreciation_years),
        "power": servers * i.server_kw * i.pue * HOURS_PER_MONTH * i.kwh_price,
        "colocation": servers * i.colocation_month,
        "support": i.support_month,
        "operations": i.ops_hours_month * i.ops_hour_price,
    }
    opex = sum(v for k, v in breakdown.items() if k != "hardware (depreciation)")
    period = 12 * i.depreciation_years
    onprem_cum = [capex * math.ceil(m / period) + opex * m for m in range(1, i.months + 1)]

    def per_k(monthly: float) -> float | None:
        return monthly / (accepted / 1000) if accepted > 0 else None

    monthly_onprem = sum(breakdown.values())
    onprem = Option(
        "codemoat on-prem", "on-prem", monthly_onprem, onprem_cum, monthly_onprem / i.developers, per_k(monthly_onprem)
    )
    alts: list[Option] = []
    for p in per_token:
        monthly = (
            tokens_in * ((1 - i.cached_input_share) * p.input + i.cached_input_share * p.cached_input) + tokens_out * p.output
        ) / 1e6
        cum = [monthly * m for m in range(1, i.months + 1)]
        falling, total = [], 0.0
        for m in range(1, i.months + 1):
            total += monthly * 10 ** (-(m - 1) / 12)
            falling.append(total)
        alts.append(
            Option(
                p.name,
                "per-token",
                monthly,
                cum,
                monthly / i.developers,
                per_k(monthly),
                _break_even(onprem_cum, cum),
                p.as_of,
                p.source,
                falling,
                _break_even(onprem_cum, falling),
            )
        )
    for s in per_seat:
        monthly = i.developers * s.per_seat_month
        cum = [monthly * m for m in range(1, i.months + 1)]
        alts.append(
            Option(
                s.name,
                "per-seat",
                monthly,
                cum,
                monthly / i.developers,
                per_k(monthly),
                _break_even(onprem_cum, cum),
                s.as_of,
                s.source,
            )
        )
    return Result(
        i,
        tokens_in,
        tokens_out,
        accepted,
        load_avg,
        load_peak,
        servers,
        gpus,
        utilisation,
        capacity,
        onprem,
        alts,
        breakdown,
        _verdict(i, onprem, alts),
    )


def _verdict(i: Inputs, onprem: Option, alts: list[Option]) -> list[str]:
    """Plain sentences, including where on-prem loses."""
    out = []
    h = i.months
    beaten = [a for a in alts if a.break_even_month is not None]
    losing = [a for a in alts if a.break_even_month is None]
    if beaten:
        first = min(beaten, key=lambda a: a.break_even_month or 0)
        out.append(
            f"On-prem pays for itself against {len(beaten)} of {len(alts)} alternatives within {h} months "
            f"(first: {first.name}, in month {first.break_even_month})."
        )
    if losing:
        cheapest = min(losing, key=lambda a: a.cumulative[-1])
        out.append(
            f"On-prem loses against {len(losing)} of {len(alts)} alternatives over {h} months: {cheapest.name} costs "
            f"${cheapest.cumulative[-1]:,.0f} against ${onprem.cumulative[-1]:,.0f} on-prem."
        )
    flation = [
        a for a in alts if a.kind == "per-token" and a.break_even_month is not None and a.llmflation_break_even_month is None
    ]
    if flation:
        out.append(f"If per-token prices fall 10x a year, on-prem no longer beats {', '.join(a.name for a in flation)}.")
    return out
