"""bench/tune.py adds its run to bench/results/tune.md and keeps what others wrote there."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "tune.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_tune", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_run_adds_its_section_first_and_keeps_every_other_section_as_it_was():
    b = _bench()
    old = (
        f"{b.TITLE}\n\n## Session 9, quiet machine\n\nfigures by hand\n\n### Recipe experiments\n\n| a | b |\n\n"
        "## vLLM LoRA on the CPU build (bench/tune_vllm_lora.py)\n\nanother bench's rows\n"
    )
    new = "## 2026-12-05 03:00 UTC: 10 minutes on rich,httpx\n\n| measure | base |\n"
    out = b.merge(old, new)
    assert out.startswith(f"{b.TITLE}\n\n{new}")
    for kept in ("## Session 9, quiet machine\n\nfigures by hand", "### Recipe experiments\n\n| a | b |", "another bench's rows"):
        assert kept in out
    assert out.count(b.TITLE) == 1
    again = b.merge(out, new.replace("| base |", "| rerun |"))  # the same heading: that section replaced
    assert again.count("## 2026-12-05 03:00 UTC") == 1 and "| rerun |" in again and "another bench's rows" in again
    assert b.merge("", new) == f"{b.TITLE}\n\n{new}"
