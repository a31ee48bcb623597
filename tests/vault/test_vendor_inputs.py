"""The vendor's inputs, checked before any work: an --out that is an input, a machine identity without hardware
facts, a customer name no other name rule allows, a GGUF that is not whole, an adapter that is not a LoRA."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
from conftest import run_cli
from vaulthelp import one_line_error

from codemoat.errors import CodemoatError
from codemoat.vault.codec import VaultError
from codemoat.vault.machine import check_facts, parse_identity
from codemoat.vault.seal_model import check_gguf, check_lora_adapter
from codemoat.vault.vendor import Vendor


@pytest.fixture
def vdir(tmp_path) -> str:
    Vendor.init(tmp_path / "vendor").close()
    return str(tmp_path / "vendor")


def _seal_cli(vdir: str, model: Path, out: Path, *extra: str):
    return run_cli("vendor", "seal", str(model), "--vendor", vdir, "--customer", "acme", "--out", str(out), *extra)


# -- 1. an --out that is an input -------------------------------------------------------------------------------
def test_vendor_seal_refuses_an_out_that_is_the_model_under_any_name(tmp_path, gguf_file, vdir):
    """Was: `vendor seal m.gguf --out m.gguf --force` replaced the plaintext model by its sealed form, and so did
    a symbolic or a hard link to it. Refused in one line, the model intact; another --out still seals (--force)."""
    model = tmp_path / "m.gguf"
    shutil.copyfile(gguf_file, model)
    (tmp_path / "link.gguf").symlink_to(model)
    os.link(model, tmp_path / "hard.gguf")
    for out in (model, tmp_path / "link.gguf", tmp_path / "hard.gguf"):
        one_line_error(_seal_cli(vdir, model, out, "--force", "--no-fingerprint"), "is the model")
    assert model.read_bytes() == gguf_file.read_bytes()
    other = tmp_path / "old.moat"
    other.write_bytes(b"an earlier output")
    r = _seal_cli(vdir, model, other, "--force", "--no-fingerprint")
    assert r.returncode == 0, r.stderr
    assert other.read_bytes()[:8] == b"CODEMOAT"


def test_vendor_unseal_refuses_an_out_that_is_the_sealed_file(tmp_path, gguf_file, vendor):
    """Was: `vendor unseal a.moat --out a.moat --force` replaced the sealed file by its plaintext (through a link
    too). Refused in one line, the sealed file intact; unsealing to another file still works."""
    moat = tmp_path / "a.moat"
    vendor.seal(gguf_file, "acme", moat)
    sealed = moat.read_bytes()
    (tmp_path / "l.moat").symlink_to(moat)
    vdir = str(vendor.root)
    for out in (moat, tmp_path / "l.moat"):
        one_line_error(
            run_cli("vendor", "unseal", str(moat), "--vendor", vdir, "--out", str(out), "--force"), "is the sealed file"
        )
        with pytest.raises(CodemoatError, match="is the sealed file"):
            vendor.unseal(moat, out, force=True)
    assert moat.read_bytes() == sealed
    assert vendor.unseal(moat, tmp_path / "plain.gguf").read_bytes() == gguf_file.read_bytes()


def _safetensors_folder(folder: Path) -> Path:
    folder.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def test_a_safetensors_folder_is_not_sealed_over_one_of_its_files(tmp_path, vendor):
    """Was: sealing a folder with --out naming its config.json (or its weights) replaced that file, and unsealing
    into the folder that holds the sealed file under a part's name replaced the sealed file. Both refused; the
    same folder sealed elsewhere, and unsealed into another folder, still work."""
    folder = _safetensors_folder(tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for name in ("config.json", "model.safetensors"):
        with pytest.raises(CodemoatError, match="is the model"):
            vendor.seal(folder, "acme", folder / name)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    box = tmp_path / "box"
    box.mkdir()
    moat = box / "config.json"  # a sealed file named like one of the parts it unseals to
    vendor.seal(folder, "acme", moat)
    with pytest.raises(CodemoatError, match="is the sealed file"):
        vendor.unseal(moat, box, force=True)
    assert moat.read_bytes()[:8] == b"CODEMOAT"
    assert (vendor.unseal(moat, tmp_path / "out") / "config.json").read_bytes() == before["config.json"]


# -- 3. hardware facts ------------------------------------------------------------------------------------------
BAD_FACTS = {
    "deleted": (None, "'facts' is missing"),
    "a list": ([], "'facts' is a list, not an object"),
    "macs a number": ({"macs": 5}, "fact 'macs' is malformed"),
    "cpu a list": ({"cpu": ["a" * 32]}, "fact 'cpu' is malformed"),
    "macs empty": ({"macs": []}, "fact 'macs' is malformed"),
    "not a hash": ({"machine_id": "serial-1234"}, "fact 'machine_id' is malformed"),
    "unknown group": ({"disk": "a" * 32}, "unknown hardware fact 'disk'"),
}


@pytest.mark.parametrize("case", BAD_FACTS)
def test_a_machine_identity_without_sound_hardware_facts_is_refused(machine, case):
    """Was: an identity with its facts deleted or of the wrong type was licensed with `facts: {}`, which matches
    any machine (verify said ok). Refused naming what is wrong; the identity as made still parses, and so does one
    with no facts at all (`machine-id` finds none on some machines: refused at `license issue`, below)."""
    facts, needle = BAD_FACTS[case]
    ident = machine.identity()
    ident.pop("facts") if facts is None else ident.update(facts=facts)
    with pytest.raises(VaultError, match=needle.replace("(", r"\(")):
        parse_identity(json.dumps(ident))
    assert parse_identity(json.dumps(machine.identity()))["facts"] == machine.identity()["facts"]
    assert parse_identity(json.dumps(dict(machine.identity(), facts={})))["facts"] == {}


def test_no_facts_are_allowed_only_where_a_chip_binds_the_license():
    """A TPM-bound identity (or an SEV-SNP guest) is bound by its chip: it may hold no facts, but what it holds is
    still checked."""
    assert check_facts({}, chip_bound=True) == {}
    assert check_facts({}, chip_bound=False, allow_none=True) == {}  # the vendor's --allow-no-hardware-facts
    with pytest.raises(VaultError, match="holds no hardware facts"):
        check_facts({}, chip_bound=False)
    with pytest.raises(VaultError, match="fact 'macs' is malformed"):
        check_facts({"macs": 5}, chip_bound=True)


def test_license_issue_refuses_an_identity_without_facts(tmp_path, gguf_file, vendor, machine):
    """Was: `vendor license issue --machine machine.json` with `"facts": {}` signed and recorded a license bound to
    no hardware. Refused in one line at the CLI and through the Python API (release issues licenses too), with
    nothing recorded; the identity as made is licensed."""
    moat = tmp_path / "a.moat"
    vendor.seal(gguf_file, "acme", moat)
    bad = tmp_path / "machine.json"
    bad.write_text(json.dumps(dict(machine.identity(), facts={})))
    args = ("--vendor", str(vendor.root), "--customer", "acme", "--model", str(moat), "--expires", "30d")
    one_line_error(
        run_cli("vendor", "license", "issue", *args, "--machine", str(bad), "--out", str(tmp_path / "a.lic")), "no hardware facts"
    )
    assert not (tmp_path / "a.lic").exists()
    with pytest.raises(VaultError, match="fact 'macs' is malformed"):
        vendor.issue_license(
            customer="acme", model=moat, machines=[dict(machine.identity(), facts={"macs": 5})], expires=int(time.time()) + 99
        )
    assert vendor.licenses() == []
    doc = vendor.issue_license(customer="acme", model=moat, machines=[machine.identity()], expires=int(time.time()) + 99)
    assert doc["license"]["machines"][0]["facts"] == machine.identity()["facts"]
    # a machine with none to give (an arm64 CPU, a container without a machine-id): licensed when the vendor says so
    r = run_cli(
        "vendor", "license", "issue", *args, "--machine", str(bad), "--out", str(tmp_path / "a.lic"), "--allow-no-hardware-facts"
    )
    assert r.returncode == 0 and (tmp_path / "a.lic").is_file(), r.stderr
    assert json.loads((tmp_path / "a.lic").read_text())["license"]["machines"][0]["facts"] == {}


def test_license_issue_refuses_an_out_that_is_the_sealed_model(tmp_path, gguf_file, vendor, machine):
    """Was: `vendor license issue --model s.moat --out s.moat --force` replaced the customer's sealed model by its
    license. Refused in one line before anything is signed, the model intact; another --out is written."""
    moat = tmp_path / "s.moat"
    vendor.seal(gguf_file, "acme", moat)
    sealed = moat.read_bytes()
    ident = tmp_path / "machine.json"
    ident.write_text(json.dumps(machine.identity()))
    args = ("--vendor", str(vendor.root), "--customer", "acme", "--model", str(moat), "--expires", "30d", "--machine", str(ident))
    one_line_error(run_cli("vendor", "license", "issue", *args, "--out", str(moat), "--force"), "is the sealed model")
    assert moat.read_bytes() == sealed and vendor.licenses() == []
    r = run_cli("vendor", "license", "issue", *args, "--out", str(tmp_path / "s.lic"))
    assert r.returncode == 0 and (tmp_path / "s.lic").is_file(), r.stderr


# -- 4. customer names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["AC\nME", "A" * 100_000, "AC\x07ME", "AC\x1b[31mME", "acme corp", "ACME😀", "-acme"])
def test_a_new_customer_name_follows_the_rule_of_user_names(tmp_path, gguf_file, vendor, name):
    """Was: any string was a customer: a newline, control characters or 100,000 characters went into the database
    and every license. The rule of user, group and token names (ASCII letters, digits, '.', '_', '@', '-', up to
    128) now, in one short line; nothing is sealed or recorded. A name it allows still seals."""
    with pytest.raises(CodemoatError, match="invalid customer name") as e:
        vendor.seal(gguf_file, name, tmp_path / "a.moat")
    assert "\n" not in str(e.value) and len(str(e.value)) < 300
    assert not (tmp_path / "a.moat").exists() and vendor.customers() == []
    assert vendor.seal(gguf_file, "acme.corp-1@eu_2", tmp_path / "b.moat").manifest.customer == "acme.corp-1@eu_2"


def test_vendor_seal_cli_refuses_a_customer_name_with_a_newline(tmp_path, gguf_file, vdir):
    """Was: `vendor seal --customer $'AC\\nME'` sealed and recorded the customer. One line now, nothing written."""
    r = run_cli("vendor", "seal", str(gguf_file), "--vendor", vdir, "--customer", "AC\nME", "--out", str(tmp_path / "a.moat"))
    one_line_error(r, "invalid customer name 'AC\\nME'")
    assert not (tmp_path / "a.moat").exists()


def test_a_customer_made_before_the_rule_still_opens(tmp_path, gguf_file, vendor):
    """The rule is for new customers: one recorded by an older codemoat (a space in its name) is still found and
    sealed for, not locked out."""
    from codemoat.vault.vendor_tables import customers_t

    with vendor.engine.begin() as c:
        c.execute(
            customers_t.insert().values(
                id="c_old",
                name="Old Corp",
                created_at=0,
                fingerprint_secret=vendor._seal_secret(os.urandom(32), "fingerprint:c_old"),
                watermark_secret=vendor._seal_secret(os.urandom(32), "watermark:c_old"),
            )
        )
    assert vendor.seal(gguf_file, "Old Corp", tmp_path / "a.moat").manifest.customer_id == "c_old"


# -- 5. whole GGUF models, LoRA adapters --------------------------------------------------------------------------
def test_a_gguf_that_is_not_whole_is_not_sealed(tmp_path, tiny_gguf, vdir):
    """Was: `vendor seal --no-fingerprint` sealed a file with the GGUF magic followed by garbage, or a GGUF cut to
    its first megabyte (only the magic was read). Refused in one line, nothing written; the whole model seals."""
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(50_000))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: min(1 << 20, tiny_gguf.stat().st_size // 2)])
    for bad in (garbage, cut):
        with pytest.raises(CodemoatError, match="truncated or not a valid GGUF file"):
            check_gguf(bad)
        one_line_error(_seal_cli(vdir, bad, tmp_path / "a.moat", "--no-fingerprint"), "truncated or not a valid GGUF file")
    assert not (tmp_path / "a.moat").exists()
    assert check_gguf(tiny_gguf)["general.architecture"] == "llama"


def _lora_gguf(path: Path, *, kind: str = "adapter") -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(kind)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _safetensors(path: Path, names: list[str]) -> Path:
    header = json.dumps({n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, n in enumerate(names)})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(4 * len(names)))
    return path


def test_only_a_lora_adapter_passes_as_an_adapter(tmp_path, gguf_file):
    """Was: random bytes, or a whole base model, were released as a LoRA adapter. A GGUF must parse whole and say
    general.type=adapter, adapter.type=lora (as llama.cpp writes it); a safetensors file must name peft's lora_A
    or lora_B tensors. A real adapter of each kind passes."""
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(CodemoatError, match="truncated or not a valid GGUF file"):
        check_lora_adapter(noise)
    with pytest.raises(CodemoatError, match="not a LoRA adapter: its GGUF metadata says general.type=None"):
        check_lora_adapter(gguf_file)  # a base model
    with pytest.raises(CodemoatError, match="general.type='model'"):
        check_lora_adapter(_lora_gguf(tmp_path / "typed.gguf", kind="model"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(_lora_gguf(tmp_path / "whole.gguf").read_bytes()[:-100])
    with pytest.raises(CodemoatError, match="truncated or not a valid GGUF file"):
        check_lora_adapter(cut)
    check_lora_adapter(tmp_path / "whole.gguf")

    st_noise = tmp_path / "noise.safetensors"
    st_noise.write_bytes(os.urandom(4096))
    with pytest.raises(CodemoatError, match="not a safetensors file"):
        check_lora_adapter(st_noise)
    with pytest.raises(CodemoatError, match="names no lora_A or lora_B tensor"):
        check_lora_adapter(_safetensors(tmp_path / "base.safetensors", ["model.layers.0.self_attn.q_proj.weight"]))
    check_lora_adapter(
        _safetensors(
            tmp_path / "adapter_model.safetensors",
            [
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            ],
        )
    )
    with pytest.raises(CodemoatError, match="an adapter is a .gguf or .safetensors file"):
        check_lora_adapter(tmp_path / "noise.bin")
