"""An attacker's view of signed offline updates (review of issue 21).

The customer's admin who wants what they did not pay for, a hostile USB stick (a crafted
.moatpkg), and a vendor-signed manifest that names paths: each attack below is refused in one line
and changes nothing installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError
from updhelp import lora_gguf, one_line_error, run_cli


def _resign(shop, src: Path, out: Path, **changes) -> Path:
    """`src` with manifest fields changed and signed again with the vendor's own key (a compromised
    release pipeline, or a vendor bug): the signature holds, so only the store's checks stand."""
    from codemoat.updates import bundle as fmt

    b = fmt.Bundle(src)
    m = dict(b.manifest, **changes)
    return fmt.write(out, m, shop.vendor.signing_key, b.pieces())


@pytest.mark.parametrize(
    "kind, bundle_id",
    [("model", x) for x in ("../../escaped", "..", "", "a/b", "ABS", "b_x\n")]
    + [("adapter", "../../escaped"), ("adapter", "ABS")],
)
def test_signed_bundle_id_that_names_a_path_is_refused(shop, store, tmp_path, kind, bundle_id):
    from codemoat import paths

    lic = shop.license()
    src = tmp_path / "fee.gguf"
    lora_gguf(src)
    good = shop.release("1", kind=kind, source=src if kind == "adapter" else None)
    outside = tmp_path / "outside"
    bundle_id = str(outside) if bundle_id == "ABS" else bundle_id
    evil = _resign(shop, good, tmp_path / "evil.moatpkg", bundle_id=bundle_id)
    with pytest.raises(CodemoatError, match="bundle_id"):
        store.apply(evil, lic)
    assert not outside.exists() and not list(tmp_path.rglob("escaped"))
    updates = paths.home() / "updates"
    assert not (updates / "bundles").exists() or not any((updates / "bundles").iterdir())
    assert store.list() == []
    assert store.apply(good, lic)["version"] == "1"  # the genuine bundle installs


@pytest.mark.parametrize("groups", [[], [""]])
def test_adapter_or_pack_with_an_empty_group_list_is_refused_not_opened_to_everyone(shop, store, tmp_path, groups):
    lic = shop.license()
    src = tmp_path / "fee.gguf"
    lora_gguf(src)
    with pytest.raises(CodemoatError, match="no group"):
        store.apply(shop.release("1", kind="adapter", source=src), lic, groups=groups)
    assert store.list() == []
    out = store.apply(shop.release("2", kind="adapter", source=src), lic, groups=["payments"])
    assert store.current("adapter:fee")["groups"] == ["payments"], out


def test_cli_groups_that_parse_to_nothing_are_refused(shop, tmp_path):
    lic = shop.license()
    src = tmp_path / "fee.gguf"
    lora_gguf(src)
    b = shop.release("1", kind="adapter", source=src)
    for spec in (",", " ", ""):
        p = run_cli("update", "apply", str(b), "--license", str(lic), "--groups", spec)
        assert "no group" in one_line_error(p), spec
    p = run_cli("update", "apply", str(b), "--license", str(lic), "--groups", "*")
    assert "invalid group name" in one_line_error(p)
    p = run_cli("update", "list", "--json")
    assert p.returncode == 0 and json.loads(p.stdout) == []


def test_version_strings_that_sort_oddly_are_refused_or_compared_as_numbers(shop, store):
    lic = shop.license()
    for bad in ("1.0.0-rc1", "v2", "2 ", "1.2.3.4.5", "", "1..2", "\u0661\u0660"):
        with pytest.raises(CodemoatError, match="version"):
            shop.release(bad)
    store.apply(shop.release("9"), lic)
    assert store.apply(shop.release("10"))["version"] == "10"
    with pytest.raises(CodemoatError, match="not newer"):
        store.apply(shop.release("9.99"))
    with pytest.raises(CodemoatError, match="already installed|not newer"):
        store.apply(shop.release("10.0"))  # the same version spelled otherwise is no upgrade


def test_local_rollback_does_not_reopen_older_unsigned_downgrades(shop, store):
    lic = shop.license()
    v1, v2, v3 = shop.release("1"), shop.release("2"), shop.release("3")
    for b in (v1, v2, v3):
        store.apply(b, lic)
    assert store.rollback("model")["version"] == "2"
    with pytest.raises(CodemoatError, match="already installed"):
        store.apply(v2)
    with pytest.raises(CodemoatError, match="not newer"):
        store.apply(v1)  # rolled back locally to 2: 1 is still a downgrade the vendor did not sign
    assert store.apply(v3)["version"] == "3"  # the newer one installs again


