"""`codemoat trace` and `codemoat watermark detect` end to end: a real vendor directory, sealed
copies, one leaked (unsealed, requantised, noised), traced back by the CLI in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from codemoat.trace import watermark as wm
from codemoat.trace.fingerprint import fingerprint_model

from . import attacks
from .test_watermark import _generate

pytestmark = pytest.mark.slow  # subprocesses of the real CLI, a real vendor directory


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codemoat.cli.main", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def vendor(tmp_path_factory, f16_model):
    from codemoat.vault.vendor import Vendor

    root = tmp_path_factory.mktemp("vendor")
    v = Vendor.init(root / "v")
    for c in ("acme", "globex", "initech"):
        v.seal(f16_model, c, root / f"{c}.moat", fingerprint=fingerprint_model)
    v.unseal(root / "globex.moat", root / "leak.gguf")
    v.close()
    return root


def test_trace_names_the_leaker(vendor, tmp_path):
    q = attacks.requantize(vendor / "leak.gguf", tmp_path / "q8.gguf", 7)
    leaked = attacks.transform(q, tmp_path / "leak-noisy.gguf", attacks.noise(0.02))
    r = _cli("trace", str(leaked), "--vendor", str(vendor / "v"), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["named"] == ["globex"] and d["scores"][0]["customer"] == "globex"
    assert len(d["scores"]) == 3 and all(s["p_adj"] > 1e-3 for s in d["scores"][1:])
    human = _cli("trace", str(leaked), "--vendor", str(vendor / "v"))
    assert human.returncode == 0 and "verdict" in human.stdout and "globex" in human.stdout


def test_trace_of_the_original_gives_no_verdict(vendor, f16_model, unrelated_model):
    for suspect in (f16_model, unrelated_model):
        r = _cli("trace", str(suspect), "--vendor", str(vendor / "v"), "--original", str(f16_model), "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["named"] == []
    r = _cli("trace", str(unrelated_model), "--vendor", str(vendor / "v"))
    assert r.returncode == 0 and "no verdict" in r.stdout


def test_trace_errors_are_one_line(vendor, tmp_path):
    r = _cli("trace", str(tmp_path / "missing.gguf"), "--vendor", str(vendor / "v"))
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = _cli("trace", str(vendor / "globex.moat"), "--vendor", str(vendor / "v"))
    assert r.returncode == 1 and "unseal" in r.stderr and "Traceback" not in r.stderr
    r = _cli("trace", str(vendor / "leak.gguf"), "--vendor", str(tmp_path / "novendor"))
    assert r.returncode == 1 and "vendor" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_trace_of_a_truncated_gguf_names_it(vendor, tmp_path):
    whole = (vendor / "leak.gguf").read_bytes()
    for n in (35, 300, len(whole) // 2):  # inside the header (was IndexError), in the metadata, in the tensors
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(whole[:n])
        for args in (["trace", str(cut)], ["trace", str(vendor / "leak.gguf"), "--original", str(cut)]):
            r = _cli(*args, "--vendor", str(vendor / "v"))
            assert r.returncode == 1, r.stdout
            assert r.stderr.strip() == f"error: {cut}: truncated or not a valid GGUF file", r.stderr


def _hostile_safetensors(tmp_path: Path) -> list[Path]:
    """Files whose 8-byte header length is right and whose JSON header is not a safetensors header."""
    import struct

    headers = {
        "deep": b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON decoder goes: was a RecursionError
        "deep-object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "list": b"[1, 2]",  # was a TypeError
        "entry": b'{"w": 7}',  # was a TypeError
        "offsets": b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 99999]}}',  # was a ValueError
    }
    out = []
    for name, h in headers.items():
        (p := tmp_path / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + bytes(16))
        out.append(p)
    return out


def test_trace_of_a_hostile_safetensors_header_is_a_named_refusal(vendor, tmp_path):
    """Was broken: a suspect (or original) whose JSON header nests deeper than the decoder goes, is not
    an object, or has entries of the wrong shape ended in the CLI's last-resort line (RecursionError,
    TypeError, ValueError). Now each is refused in one line that says which header check failed."""
    for bad in _hostile_safetensors(tmp_path):
        for args in (["trace", str(bad)], ["trace", str(vendor / "leak.gguf"), "--original", str(bad)]):
            r = _cli(*args, "--vendor", str(vendor / "v"))
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert r.stderr.startswith(f"error: {bad}: not a safetensors file: header "), r.stderr


def test_watermark_detect_cli(vendor, f16_model, flat_model, tmp_path):
    from codemoat.vault.vendor import Vendor

    v = Vendor.open(vendor / "v")
    key = v.customer("initech").watermark_secret
    v.close()
    gen = tmp_path / "generated.py"
    gen.write_text(_generate(flat_model, [wm.WatermarkProcessor(key)], seed=4))
    human = tmp_path / "human.py"
    human.write_text(Path(wm.__file__).read_text()[:3000])
    args = ["watermark", "detect", str(gen), str(human), "--vendor", str(vendor / "v"), "--model", str(flat_model), "--json"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    files = d["files"]
    assert files[0]["detected"] == ["initech"] and files[1]["detected"] == []
    # both units of evidence: each file, and the files pooled per key (Stouffer). Pooled with human
    # code the evidence is diluted by design (the pool is one body of text), so the pooled test is
    # run on two generations of the same customer: together they name it.
    assert d["aggregate"]["files"] == 2
    gen2 = tmp_path / "generated2.py"
    gen2.write_text(_generate(flat_model, [wm.WatermarkProcessor(key)], seed=5))
    pooled = _cli("watermark", "detect", str(gen), str(gen2), *args[4:])
    assert pooled.returncode == 0, pooled.stderr
    assert json.loads(pooled.stdout)["aggregate"]["detected"] == ["initech"]
    r = _cli(*args[:-1], "--customer", "acme")
    assert r.returncode == 0 and "no" in r.stdout
    r = _cli(*args, "--no-entropy")  # every token scored: still found, human still clean
    files = json.loads(r.stdout)["files"]
    assert files[0]["detected"] == ["initech"] and files[1]["detected"] == []
    r = _cli("watermark", "detect", str(gen), "--vendor", str(vendor / "v"), "--customer", "nobody")
    assert r.returncode == 1 and "nobody" in r.stderr


def test_watermark_detect_model_errors_and_no_llama_warnings(vendor, flat_model, tmp_path):
    text = tmp_path / "a.py"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(flat_model.read_bytes()[: flat_model.stat().st_size // 2])
    for flag in ("--entropy", "--no-entropy"):
        r = _cli("watermark", "detect", str(text), "--vendor", str(vendor / "v"), "--model", str(cut), flag)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"error: cannot load model {cut}: llama.cpp cannot read it"), r.stderr
    # the model was trained with a 256-token context: the CLI's 1024 is capped, so llama.cpp has nothing to warn of
    for flag in ("--entropy", "--no-entropy"):
        r = _cli("watermark", "detect", str(text), "--vendor", str(vendor / "v"), "--model", str(flat_model), flag, "--json")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert json.loads(r.stdout)["files"][0]["scores"]
