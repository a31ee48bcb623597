"""The cost model against an example worked out by hand (the numbers are written out, not computed
by the model's code), its honesty where on-prem loses, and its inputs measured from usage."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from codemoat.errors import CodemoatError
from codemoat.tco import Inputs, PerSeat, PerToken, compute, load_prices, measured

# 100 developers, half active, 20 days x 8 h, 100 completions a day of 1,000 tokens in and 50 out,
# 25% accepted, no chat; one $36,000 server (1 GPU, 1 kW, PUE 1.5, $0.10/kWh, $200 colocation),
# $500 support, 10 h of operations at $100, 3 years; 5,000 tokens/s prefill and 100 decode.
HAND = Inputs(
    developers=100,
    active_share=0.5,
    completions_per_dev_day=100,
    acceptance=0.25,
    completion_prompt_tokens=1000,
    completion_output_tokens=50,
    chats_per_dev_day=0,
    cached_input_share=0,
    working_days_month=20,
    working_hours_day=8,
    peak_factor=2,
    server_price=36000,
    gpus_per_server=1,
    server_kw=1,
    pue=1.5,
    kwh_price=0.10,
    colocation_month=200,
    support_month=500,
    ops_hours_month=10,
    ops_hour_price=100,
    depreciation_years=3,
    prefill_tps=5000,
    decode_tps=100,
    months=36,
)
TOKENS = PerToken("api", input=3.0, cached_input=0.3, output=15.0, as_of="2025-08-01", source="test")
SEAT = PerSeat("cheap seat", 19.0, "2025-08-01", "test")
DEAR = PerSeat("dear seat", 100.0, "2025-08-01", "test")


def test_hand_worked_example():
    r = compute(HAND, [TOKENS], [SEAT, DEAR])
    # 50 active x 20 days x 100 completions x 1,000 tokens; x 50 tokens out; x 25% accepted
    assert r.tokens_in_month == 100_000_000 and r.tokens_out_month == 5_000_000 and r.accepted_month == 25_000
    # (100e6 / 5,000 + 5e6 / 100) GPU-s over 20 x 8 x 3,600 s = 70,000 / 576,000; peak x2
    assert r.load_avg == pytest.approx(0.121528, abs=1e-6) and r.load_peak == pytest.approx(0.243056, abs=1e-6)
    assert (r.servers, r.gpus) == (1, 1) and r.gpu_utilisation == pytest.approx(0.121528, abs=1e-6)
    assert r.developers_capacity == 411  # 100 / 0.243056 = 411.4
    # 36,000/36 = 1,000; 1 kW x 1.5 x 730 h x $0.10 = 109.50; 200; 500; 10 x 100 = 1,000
    assert r.onprem_breakdown == pytest.approx(
        {"hardware (depreciation)": 1000, "power": 109.5, "colocation": 200, "support": 500, "operations": 1000}
    )
    assert r.onprem.monthly == pytest.approx(2809.50)
    assert r.onprem.per_developer_month == pytest.approx(28.095) and r.onprem.per_1000_accepted == pytest.approx(112.38)
    # cumulative: the server bought in month 0, then 1,809.50 a month
    assert r.onprem.cumulative[0] == pytest.approx(37809.50) and r.onprem.cumulative[35] == pytest.approx(101142.0)
    api, cheap, dear = r.alternatives
    # 100 M x $3 + 5 M x $15 = $375 a month; $15 per 1,000 accepted
    assert api.monthly == pytest.approx(375.0) and api.per_1000_accepted == pytest.approx(15.0)
    assert api.cumulative[35] == pytest.approx(13500.0) and api.break_even_month is None
    # prices falling 10x a year: 375 x (1 - 10^-3) / (1 - 10^(-1/12)) = 2,145.6
    assert api.llmflation_cumulative[35] == pytest.approx(2145.6, abs=0.5)
    # $19 x 100 = 1,900 a month: 36,000 + 1,809.5 m <= 1,900 m only after month 397, so never within 36
    assert cheap.monthly == pytest.approx(1900.0) and cheap.break_even_month is None
    # $100 x 100 = 10,000 a month: month 4: 43,238 > 40,000; month 5: 45,047.50 <= 50,000
    assert dear.monthly == pytest.approx(10000.0) and dear.break_even_month == 5
    assert any("loses against 2 of 3" in v and "api" in v for v in r.verdict)
    assert any("pays for itself against 1 of 3" in v and "month 5" in v for v in r.verdict)


def test_more_demand_buys_more_servers_and_a_second_purchase_after_depreciation():
    from dataclasses import replace

    big = replace(HAND, developers=1000, gpus_per_server=2, depreciation_years=1)
    r = compute(big, [], [DEAR])
    # load peak 2.43056 -> 3 GPUs -> 2 servers of 2; capacity 4 GPUs x 1000 / 2.43056 = 1645.7
    assert (r.servers, r.gpus, r.developers_capacity) == (2, 4, 1645)
    opex = 2 * 109.5 + 2 * 200 + 500 + 1000
    assert r.onprem.cumulative[11] == pytest.approx(72000 + 12 * opex)
    assert r.onprem.cumulative[12] == pytest.approx(144000 + 13 * opex)  # month 13: replaced


def test_on_prem_loses_with_few_developers_and_says_so():
    from dataclasses import replace

    r = compute(replace(HAND, developers=5), [TOKENS], [SEAT])
    assert all(a.break_even_month is None for a in r.alternatives)
    assert r.verdict and r.verdict[0].startswith("On-prem loses against 2 of 2")


@pytest.mark.parametrize(
    "bad", [{"developers": 0}, {"acceptance": 1.5}, {"server_price": -1}, {"decode_tps": float("nan")}, {"months": 10_000}]
)
def test_bad_inputs_are_one_line_errors(bad):
    from dataclasses import asdict

    with pytest.raises(CodemoatError):
        Inputs(**{**asdict(HAND), **bad})


def test_shipped_prices_are_dated_and_sourced(tmp_path):
    tok, seat = load_prices()
    assert len(tok) >= 3 and len(seat) >= 3
    for p in [*tok, *seat]:
        assert p.as_of[:2] == "20" and p.source.startswith("https://")
    bad = tmp_path / "p.toml"
    bad.write_text('[[per_seat]]\nname = "x"\nper_seat_month = -3\nas_of = "2025"\nsource = "s"\n')
    with pytest.raises(CodemoatError, match="number"):
        load_prices(bad)
    bad.write_text("[[per_token]\n")
    with pytest.raises(CodemoatError, match="not valid TOML"):
        load_prices(bad)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "lists no alternative"),
        ("x = 1\n", "unknown 'x'"),
        ('[[per_tokens]]\nname = "X"\ninput = 1.0\noutput = 2.0\nas_of = "2026-01-01"\nsource = "s"\n', "unknown 'per_tokens'"),
        ('[per_token]\nname = "X"\ninput = 1.0\noutput = 2.0\nas_of = "2026-01-01"\nsource = "s"\n', "double brackets"),
        ("per_token = []\nper_seat = []\n", "lists no alternative"),
    ],
)
def test_a_price_file_that_prices_nothing_is_refused(tmp_path, text, why):
    """Was broken: a price file whose tables were misspelt ([[per_tokens]]), single-bracketed or absent was read as
    no alternatives at all, and `codemoat tco --prices` compared on-prem against nothing, exit 0. The positive beside
    it: one [[per_token]] entry of one's own is the whole comparison."""
    f = tmp_path / "my-prices.toml"
    f.write_text(text)
    r = run_cli("tco", "--prices", str(f))
    assert r.returncode == 1 and why in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    f.write_text('[[per_token]]\nname = "Ours"\ninput = 1.0\noutput = 2.0\nas_of = "2026-01-01"\nsource = "s"\n')
    assert [t.name for t in load_prices(f)[0]] == ["Ours"] and load_prices(f)[1] == []
    r = run_cli("tco", "--prices", str(f), "--json")
    assert r.returncode == 0 and [a["name"] for a in json.loads(r.stdout)["alternatives"]] == ["Ours"], r.stderr


