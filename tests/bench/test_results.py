"""bench/_results.py: a bench's run goes first in its results file and every part it does not write stays
byte for byte (earlier runs, other benches' sections, notes written by hand)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


R = _load("_results")
T = "# A bench's results"


def test_tune_run_goes_first_under_the_title_and_replaces_only_its_own_heading(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # bench/tune.py imports _results from its own folder
    title = _load("tune").TITLE
    old = (
        f"{title}\n\n## Session 9, quiet machine\n\nfigures by hand\n\n### Recipe experiments\n\n| a | b |\n\n"
        "## vLLM LoRA on the CPU build (bench/tune_vllm_lora.py)\n\nanother bench's rows\n"
    )
    new = "## 2026-12-05 03:00 UTC: 10 minutes on rich,httpx\n\n| measure | base |\n"
    out = R.merge(old, new, title)
    assert out == f"{title}\n\n{new}\n" + old.split("\n\n", 1)[1]
    again = R.merge(out, new.replace("| base |", "| rerun |"), title)  # the same heading: that section replaced
    assert again == out.replace("| base |", "| rerun |")
    assert R.merge("", new, title) == f"{title}\n\n{new}"


def test_several_sections_replace_theirs_in_place_of_order_and_the_rest_stay_byte_for_byte():
    kept_a = "## Other model\n\n| x |   \n### its notes\n"  # trailing spaces, no blank line before the next heading
    kept_b = "## Notes by hand\n\n\n\ntext\n\n"
    old = f"{T}\n\n## Model A\n\nold A\n\n{kept_a}## Model B\n\nold B\n\n{kept_b}"
    out = R.merge(old, "## Model B\n\nnew B\n\n## Model A\n\nnew A\n", T)
    assert out == f"{T}\n\n## Model B\n\nnew B\n\n## Model A\n\nnew A\n\n{kept_a}{kept_b.rstrip()}\n"


def test_a_title_written_by_the_run_replaces_the_old_intro_and_keeps_other_top_level_parts():
    old = "# Bench\n\nrun at 01:00, load 3\n\n## Rows\n\nold\n\n# Session 8's runs\n\n### Rows\n\nkept\n"
    out = R.merge(old, "# Bench\n\nrun at 02:00, load 1\n\n## Rows\n\nnew\n")
    assert out == "# Bench\n\nrun at 02:00, load 1\n\n## Rows\n\nnew\n\n# Session 8's runs\n\n### Rows\n\nkept\n"


def test_a_heading_quoted_inside_another_section_is_not_a_section():
    notes = "## Notes\n\nThe run below (## Rows) was slower; its table:\n\n```\n## Rows\n| 1 |\n```\n\n"
    old = f"{T}\n\n{notes}## Rows\n\nold\n"
    out = R.merge(old, "## Rows\n\nnew\n", T)
    assert out == f"{T}\n\n## Rows\n\nnew\n\n{notes.rstrip()}\n"


def test_a_file_without_a_trailing_newline_keeps_its_last_section_whole():
    out = R.merge(f"{T}\n\n## Old run\n\nlast line", "## New run\n\nrows", T)
    assert out == f"{T}\n\n## New run\n\nrows\n\n## Old run\n\nlast line\n"


def test_text_under_the_title_and_a_file_of_another_layout_are_kept():
    assert R.merge(f"{T}\n\nwritten by hand\n\n## Old\n\nx\n", "## New\n\ny\n", T) == (
        f"{T}\n\n## New\n\ny\n\nwritten by hand\n\n## Old\n\nx\n"
    )
    assert R.merge("notes with no title\n", "## New\n\ny\n", T) == f"{T}\n\n## New\n\ny\n\nnotes with no title\n"


def test_a_results_file_that_does_not_exist_yet_is_written(tmp_path):
    path = tmp_path / "results" / "new.md"
    path.parent.mkdir()
    R.write(path, "## First run\n\nrows\n", T)
    assert path.read_text() == f"{T}\n\n## First run\n\nrows\n"
    R.write(path, "## Second run\n\nrows\n", T)
    assert path.read_text() == f"{T}\n\n## Second run\n\nrows\n\n## First run\n\nrows\n"


def test_in_place_a_section_written_again_stays_where_it_was_and_the_rest_byte_for_byte():
    """bench/updates.py and bench/console.py: a file laid out by topic, each run rewriting its own sections."""
    copy, adapter = f"{T}\n\nthe copy table\n\n", "## Adapter swap\n\nold adapter rows   \n"
    old = f"{copy}## Swap\n\nold swap rows\n```\n## Adapter swap\n```\n\n{adapter}"
    assert R.replace(old, "## Swap\n\nnew swap rows") == f"{copy}## Swap\n\nnew swap rows\n\n{adapter}"
    assert R.replace(old, f"{T}\n\nnew copy table\n") == old.replace("the copy table", "new copy table")
    added = R.replace(old, "## Notes\n\nby hand")  # a heading the file lacks: at the end
    assert added == old + "\n## Notes\n\nby hand\n"


def test_in_place_two_parts_with_one_heading_only_the_first_is_replaced(tmp_path):
    old = f"{T}\n\n## Run\n\nfirst\n\n## Run\n\nsecond\n"
    assert R.replace(old, "## Run\n\nnew\n") == f"{T}\n\n## Run\n\nnew\n\n## Run\n\nsecond\n"
    path = tmp_path / "new.md"
    R.write_in_place(path, f"{T}\n\n## Run\n\nrows")
    assert path.read_text() == f"{T}\n\n## Run\n\nrows\n"
