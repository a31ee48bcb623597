"""Attacker's tests: an installed bundle's manifest.json or payload.sealed (in $CODEMOAT_HOME/updates/bundles/ID,
codemoat's own files) found replaced by a FIFO or a symbolic link.

Before, both were read with a plain open (Path.read_text/read_bytes): a FIFO put in their place blocked
`serve` for good at the start that opens `update:NAME` (and `update apply/rollback/list`, whose reconcile
re-indexes a knowledge pack), and a link was followed to whatever it named: here a valid copy of the
files elsewhere, which the code before served as the installed version. Now they are read as the
update state is (paths.read_own: O_NOFOLLOW | O_NONBLOCK, regular files only), refused in one line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.tune.loras import random_lora_gguf
from tests.vault.test_home_files import _call  # fails the test when the call blocks on the FIFO


def _adapter(shop, store, gguf_file, tmp_path):
    from codemoat.updates.adapters import open_installed

    lora = tmp_path / "fee.gguf"
    lora.write_bytes(random_lora_gguf(gguf_file, seed=0))
    lic = shop.license()
    store.apply(shop.release("1", kind="adapter", source=lora), lic)
    return Path(store.current("adapter:fee")["dir"]), lambda: open_installed("fee")


def _pack(shop, store, gguf_file, tmp_path):
    from codemoat.updates import packs

    src = tmp_path / "pack"
    src.mkdir()
    (src / "api.py").write_text("def interchange_fee(amount_cents):\n    return amount_cents // 100\n")
    lic = shop.license()
    store.apply(shop.release("1", kind="knowledge-pack", source=src, name="fw"), lic)

    def reconcile():  # the index lost the pack: every update command's reconcile indexes it again from the bundle
        packs.remove_pack("fw")
        return store.reconcile()

    return Path(store.current("knowledge-pack:fw")["dir"]), reconcile


@pytest.mark.parametrize("kind", ["fifo", "link"])
@pytest.mark.parametrize("file", ["manifest.json", "payload.sealed"])
@pytest.mark.parametrize("bundle", [_adapter, _pack], ids=["adapter", "knowledge-pack"])
def test_a_fifo_or_link_in_place_of_an_installed_bundles_file_is_refused_in_one_line(
    shop, store, gguf_file, tmp_path, bundle, file, kind
):
    folder, read = bundle(shop, store, gguf_file, tmp_path)
    assert _call(read, None)[0] == "ok"  # the real files read
    path, saved = folder / file, tmp_path / "copy"
    shutil.copyfile(path, saved)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(saved, path)  # a valid copy elsewhere: the code before read it as the installed one
    how, got = _call(read, path if kind == "fifo" else None)
    assert how == "error", f"{kind} in place of {file} was read: {got!r}"
    want = "not a regular file" if kind == "fifo" else "is a symbolic link"
    msg = str(got)
    assert want in msg and str(path) in msg and "\n" not in msg, msg