def test_inputs_measured_from_usage_history(home):
    from codemoat.db import open_db
    from codemoat.usage import UsageStore

    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    s = UsageStore(engine)
    now = 1_780_000_000.0

    class F:
        protocol, snippets, completion_text, event, choice_index, select_kind, language = "tabby", [], "x", None, None, None, "py"

        def __init__(self, i, pt, ct):
            self.completion_id, self.prompt_tokens, self.completion_tokens = f"cmpl-{i:024x}", pt, ct

    assert measured(engine, now=now) == {}  # no history: the defaults stand
    # two developers on one day: 120 completions (prompt 800, output 20); 90 in one hour, 30 in another
    for i in range(120):
        t = now - 3600 * 5 - (0 if i < 90 else 7200)
        s.record("ann" if i % 2 else "bob", "/v1/completions", 200, 10, F(i, 800, 20), now=t)
        s.record_event("ann" if i % 2 else "bob", "view", completion_id=f"cmpl-{i:024x}", now=t)
        if i % 4 == 0:
            s.record_event("ann" if i % 2 else "bob", "select", completion_id=f"cmpl-{i:024x}", now=t)
    m = measured(engine, now=now)
    assert m["completions_per_dev_day"][0] == 60 and m["completion_prompt_tokens"][0] == 800
    assert m["completion_output_tokens"][0] == 20 and m["acceptance"][0] == 0.25
    assert m["peak_factor"][0] == 1.5  # 90 / mean(90, 30)
    assert all(v[1].startswith("measured") for v in m.values())


