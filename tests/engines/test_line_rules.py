"""llama.cpp server's line rules for editors, as the worker engines apply them (StopCutter):
`n_indent` and `t_max_predict_ms` (tools/server/server.cpp, process_token), and the timings."""

from codemoat.engines import worker
from codemoat.engines.worker import StopCutter


def run(pieces, stops=(), n_indent=0, time_limit_ms=None, clock=None):
    """Feeds `pieces` one token each, as an engine loop does; returns (text, finish_reason, last chunk)."""
    out = []
    c = StopCutter(list(stops), out.append, n_indent, time_limit_ms)
    text, reason = "", "length"
    for i, p in enumerate(pieces):
        if clock is not None:
            clock.now = clock.times[i]
        text += p
        if c.feed(text, i):
            reason = "stop"
            break
    c.finish(reason)
    return "".join(ch.text for ch in out), out[-1].finish_reason, out[-1]


def test_n_indent_cuts_the_first_line_indented_less():
    body = ["    x = 1\n", "    y = 2\n", "z = 3\n", "    w = 4\n"]
    text, reason, _ = run(body, n_indent=4)
    assert text == "    x = 1\n    y = 2\n" and reason == "length"  # llama.cpp: stop_type "limit"
    # the indentation that was generated stays; the cut is before the line's first other character
    text, _, _ = run(["a\n", "  ", "b"], n_indent=4)
    assert text == "a\n  "


def test_n_indent_never_checks_the_first_line_and_counts_tabs():
    text, reason, _ = run(["x = 1\n", "\ty\n", "\t\tz\n"], n_indent=1)
    assert text == "x = 1\n\ty\n\t\tz\n" and reason == "length"  # ran to max tokens: nothing cut
    assert run(["x = 1\n", "\ty\n"], n_indent=2)[0] == "x = 1\n\t"


def test_n_indent_an_empty_line_ends_it_as_in_llama_cpp():
    assert run(["    a\n", "\n", "    b\n"], n_indent=4)[0] == "    a\n"


def test_n_indent_off_and_lines_split_across_tokens():
    body = ["    a\n", "b\n"]
    assert run(body)[0] == "    a\nb\n"  # 0: off
    assert run(["    a", "\n ", "   b", "\n  c"], n_indent=4)[0] == "    a\n    b\n  "


def test_stop_string_before_an_indent_cut_wins():
    text, reason, _ = run(["  a<EOT>\nb"], stops=["<EOT>"], n_indent=2)
    assert text == "  a" and reason == "stop"


class Clock:
    def __init__(self, times):
        self.times, self.now = times, times[0]

    def __call__(self):
        return self.now


def test_time_limit_ends_at_the_next_newline_after_the_limit(monkeypatch):
    # first token at t=0; the limit (100 ms) passes at the third token, which has no newline;
    # generation ends with the fourth, which holds one, and the line is kept whole
    clock = Clock([0.0, 0.05, 0.2, 0.25, 0.3, 0.35])
    monkeypatch.setattr(worker.time, "perf_counter", clock)
    text, reason, last = run(["a\n", "b", "c", "d\n", "e", "f\n"], time_limit_ms=100, clock=clock)
    assert text == "a\nbcd\n" and reason == "length"
    assert last.timings.predicted_ms == 250


def test_no_time_limit_or_not_yet_reached(monkeypatch):
    clock = Clock([0.0, 0.05, 0.2, 0.25])
    monkeypatch.setattr(worker.time, "perf_counter", clock)
    assert run(["a\n", "b\n", "c\n", "d\n"], clock=clock)[0] == "a\nb\nc\nd\n"
    clock = Clock([0.0, 0.01, 0.02, 0.03])
    monkeypatch.setattr(worker.time, "perf_counter", clock)
    assert run(["a\n", "b\n", "c\n", "d\n"], time_limit_ms=100, clock=clock)[0] == "a\nb\nc\nd\n"


def test_timings_split_prompt_and_generation(monkeypatch):
    clock = Clock([1.0, 1.5, 1.75, 2.0])
    monkeypatch.setattr(worker.time, "perf_counter", clock)
    out = []
    c = StopCutter([], out.append)  # made at t=1.0: the job starts, the prompt is evaluated next
    for i, t in enumerate([1.5, 1.75]):  # two tokens: "a", then "b"
        clock.now = t
        c.feed("ab"[: i + 1], i)
    clock.now = 2.0
    c.finish("length")
    assert (out[-1].timings.prompt_ms, out[-1].timings.predicted_ms) == (500, 500)


def test_a_stop_string_holds_back_only_the_tail_that_could_begin_it():
    """As llama.cpp's server: text goes out with its token unless its end could still become a stop string.
    Holding back as many characters as the longest stop string kept a FIM answer's first 18 characters
    (`<|file_separator|>`, a template's stop) from the client, so its first token came several tokens late."""
    out = []
    c = StopCutter(["<|file_separator|>", "\n\n"], out.append)
    sent = lambda: "".join(ch.text for ch in out)  # noqa: E731
    assert not c.feed("def", 1)
    assert sent() == "def"  # the first token's text goes with it
    assert not c.feed("def f():\n", 2)
    assert sent() == "def f():"  # "\n" may begin "\n\n"
    assert not c.feed("def f():\n    <|fi", 3)
    assert sent() == "def f():\n    "  # "<|fi" may begin "<|file_separator|>"
    assert c.feed("def f():\n    <|file_separator|>", 4)
    c.finish("stop")
    assert sent() == "def f():\n    " and out[-1].finish_reason == "stop"
    assert [t for ch in out for t in ch.token_ids] == [1, 2, 3, 4]  # every token is counted once
