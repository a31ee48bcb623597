"""Single-line infill on held-out lines (tune/infill.py): the lines come only from the files given,
reproducibly, each cut exactly out of its file; edit similarity is 1 - Levenshtein / longer length;
a model without FIM tokens gets no score rather than a made-up one."""

from __future__ import annotations

from pathlib import Path

import pytest

from codemoat.train.corpus import SourceFile
from codemoat.tune.infill import cases, edit_similarity, scores

FILES = [
    SourceFile("pay/fees.py", "import math\n\n\ndef fee(amount_cents: int) -> int:\n    return amount_cents * 15 // 1000\n"),
    SourceFile("pay/refund.py", "def refund(amount_cents: int) -> int:\n    return -amount_cents\n# x\n"),
]


def test_cases_are_whole_lines_of_the_given_files_reproducibly():
    got = cases(FILES, 10, seed=0)
    texts = {f.path: f.text for f in FILES}
    assert got and got == cases(FILES, 10, seed=0)
    for c in got:
        assert c.prefix + c.middle + c.suffix == texts[c.path]  # cut exactly out of its file
        assert c.prefix.endswith("\n") and c.suffix.startswith("\n") and "\n" not in c.middle
        assert 6 <= len(c.middle.strip()) <= 120
    assert "# x" not in {c.middle for c in got}  # too short to score
    assert "import math" not in {c.middle for c in got}  # the first line has no code above it
    assert len(cases(FILES, 2, seed=0)) == 2


def test_edit_similarity():
    assert edit_similarity("return x", "return x") == 1.0
    assert edit_similarity("", "") == 1.0 and edit_similarity("abc", "") == 0.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)


def test_a_model_without_fim_tokens_gets_no_score(tmp_path):
    from codemoat.tune.base import load_base
    from tests.special_models import build_special_gguf

    base = load_base(build_special_gguf(tmp_path / "gemma-style.gguf", "gemma"), n_ctx=64)
    assert scores(base.model, base.tokenizer, cases(FILES, 2, 0), base.n_ctx) is None


@pytest.mark.slow
def test_scores_on_the_bundled_model(tiny_gguf: Path):
    from codemoat.tune.base import load_base

    base = load_base(tiny_gguf, n_ctx=128)
    got = scores(base.model, base.tokenizer, cases(FILES, 3, 0), base.n_ctx)
    assert got is not None and got["n"] == 3 and 0 <= got["exact"] <= 1 and 0 <= got["edit_sim"] <= 1
    assert scores(base.model, base.tokenizer, [], base.n_ctx) == {"n": 0, "exact": None, "edit_sim": None}
