"""Corpus collection and split, FIM transforms, multi-file samples, packing."""

import random
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from codemoat.train import data
from codemoat.train.corpus import SourceFile, collect, split
from codemoat.train.tokenizer import ENDOFTEXT, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, REPO_NAME


def _tree(root: Path) -> Path:
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (root / "pkg" / "b.py").write_text("from .a import a\n\ndef b():\n    return a() + 1\n")
    (root / "pkg" / "tests" / "test_a.py").write_text("def test_a():\n    assert True\n")
    (root / "pkg" / "table.py").write_text("# Python Character Mapping Codec generated from 'X' with gencodec.py.\nT = 1\n")
    (root / "pkg" / "bin.py").write_bytes(b"\xff\xfe not utf-8")
    (root / "pkg" / "notes.txt").write_text("not code")
    return root


def test_collect_skips_tests_generated_binary_and_non_code(tmp_path):
    files = collect([_tree(tmp_path / "src")])
    assert [f.path for f in files] == ["src/pkg/a.py", "src/pkg/b.py"]


def test_collect_missing_dir_is_a_user_error(tmp_path):
    with pytest.raises(CodemoatError, match="not found"):
        collect([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodemoatError, match="no code files"):
        collect([tmp_path / "empty"])


def test_split_is_seeded_and_stable():
    files = [SourceFile(f"r/m{i}.py", "x = 1\n") for i in range(400)]
    tr1, he1 = split(files, 0.1, seed=3)
    tr2, he2 = split(files, 0.1, seed=3)
    _, he3 = split(files, 0.1, seed=4)
    assert he1 == he2 and he1 != he3
    assert 15 < len(he1) < 70 and len(tr1) + len(he1) == 400
    # adding files never moves an existing file between the splits
    _, he4 = split(files + [SourceFile("r/new.py", "y = 2\n")], 0.1, seed=3)
    assert set(f.path for f in he1) <= set(f.path for f in he4)


def test_chunks_keep_whole_lines():
    text = "".join(f"line {i} {'x' * (i % 17)}\n" for i in range(300))
    parts = data.chunks(text, 200)
    assert "".join(parts) == text
    assert all(p.endswith("\n") for p in parts)
    assert max(len(p) for p in parts) <= 200 + 30


@pytest.mark.parametrize("line_rate", [0.0, 1.0])
def test_fim_split_partitions_the_text(line_rate):
    rng = random.Random(0)
    text = "import os\n\ndef f(x):\n    return x + 1\n"
    for _ in range(200):
        pre, mid, suf = data.fim_split(text, rng, line_rate)
        assert pre + mid + suf == text
        if line_rate == 1.0:
            assert (pre == "" or pre.endswith("\n")) and (mid.endswith("\n"))


def test_fim_formats_psm_and_spm():
    assert data.fim_format("P", "M", "S", spm=False) == f"{FIM_PREFIX}P{FIM_SUFFIX}S{FIM_MIDDLE}M"
    assert data.fim_format("P", "M", "S", spm=True) == f"{FIM_PREFIX}{FIM_SUFFIX}S{FIM_MIDDLE}PM"


def test_render_samples_mix_fim_and_repo_context():
    files = [SourceFile(f"repo/pkg/m{i}.py", f"def helper_{i}(value):\n    return value * {i}\n" * 20) for i in range(6)]
    texts = list(data.render_samples(files, data.DataOptions(chunk_chars=200, repo_name="repo"), random.Random(1)))
    assert all(t.endswith(ENDOFTEXT) for t in texts)
    fim = [t for t in texts if FIM_MIDDLE in t]
    assert 0.3 < len(fim) / len(texts) < 0.7  # FIM rate 0.5 (Bavarian et al. 2022)
    repo = [t for t in texts if t.startswith(REPO_NAME)]
    assert repo, "some samples carry cross-file context"
    for t in repo:
        head, _, rest = t.partition(FILE_SEP)
        assert head == f"{REPO_NAME}repo\n"
        paths = [seg.split("\n", 1)[0] for seg in t.split(FILE_SEP)[1:]]
        assert len(paths) >= 2 and len(set(paths)) == len(paths)  # other files, then this one
    off = list(data.render_samples(files, data.DataOptions(chunk_chars=200, fim_rate=0, repo_rate=0), random.Random(1)))
    assert "".join(t.removesuffix(ENDOFTEXT) for t in off) == "".join(f.text for f in files)


def test_pack_rows_overlap_by_one_for_shifted_targets():
    rows = data.pack([[1, 2, 3], [4, 5, 6, 7], [8, 9, 10]], n_ctx=4)
    assert rows == [[1, 2, 3, 4, 5], [5, 6, 7, 8, 9]]
