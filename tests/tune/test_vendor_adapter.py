"""The vendor's side of adapters (issue 22, item 3): `vendor seal` of a domain adapter's GGUF applies
the customer's fingerprint to the adapter's own weights (its lora_a matrices; lora_b's rank-wide rows
are too short to carry a mark), the sealed copy still loads in llama.cpp, and `trace` of a leaked
adapter names the customer it was sealed for, finding the recorded original by itself."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.trace.synth import corpus, tiny_model, train_bpe
from tests.tune.loras import random_lora_gguf

pytestmark = pytest.mark.slow  # subprocesses of the real CLI, a real vendor directory


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codemoat.cli.main", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    from codemoat.vault.vendor import Vendor

    d = tmp_path_factory.mktemp("vendor-adapter")
    base = tiny_model(d / "base.gguf", seed=0, dtype="F16", tokenizer=train_bpe(320, corpus(10)))
    adapter = d / "domain-adapter.gguf"
    adapter.write_bytes(random_lora_gguf(base, rank=16, scale=0.05))
    assert _cli("vendor", "init", "--vendor", str(d / "v")).returncode == 0
    for c in ("acme", "globex", "initech"):
        r = _cli("vendor", "seal", str(adapter), "--vendor", str(d / "v"), "--customer", c, "--out", str(d / f"{c}.moat"))
        assert r.returncode == 0, r.stderr
        assert "fingerprint: yes" in r.stdout
    v = Vendor.open(d / "v")
    try:
        v.unseal(d / "globex.moat", d / "leak.gguf")
    finally:
        v.close()
    return d, base, adapter


def test_trace_names_the_customer_of_a_leaked_adapter(sealed):
    d, _, adapter = sealed
    assert (d / "leak.gguf").read_bytes() != adapter.read_bytes()
    r = _cli("trace", str(d / "leak.gguf"), "--vendor", str(d / "v"), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["named"] == ["globex"] and got["original"] == str(adapter)
    assert all(s["p_adj"] > 1e-3 for s in got["scores"][1:])


def test_the_clean_adapter_names_nobody(sealed):
    d, _, adapter = sealed
    r = _cli("trace", str(adapter), "--vendor", str(d / "v"), "--original", str(adapter), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["named"] == []


def test_the_fingerprinted_adapter_still_applies_and_barely_moves_the_output(sealed):
    import llama_cpp

    d, base, adapter = sealed
    ids = None
    out = {}
    for name, lora in (("base", None), ("clean", adapter), ("marked", d / "leak.gguf")):
        llm = llama_cpp.Llama(str(base), lora_path=str(lora) if lora else None, n_ctx=64, logits_all=True, verbose=False)
        ids = ids or llm.tokenize(b"def add(a, b):\n    return a + b\n", add_bos=False)
        llm.eval(ids)
        out[name] = np.array(llm.scores[: len(ids)])
        llm.close()
    moved = np.abs(out["clean"] - out["base"]).max()
    assert moved > 0.1  # the adapter does something
    assert np.abs(out["marked"] - out["clean"]).max() < 0.1 * moved  # the mark barely changes what it does


def test_trace_names_the_customer_of_an_adapter_leaked_from_an_update_bundle(sealed, home, tmp_path):
    """`vendor release --adapter` marks the adapter for its customer as `vendor seal` does: the copy a
    customer's machine decrypts from the bundle, leaked, names that customer (before: every customer
    got the same bytes, and trace named nobody)."""
    import time

    from codemoat.updates.adapters import open_installed
    from codemoat.updates.store import UpdateStore
    from codemoat.vault.machine import MachineKey
    from codemoat.vault.vendor import Vendor

    d, base, adapter = sealed
    machine = MachineKey.load_or_create()
    v = Vendor.open(d / "v")
    try:
        for c in ("acme", "globex"):
            v.seal(base, c, tmp_path / f"{c}-base.moat")
            doc = v.issue_license(
                customer=c, model=tmp_path / f"{c}-base.moat", machines=[machine.identity()], expires=int(time.time() + 86400)
            )
            (tmp_path / f"{c}.lic").write_text(json.dumps(doc))
    finally:
        v.close()
    for c in ("acme", "globex"):
        r = _cli(
            "vendor", "release", "--vendor", str(d / "v"), "--customer", c, "--version", "1", "--adapter", str(adapter),
            "--name", "domain", "--out", str(tmp_path / f"{c}.moatpkg"),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    store = UpdateStore(machine=machine, audit=lambda step, detail: None, models=[tmp_path / "acme-base.moat"])
    store.apply(tmp_path / "acme.moatpkg", tmp_path / "acme.lic", groups=["payments"])
    leak = tmp_path / "leaked-from-bundle.gguf"
    leak.write_bytes(open_installed("domain", machine=machine).gguf)
    assert leak.read_bytes() != adapter.read_bytes()
    r = _cli("trace", str(leak), "--vendor", str(d / "v"), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["named"] == ["acme"] and got["original"] == str(adapter)