def test_rogue_vendor_with_its_own_license_for_this_machine_is_refused(shop, store, tmp_path):
    from codemoat.vault.vendor import Vendor
    from updhelp import Shop

    lic = shop.license()
    store.apply(shop.release("1"), lic)  # this machine trusts the real vendor now
    rogue = Vendor.init(tmp_path / "rogue")
    try:
        evil = Shop(rogue, shop.machine, shop.gguf, tmp_path / "rogue-shop")
        evil_lic = evil.license(support_until=4102444800)  # a license the attacker minted, support to 2100
        with pytest.raises(CodemoatError, match="does not trust"):
            store.apply(evil.release("9"), evil_lic)
    finally:
        rogue.close()
    assert [r["version"] for r in store.list()] == ["1"]


def test_rollback_keeps_the_groups_the_admin_narrowed_to(shop, store, tmp_path):
    """v1 went to everyone; the admin gave v2 to payments only; rolling the version back must not
    reopen the adapter (or the pack, in the retrieval index) to everyone."""
    from codemoat.index.store import SqliteIndex

    lic = shop.license()
    src = tmp_path / "fee.gguf"
    lora_gguf(src)
    store.apply(shop.release("1", kind="adapter", source=src), lic)
    store.apply(shop.release("2", kind="adapter", source=src), lic, groups=["payments"])
    assert store.rollback("adapter:fee")["version"] == "1"
    assert store.current("adapter:fee")["groups"] == ["payments"]

    for v in ("1", "2"):
        f = tmp_path / f"p{v}"
        f.mkdir()
        (f / "api.py").write_text(f"def api_v{v}():\n    return {v}\n")
        store.apply(shop.release(v, kind="knowledge-pack", source=f, name="fw"), lic, groups=None if v == "1" else ["dev"])
    assert store.rollback("knowledge-pack:fw")["version"] == "1"
    [pack] = [r for r in SqliteIndex().repos() if r.name == "pack.fw"]
    assert pack.root.startswith("pack:fw@1#") and pack.groups == ("dev",)
    assert store.current("knowledge-pack:fw")["groups"] == ["dev"]


def test_adapter_bundle_whose_payload_is_not_gguf_is_refused_at_apply(shop, store, tmp_path, monkeypatch):
    """Before, it installed, and the next serve start with `update:NAME` stopped in one line. `vendor release`
    refuses such an adapter now; a bundle made without that check (an older codemoat) is refused at apply."""
    from codemoat.vault import seal_model

    lic = shop.license()
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a LoRA")
    monkeypatch.setattr(seal_model, "check_lora_adapter", lambda path: None)  # an older release, without the check
    b = shop.release("1", kind="adapter", source=text, name="notes")
    with pytest.raises(CodemoatError, match="not a GGUF LoRA adapter"):
        store.verify(b, lic)
    with pytest.raises(CodemoatError, match="not a GGUF LoRA adapter"):
        store.apply(b, lic)
    assert [s for s, d in store.records if "GGUF" in d.get("reason", "")] == ["refused", "refused"]
    assert store.list() == []


