"""End to end: the micro training run, its reproducibility, and the `vendor train` command."""

import hashlib
import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from codemoat.train.micro import build_micro_gguf, micro_corpus  # noqa: E402


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_micro_build_writes_gguf_and_hf_folder(tmp_path):
    g = build_micro_gguf(tmp_path / "a", seed=0)
    assert g.is_file() and g.stat().st_size > 10_000
    hf = g.with_suffix(".hf")
    assert {p.name for p in hf.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    summary = json.loads(g.with_name("micro.train.json").read_text())
    assert summary["steps"] == 30 and summary["params"] > 0

    import gguf

    r = gguf.GGUFReader(str(g))
    fields = {k: r.fields[k] for k in r.fields}
    assert "tokenizer.ggml.pre" in fields and "general.name" in fields
    name = bytes(fields["general.name"].parts[-1]).decode()
    pre = bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode()
    assert (name, pre) == ("codemoat-micro", "qwen2")
    assert bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0]) is False


def test_same_seed_same_model_other_seed_other_model(tmp_path):
    a = build_micro_gguf(tmp_path / "a", seed=1, steps=5)
    b = build_micro_gguf(tmp_path / "b", seed=1, steps=5)
    c = build_micro_gguf(tmp_path / "c", seed=2, steps=5)
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "codemoat.cli.main", "vendor", "train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_trains_and_reports_json(tmp_path):
    corpus = micro_corpus(tmp_path)
    out = tmp_path / "m.gguf"
    r = _cli(
        "--corpus", str(corpus), "--out", str(out), "--size", "micro", "--steps", "8", "--threads", "1", "--json", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["steps"] == 8 and rep["gguf"] == str(out) and out.is_file()
    assert rep["heldout_bpb"] is None or rep["heldout_bpb"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--corpus", "{tmp}/missing", "--out", "{tmp}/m.gguf"], "corpus directory not found"),
        (["--corpus", "{tmp}", "--out", "{tmp}/m.bin"], "must end in .gguf"),
        (["--corpus", "{tmp}", "--out", "{tmp}/m.gguf", "--size", "huge"], "unknown size"),
        (["--corpus", "{tmp}", "--out", "{tmp}/m.gguf", "--device", "tpu"], "--device must be"),
        # a folder where the .gguf goes: refused before training, --force or not (the export would fail after it)
        (["--corpus", "{tmp}", "--out", "{tmp}/d.gguf", "--force"], "d.gguf is a folder: name the .gguf file to write"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "x.py").write_text("x = 1\n")
    (tmp_path / "d.gguf").mkdir()
    r = _cli(*[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_loss_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    from codemoat.train.card import plot_loss, read_log

    log = tmp_path / "m.log.jsonl"
    events = [{"kind": "step", "step": i, "tokens": 1000 * i, "loss_ema": 9 - i / 10, "seconds": i} for i in range(1, 30)]
    events.append({"kind": "checkpoint", "step": 29, "tokens": 29000, "heldout_loss": 6.0, "seconds": 29})
    log.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    steps, evals = read_log(log)
    assert len(steps) == 29 and evals[0]["heldout_loss"] == 6.0
    png = plot_loss(log, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_does_not_replace_a_model_without_force(tmp_path):
    """`vendor train --out M.gguf` where M.gguf, or its safetensors folder M.hf/, exists refuses in one line
    naming it and --force, before training (a run does not resume: its first checkpoint replaced both);
    the files are left as they were."""
    corpus = micro_corpus(tmp_path)
    out = tmp_path / "m.gguf"
    args = ("--corpus", str(corpus), "--out", str(out), "--size", "micro", "--steps", "1", "--threads", "1")
    out.write_bytes(b"last month's model")
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {out} exists: pass --force to replace it (a new run starts over)"]
    assert out.read_bytes() == b"last month's model"
    out.unlink()
    (tmp_path / "m.hf").mkdir()
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 1 and f"{tmp_path / 'm.hf'} exists: pass --force" in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_cli_force_replaces_a_model(tmp_path):
    corpus = micro_corpus(tmp_path)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"last month's model")
    (tmp_path / "m.hf").mkdir()
    args = ("--corpus", str(corpus), "--out", str(out), "--size", "micro", "--steps", "1", "--threads", "1", "--force")
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"GGUF" and (tmp_path / "m.hf" / "model.safetensors").is_file()
