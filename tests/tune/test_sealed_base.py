"""`codemoat tune` against a sealed base (issue 22): the .moat is opened under its license as `serve`
opens it and decrypted into memory only (no plaintext GGUF is ever written), the adapter records the
sealed model's plaintext digest, and `serve` of that sealed model loads the adapter (its digest
checked against the plaintext in memory); without a license, or with another model's, it is refused."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from tests.conftest import run_cli
from tests.tune.test_tune import PAY, _index, tune_options


def _license(v, moat: Path, out: Path) -> Path:
    from codemoat.vault.machine import MachineKey

    now = int(time.time())
    doc = v.issue_license(
        customer="acme",
        model=moat,
        machines=[MachineKey.load_or_create().identity()],
        not_before=now - 86400,
        expires=now + 86400,
    )
    out.write_text(json.dumps(doc))
    return out


def _tune(tmp_path: Path, base: Path, out: str, license: Path | None = None) -> Path:
    """A two-step tune of the payments repo (indexed by the test) on `base`, written to tmp_path / out."""
    from codemoat.tune.trainer import tune

    tune(tune_options(tmp_path / out, base, license=license))
    return tmp_path / out


@pytest.fixture
def sealed(tmp_path, tiny_gguf):
    from codemoat.trace.fingerprint import fingerprint_model
    from codemoat.vault.vendor import Vendor

    v = Vendor.init(tmp_path / "vendor")
    try:
        moat = tmp_path / "acme.moat"
        v.seal(tiny_gguf, "acme", moat, fingerprint=fingerprint_model)
        lic = _license(v, moat, tmp_path / "acme.lic")
        other = tmp_path / "other.moat"
        v.seal(tiny_gguf, "acme", other, fingerprint=fingerprint_model)  # same weights, another file and key
        other_lic = _license(v, other, tmp_path / "other.lic")
    finally:
        v.close()
    return moat, lic, other_lic


def _gguf_files(*roots: Path) -> list[Path]:
    out = []
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                with open(p, "rb") as f:
                    if f.read(4) == b"GGUF":
                        out.append(p)
    return out


@pytest.mark.slow
def test_tune_against_a_sealed_base_in_memory_only(tmp_path, sealed, home):
    from codemoat.config import load_settings
    from codemoat.engines.adapters import open_adapter
    from codemoat.engines.sealed import open_sealed
    from codemoat.vault.container import SealedFile

    moat, lic, _ = sealed
    _index(tmp_path, "payments", PAY, ["payments"])
    before = set(_gguf_files(tmp_path, Path(home)))
    out = _tune(tmp_path, moat, "pay.moat", license=lic)
    assert set(_gguf_files(tmp_path, Path(home))) == before  # no plaintext model (or adapter) written anywhere
    a = open_adapter(out)
    assert a.meta["base"]["sha256"] == SealedFile(moat).manifest.plaintext_sha256 and a.meta["base"]["sealed"] is True
    settings = load_settings(**{"model.adapters": [str(out)], "model.n_ctx": 128, "model.n_threads": 2})
    holder = open_sealed(moat, lic, settings=settings, watch=False)
    try:
        assert [x.name for x in holder.get().adapters_served] == ["pay"]
    finally:
        holder.close()


def test_a_sealed_base_needs_its_own_license(tmp_path, sealed):
    from codemoat.tune.base import load_base

    moat, _, other_lic = sealed
    with pytest.raises(CodemoatError, match="is sealed: pass --license"):
        load_base(moat)
    with pytest.raises(CodemoatError):
        load_base(moat, license=other_lic)
    r = run_cli(
        "tune", "--repos", "payments", "--out", str(tmp_path / "a.moat"), "--model", str(moat), "--license", str(other_lic)
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