@pytest.mark.parametrize("action", ["verify", "apply"])
def test_a_fifo_named_as_the_bundle_is_refused_not_waited_on(machine, tmp_path, action):
    """Was broken: `update verify/apply` opened the file before looking at what it is, and opening a FIFO
    blocks until someone writes to it: a named pipe on a hostile USB stick hung the command for good."""
    import os
    import subprocess

    fifo = tmp_path / "release.moatpkg"
    os.mkfifo(fifo)
    try:
        p = run_cli("update", action, str(fifo), timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`codemoat update {action}` on a FIFO did not return")
    assert "not a regular file" in one_line_error(p)


def test_a_rollback_target_still_kept_from_an_earlier_install_is_one_line(shop, store):
    """Was broken: a bundle the vendor signed as a rollback target, installed, then left behind by a newer version, is
    still kept in the store (history, for `update rollback`). Applying its file again (the vendor's rollback advice,
    or a replay) passed every check, copied the payload into staging, and then os.replace() onto the kept folder of
    the same bundle id raised 'OSError: [Errno 39] Directory not empty': a traceback out of `update apply`, an
    'apply_started' audit record with no end, staging left behind. Now refused in one line before anything is copied,
    naming `update rollback`; the installed version is unchanged and the kept one still rolls back. The same for a
    newer version kept after a rollback target was installed over it (2.0 under 1.8). A downgrade the vendor did not
    sign is still 'not newer' first (test_local_rollback_does_not_reopen_older_unsigned_downgrades)."""
    lic = shop.license()
    v20 = shop.release("2.0")
    store.apply(v20, lic)
    target = shop.release("1.8", rollback_target=True)
    assert store.apply(target)["version"] == "1.8"
    with pytest.raises(CodemoatError, match=r"model 2\.0 is still kept here.*update rollback"):  # newer, kept: the same
        store.apply(v20)
    store.apply(shop.release("2.1"))
    with pytest.raises(CodemoatError) as e:
        store.apply(target)
    assert "update rollback" in str(e.value) and "1.8" in str(e.value) and "\n" not in str(e.value), e.value
    assert store.current("model")["version"] == "2.1"
    assert not list((store.root / "staging").glob("*"))
    assert store.records[-1][0] == "refused"
    assert store.rollback("model")["version"] == "1.8"  # the kept copy is what `update rollback` serves
    with pytest.raises(CodemoatError, match="already installed"):  # and once it is current: as before
        store.apply(target)


def test_a_release_whose_out_is_its_own_source_is_refused_and_the_source_kept(shop, tmp_path):
    """Was (an outside tester): `vendor release --out` naming its own --model (or --adapter, --knowledge-pack)
    replaced the vendor's file by the bundle. Refused in one line, the source intact; another --out is written."""
    from codemoat.errors import CodemoatError
    from codemoat.updates.release import release

    shop.license()
    src = tmp_path / "m.gguf"
    src.write_bytes(shop.gguf.read_bytes())
    (tmp_path / "link.gguf").symlink_to(src)
    for out in (src, tmp_path / "link.gguf"):
        with pytest.raises(CodemoatError, match="is the model"):
            release(shop.vendor, customer="acme", kind="model", source=src, version="1", out=out, license_id=shop.last)
    assert src.read_bytes() == shop.gguf.read_bytes()
    assert shop.release("1", source=src).is_file()


def test_a_release_whose_out_is_inside_a_knowledge_pack_or_its_base_model_is_refused(shop, tmp_path):
    """A reviewer's follow-up: --out inside a knowledge pack's folder (the bundle would be packed into itself, or
    replace one of its files), and --out naming the base model an adapter is for, are refused too."""
    from codemoat.errors import CodemoatError
    from codemoat.updates.release import release

    shop.license()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# notes\n")
    with pytest.raises(CodemoatError, match="inside the knowledge-pack folder"):
        release(
            shop.vendor, customer="acme", kind="knowledge-pack", source=docs, version="1", out=docs / "a.md", license_id=shop.last
        )
    assert (docs / "a.md").read_text() == "# notes\n"
    base = tmp_path / "base.moat"
    base.write_bytes(shop.moat.read_bytes())
    with pytest.raises(CodemoatError, match="is the adapter"):
        release(
            shop.vendor,
            customer="acme",
            kind="adapter",
            source=shop.gguf,
            version="1",
            out=base,
            license_id=shop.last,
            base_model=base,
        )
    assert base.read_bytes() == shop.moat.read_bytes()


def test_a_model_release_of_a_gguf_that_is_not_whole_is_refused(shop, tmp_path):
    """Was (an outside tester): `vendor release --model bad.gguf --no-fingerprint` sealed and shipped a file with
    GGUF's magic and noise after it, or a GGUF cut short; `update apply` then installed it as the current model.
    Refused as `vendor seal` refuses it, nothing written; the whole model is released."""
    from codemoat.errors import CodemoatError
    from codemoat.updates.release import release

    shop.license()
    whole = shop.gguf.read_bytes()
    for name, data in (("noise.gguf", b"GGUF" + bytes(range(256)) * 40), ("cut.gguf", whole[: len(whole) // 2])):
        bad = tmp_path / name
        bad.write_bytes(data)
        out = tmp_path / f"{name}.moatpkg"
        with pytest.raises(CodemoatError):
            release(shop.vendor, customer="acme", kind="model", source=bad, version="1", out=out, license_id=shop.last)
        assert not out.exists()
    assert shop.release("1").is_file()


def test_an_adapter_release_of_random_bytes_or_a_whole_model_is_refused(shop, tmp_path):
    """Was (an outside tester): `vendor release --adapter` shipped 4 KB of random bytes, or a whole base model,
    as a LoRA (llama.cpp refused it on the customer's machine, or served the base twice). Refused at release,
    nothing written; a LoRA adapter is released."""
    from codemoat.errors import CodemoatError
    from codemoat.updates.release import release

    shop.license()
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(b"GGUF" + os.urandom(4096))
    for src, why in ((noise, "GGUF"), (shop.gguf, "not a LoRA adapter")):
        out = tmp_path / f"{src.stem}.moatpkg"
        with pytest.raises(CodemoatError, match=why):
            release(shop.vendor, customer="acme", kind="adapter", source=src, version="1", out=out, license_id=shop.last)
        assert not out.exists()
    assert shop.release("1", kind="adapter", source=lora_gguf(tmp_path / "fee.gguf")).is_file()