def test_cli_json_and_bad_flag():
    r = run_cli("tco", "--developers", "2000", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["inputs"]["developers"] == {"value": 2000, "source": "entered"}
    assert d["inputs"]["acceptance"]["source"].startswith("Ziegler")
    assert {a["kind"] for a in d["alternatives"]} == {"per-token", "per-seat"} and len(d["onprem"]["cumulative"]) == 36
    bad = run_cli("tco", "--set", "acceptance=2")
    assert bad.returncode == 1 and "share" in bad.stderr and bad.stderr.count("\n") == 1
    bad = run_cli("tco", "--set", "nonsense=2")
    assert bad.returncode == 1 and "unknown tco input" in bad.stderr


def test_break_even_is_where_on_prem_stays_cheaper():
    """With prices falling 10x a year the curves can cross twice; break-even is the month from which
    on-prem stays cheaper to the horizon, and none when the cloud overtakes it again."""
    from dataclasses import replace

    # 40x the demand (4,000 developers) on one server 100x faster: the API costs $375 x 40 = $15,000 a month
    r = compute(replace(HAND, developers=4000, prefill_tps=500_000, decode_tps=10_000), [TOKENS], [])
    assert r.servers == 1
    api = r.alternatives[0]
    assert api.monthly == pytest.approx(15000.0)
    assert api.break_even_month is not None
    crossed = [m + 1 for m in range(36) if r.onprem.cumulative[m] <= api.llmflation_cumulative[m]]
    assert crossed and crossed[-1] < 36  # cheaper for a while, then the falling cloud passes it again
    assert api.llmflation_break_even_month is None


@pytest.mark.parametrize(
    "sets",
    [
        ["gpus_per_server=1e-320"],  # ceil() of an infinity: OverflowError
        ["decode_tps=1e-300", "kwh_price=1e12"],  # no exception, amounts of inf
        ["prefill_tps=1e-290", "server_price=1e12", "depreciation_years=1e-6"],
    ],
    ids=["ceil-of-inf", "inf-amounts", "inf-capex"],
)
def test_inputs_whose_arithmetic_overflows_are_a_one_line_error(sets):
    """Was: each input in range, but `codemoat tco` printed "error: OverflowError: cannot convert float infinity to
    integer", or a table of $inf, and the console's chart of one was a 500. Now one line that says what happened,
    in the CLI and on /admin/costs (tests/console/test_console_outside.py)."""
    r = run_cli("tco", "--no-measure", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert r.stderr.strip().startswith("error: these inputs overflow the model's arithmetic"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "inf" not in r.stdout
