"""`vendor train --out X.gguf`: every file a run writes is refused without --force, and its folder must exist,
before training starts (nothing here trains a model)."""

from __future__ import annotations

from pathlib import Path

from cli_errors import one_line_error
from conftest import run_cli

from codemoat.cli.train_cmd import refuse_overwriting_run, run_outputs


def _train(corpus: Path, out: Path, *extra: str):
    return run_cli("vendor", "train", "--corpus", str(corpus), "--out", str(out), "--size", "micro", "--steps", "1", *extra)


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "src"
    corpus.mkdir()
    (corpus / "a.py").write_text("x = 1\n")
    return corpus


def test_vendor_train_refuses_to_replace_the_files_beside_the_model(tmp_path):
    """Was: only X.gguf and X.hf/ were looked for: X.train.json, X.loss.png, X.log.jsonl and X.heldout.txt of an
    earlier run were replaced without --force. Refused in one line naming each one there, all kept as they were."""
    out = tmp_path / "m.gguf"
    beside = [tmp_path / n for n in ("m.train.json", "m.loss.png", "m.log.jsonl", "m.heldout.txt")]
    for p in beside:
        p.write_text(f"earlier run's {p.name}")
    line = one_line_error(_train(_corpus(tmp_path), out), "exist: pass --force to replace them (a new run starts over)")
    assert all(p.name in line for p in beside), line
    assert all(p.read_text() == f"earlier run's {p.name}" for p in beside)
    assert not out.exists() and not (tmp_path / "m.hf").exists()


def test_a_run_with_nothing_there_or_with_force_is_not_refused(tmp_path):
    """The negative of the refusal: no earlier output, or --force, passes; each file alone is named."""
    out = tmp_path / "m.gguf"
    refuse_overwriting_run(out, force=False)
    for p in run_outputs(out)[1:]:
        (p.mkdir() if p.suffix == ".hf" else p.write_text("x"))
        refuse_overwriting_run(out, force=True)
    assert [p.name for p in run_outputs(out)] == ["m.gguf", "m.hf", "m.heldout.txt", "m.log.jsonl", "m.train.json", "m.loss.png"]


def test_vendor_train_refuses_an_out_in_a_folder_that_does_not_exist(tmp_path):
    """Was: `vendor train --out /nonexist/tr.gguf` made /nonexist/ (the trainer's mkdir -p). Refused as `vendor seal`
    refuses it ("folder ... does not exist"), with nothing made; a folder that exists passes that check (to the
    next refusal here: an earlier run's file, so nothing trains)."""
    missing = tmp_path / "nonexist"
    corpus = _corpus(tmp_path)
    one_line_error(_train(corpus, missing / "tr.gguf"), f"folder {missing} does not exist")
    assert not missing.exists()
    (tmp_path / "tr.log.jsonl").write_text("earlier")
    one_line_error(_train(corpus, tmp_path / "tr.gguf"), "tr.log.jsonl exists")
