"""Attacker's tests: the update store's own folders found replaced by symbolic links, things other than a
serve's socket in the hand-off's run folder, and knowledge packs whose member names hide what they are.

`staging/` (or `bundles/`) made a link to another folder (an admin moving the store, a mistake): every
update command's reconcile emptied that folder of whatever the state did not name, i.e. deleted every
folder in it, outside the update store. A link at `staging/<bundle id>` was followed by `apply`, which
wrote the payload wherever it pointed. Now a link there is removed (staging) or refused in one line
(bundles), and nothing outside the store is touched.

The hand-off: a folder named `serve-N.sock` in run/ (unlink: IsADirectoryError), or a socket that answers
a JSON array nested past the decoder's limit (RecursionError), ended `hand_over` after the install, so the
serves after it in the folder were never asked to swap, and kept serving the version before the one
`update list` names as current."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from codemoat.errors import CodemoatError


def _victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    (v / "project" / "src").mkdir(parents=True)
    (v / "project" / "src" / "main.py").write_text("print('mine')\n")
    (v / "notes.txt").write_text("mine\n")
    return v


def _intact(v: Path) -> bool:
    return (v / "project" / "src" / "main.py").read_text() == "print('mine')\n" and (v / "notes.txt").exists()


def test_a_staging_folder_made_a_link_elsewhere_is_not_emptied(store, tmp_path):
    victim = _victim(tmp_path)
    (store.root / "staging").symlink_to(victim)
    store.reconcile()
    store.list()
    assert _intact(victim)
    assert not (store.root / "staging").is_symlink()  # the link (in the store) went, not what it named


def test_a_bundles_folder_made_a_link_elsewhere_is_refused_not_emptied(store, tmp_path):
    victim = _victim(tmp_path)
    (store.root / "bundles").symlink_to(victim)
    with pytest.raises(CodemoatError) as e:
        store.reconcile()
    assert "link" in str(e.value) and "\n" not in str(e.value)
    assert _intact(victim)


def test_a_link_at_a_staging_folder_is_not_written_through(shop, store, tmp_path):
    from codemoat.updates.bundle import Bundle

    lic = shop.license()
    b = shop.release("1", kind="knowledge-pack", source=_pack_zip(tmp_path, {"a.py": b"x = 1\n"}), name="fw")
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "staging").mkdir()
    (store.root / "staging" / Bundle(b).bundle_id).symlink_to(outside)
    store.apply(b, lic)
    assert list(outside.iterdir()) == []
    folder = Path(store.current("knowledge-pack:fw")["dir"])
    assert not folder.is_symlink() and (folder / "payload.sealed").is_file()


def _pack_zip(tmp_path: Path, members: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    p = tmp_path / f"pack-{len(list(tmp_path.glob('pack-*.zip')))}.zip"
    p.write_bytes(buf.getvalue())
    return p


@pytest.mark.parametrize(
    "name",
    ["docs/\x7f.md", "docs/\x9b31mred.py", "src/evil\u202etxt.py", "src/\u2066x\u2069.py", "a\u200bb/c.py"],
    ids=["del", "c1-csi", "rlo", "isolate", "zero-width"],
)
def test_pack_member_names_with_hidden_control_characters_are_refused(shop, store, tmp_path, name):
    from codemoat.updates import packs

    with pytest.raises(CodemoatError, match="unsafe path"):
        list(packs.members(_pack_zip(tmp_path, {name: b"x = 1\n"}).read_bytes()))
    assert [n for n, _ in packs.members(_pack_zip(tmp_path, {"docs/café.md": b"# ok\n"}).read_bytes())] == ["docs/café.md"]


def _answering(path: Path, answer: bytes) -> threading.Thread:
    """A socket at `path` (not a serve) that reads one line and answers `answer`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)

    def run() -> None:
        with s:
            c, _ = s.accept()
            with c:
                c.recv(4096)
                c.sendall(answer)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("odd", ["folder", "nested-answer"])
def test_something_else_in_the_run_folder_does_not_keep_a_serve_from_its_swap(tmp_path, odd):
    from codemoat.updates.handoff import Listener, hand_over, run_dir

    home = tmp_path / "home"
    run_dir(home).mkdir(parents=True, mode=0o700)
    first = run_dir(home) / "serve-0.sock"  # sorts before the real serve's
    if odd == "folder":
        first.mkdir()
    else:
        _answering(first, b"[" * 60_000 + b"\n")
    asked: list[str] = []
    real = Listener(lambda chan: asked.append(chan) or {"swapped": True}, home).start()
    try:
        answers = hand_over("model", home, timeout=30)
    finally:
        real.close()
    assert asked == ["model"]
    mine = [a for a in answers if a.get("pid") == os.getpid()]
    assert mine and mine[0]["ok"] and mine[0]["swapped"]
    others = [a for a in answers if a.get("pid") != os.getpid()]
    assert all(not a["ok"] and "\n" not in a["error"] for a in others)
    json.dumps(answers)


def test_a_pack_holding_one_path_twice_is_refused_before_it_switches(shop, store, tmp_path, monkeypatch):
    """Before, the second member's insert failed (sqlite3.IntegrityError) after the state had switched to it, and
    again in the reconcile every later `update` command runs first: list, apply and rollback all failed."""
    import warnings

    # signed by a release made before it checked member names (it refuses this one now: the test below)
    monkeypatch.setattr("codemoat.updates.release._check_zip", lambda data: None)

    lic = shop.license()
    store.apply(shop.release("1", kind="knowledge-pack", source=_pack_zip(tmp_path, {"a.py": b"x = 1\n"}), name="fw"), lic)
    z = _pack_zip(tmp_path, {"a.py": b"x = 1\n"})
    with warnings.catch_warnings(), zipfile.ZipFile(z, "a") as zz:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        zz.writestr("a.py", b"def other():\n    return 2\n")
    b = shop.release("2", kind="knowledge-pack", source=z, name="fw")
    for act in (store.verify, store.apply):
        with pytest.raises(CodemoatError, match="twice") as e:
            act(b, lic)
        assert "\n" not in str(e.value)
    assert [(r["version"], r["current"]) for r in store.list()] == [("1", True)]
    assert store.reconcile() == []


def test_an_earlier_versions_files_put_in_the_current_ones_folder_are_not_served_as_it(shop, store, gguf_file, tmp_path):
    """Before, the folder's own manifest.json was trusted: the payload opened (its sealed context is its own
    manifest's), and vendor adapter 1 was served under the name, version and groups of 2, which `update list`
    showed as current. Now the folder's manifest must be the bundle the state names (its folder's name)."""
    import shutil

    from codemoat.updates.adapters import open_installed
    from tests.tune.loras import random_lora_gguf

    lic = shop.license()
    loras = []
    for seed in (0, 1):
        lora = tmp_path / f"fee-{seed}.gguf"
        lora.write_bytes(random_lora_gguf(gguf_file, seed=seed))
        loras.append(lora)
        store.apply(shop.release(str(seed + 1), kind="adapter", source=lora, name="fee"), lic)
    assert open_installed("fee").version == "2"
    first = next(r for r in store.list() if not r["current"])
    now = Path(store.current("adapter:fee")["dir"])
    for f in ("manifest.json", "payload.sealed"):
        shutil.copyfile(Path(first["dir"]) / f, now / f)
    with pytest.raises(CodemoatError) as e:
        open_installed("fee")
    assert "another bundle" in str(e.value) and "\n" not in str(e.value)


def test_a_pack_whose_source_name_a_repository_holds_is_refused_before_it_switches(shop, store, tmp_path):
    """Before, `update apply` said the pack was refused ('is an indexed repository') after its state had switched
    to it: it stayed current, and the reconcile that `update list`, `apply` and `rollback` run first tried to index
    it again and failed the same way, every time. Now verify and apply refuse it before anything switches."""
    from codemoat.index.store import SqliteIndex
    from codemoat.index.update import add_repository

    repo = tmp_path / "app"
    repo.mkdir()
    (repo / "a.py").write_text("x = 1\n")
    add_repository(SqliteIndex(), repo, "pack.app", ["everyone"])
    lic = shop.license()
    b = shop.release("1", kind="knowledge-pack", source=_pack_zip(tmp_path, {"b.py": b"y = 2\n"}), name="app")
    for act in (store.verify, store.apply):
        with pytest.raises(CodemoatError, match="indexed repository") as e:
            act(b, lic)
        assert "\n" not in str(e.value)
    assert store.state()["channels"] == {} and store.list() == []


def test_a_pack_every_customer_would_refuse_is_refused_at_release(shop, tmp_path):
    """Before, `vendor release` checked only that the pack was a zip: one with a repeated or unsafe member name
    was signed and shipped, and each customer's apply refused it."""
    import warnings

    shop.license()
    z = _pack_zip(tmp_path, {"a.py": b"x = 1\n"})
    with warnings.catch_warnings(), zipfile.ZipFile(z, "a") as zz:
        warnings.simplefilter("ignore")
        zz.writestr("a.py", b"x = 2\n")
    with pytest.raises(CodemoatError, match="twice"):
        shop.release("1", kind="knowledge-pack", source=z, name="fw")
    with pytest.raises(CodemoatError, match="unsafe path"):
        shop.release("1", kind="knowledge-pack", source=_pack_zip(tmp_path, {"../x.py": b"x = 1\n"}), name="fw")
    assert not list(shop.folder.glob("*.moatpkg"))


@pytest.mark.parametrize("meanwhile", ["replaced", "removed"])
def test_the_license_apply_records_is_the_one_it_checked(shop, store, tmp_path, monkeypatch, meanwhile):
    """Before, apply read --license twice: once to check the bundle against it, again after the switch to record
    it. A file put in its place meanwhile was recorded unchecked (here not a license: every later command without
    --license failed on it), and one removed meanwhile failed the apply, said refused, with the bundle installed."""
    from codemoat.updates.store import UpdateStore

    lic = shop.license()
    store.apply(shop.release("1", kind="knowledge-pack", source=_pack_zip(tmp_path, {"a.py": b"x = 1\n"}), name="fw"), lic)
    given = tmp_path / "given.lic"
    given.write_bytes(lic.read_bytes())
    checked = UpdateStore.check

    def check_then_change(self, bundle, license_file=None):
        out = checked(self, bundle, license_file)
        if meanwhile == "replaced":
            given.write_text("not a license\n")
        else:
            given.unlink()
        return out

    monkeypatch.setattr(UpdateStore, "check", check_then_change)
    b2 = shop.release("2", kind="knowledge-pack", source=_pack_zip(tmp_path, {"a.py": b"x = 2\n"}), name="fw")
    assert store.apply(b2, given)["version"] == "2"
    monkeypatch.setattr(UpdateStore, "check", checked)
    assert store.license_path.read_bytes() == lic.read_bytes()
    b3 = shop.release("3", kind="knowledge-pack", source=_pack_zip(tmp_path, {"a.py": b"x = 3\n"}), name="fw")
    assert store.verify(b3)["installed"] == "2"


def test_brackets_in_release_notes_or_a_serves_answer_are_shown_not_read_as_markup(shop, store, tmp_path, capsys):
    """Before, `update list` printed the vendor's notes as rich markup: a note with "[/]" in it (a path, a list)
    failed every `update list` while that version was installed or kept (MarkupError), and a serve's reason with
    one failed `update apply`'s report after the install."""
    from codemoat.cli.updates_cmd import _report
    from updhelp import run_cli

    lic = shop.license()
    notes = "fixes [/] and [/docs/api] paths"
    store.apply(
        shop.release("1", kind="knowledge-pack", source=_pack_zip(tmp_path, {"a.py": b"x = 1\n"}), name="fw", notes=notes), lic
    )
    r = run_cli("update", "list")
    assert r.returncode == 0 and "fixes" in r.stdout, r.stderr
    _report("installed adapter fee 2", [{"ok": True, "pid": 1, "swapped": False, "reason": "it serves [/x] only"}])
    assert "it serves [/x] only" in capsys.readouterr().out


def test_serves_that_swapped_a_version_another_serves_check_then_failed_go_back_with_the_store(shop, store, gguf_file, tmp_path):
    """Two serves on one home: the first swapped adapter 2 in (its check passed), the second's check failed, and it
    rolled the store back to 1 (store.fail). Before, `update apply` left it there: the first served 2, which
    `update list` showed as failed, with 1 current (and its next start loaded 1). Now the serves that swapped it in
    are handed the store's current version again, and the report says they went back."""
    from codemoat.cli.updates_cmd import _lost_swaps, _settle
    from codemoat.updates.handoff import Listener, hand_over
    from tests.tune.loras import random_lora_gguf

    lic = shop.license()
    for seed in (0, 1):
        lora = tmp_path / f"fee-{seed}.gguf"
        lora.write_bytes(random_lora_gguf(gguf_file, seed=seed))
        store.apply(shop.release(str(seed + 1), kind="adapter", source=lora, name="fee"), lic)
    chan, new = "adapter:fee", store.current("adapter:fee")["bundle_id"]
    serving: list[str] = []

    def swaps(chan: str) -> dict:
        cur = store.current(chan)
        serving.append(cur["version"])
        store.confirm(chan, cur["bundle_id"])
        return {"swapped": True, "version": cur["version"]}

    def fails(chan: str) -> dict:
        store.fail(chan, store.current(chan)["bundle_id"], "its health check failed")
        raise CodemoatError("its health check failed")

    a, b = Listener(swaps, role="serve").start(), Listener(fails, role="vaultd").start()  # asked in this order
    os.rename(b.path, b.path.with_name("vaultd-999999999.sock"))  # as another process's: its own pid in its name
    b.path = b.path.with_name("vaultd-999999999.sock")
    try:
        served = _settle(store, chan, new, _lost_swaps(store, chan, new, hand_over(chan)))
    finally:
        a.close()
        b.close()
    assert store.current(chan)["version"] == "1"
    assert serving == ["2", "1"]  # what the first serve serves in the end is what the store names
    assert [(x["ok"], x.get("back"), x.get("version")) for x in served] == [(True, True, "1"), (False, None, None)]


def test_an_earlier_model_versions_files_put_in_the_current_ones_folder_are_not_served_as_it(shop, store):
    """The model's own files: version 1's model.moat and model.lic copied into version 2's folder opened (the license
    names that model, so they agree with each other) and were served as version 2, a rollback `update rollback` never
    recorded (an outside tester, reading the code). Now the folder's license must be the one its manifest carries."""
    import shutil

    from codemoat.engines.loader import installed_model

    lic = shop.license()
    for v in ("1", "2"):
        store.apply(shop.release(v), lic)
    assert installed_model(None, store)[2].version == "2"  # the negative case: its own files
    first = next(r for r in store.list() if not r["current"])
    now = Path(store.current("model")["dir"])
    for f in ("model.moat", "model.lic"):
        shutil.copyfile(Path(first["dir"]) / f, now / f)
    with pytest.raises(CodemoatError, match="installed model 2: its folder holds another version's license") as e:
        installed_model(None, store)
    assert "\n" not in str(e.value)


def test_settling_hands_back_only_stale_serves_and_names_one_it_cannot(shop, store, gguf_file, tmp_path):
    """A second reviewer, on `_settle`: a serve asked after the failing one had already swapped the store's
    (rolled-back) version and was handed it again, a whole reload for nothing; and when the failed version was the
    channel's first, there was none to go back to, and the serve that swapped it in was reported as serving it."""
    from codemoat.cli.updates_cmd import _lost_swaps, _settle
    from codemoat.updates.handoff import Listener, hand_over
    from tests.tune.loras import random_lora_gguf

    lic = shop.license()
    asked: list[tuple[str, str]] = []

    def swaps(name: str):
        def swap(chan: str) -> dict:
            cur = store.current(chan)
            asked.append((name, cur["version"]))
            store.confirm(chan, cur["bundle_id"])
            return {"swapped": True, "version": cur["version"]}

        return swap

    def fails(chan: str) -> dict:
        store.fail(chan, store.current(chan)["bundle_id"], "its health check failed")
        raise CodemoatError("its health check failed")

    def settle(chan: str) -> list[dict]:
        new = store.current(chan)["bundle_id"]
        a, others = Listener(swaps("a"), role="serve").start(), []
        for fn, pid in ((fails, 999999998), (swaps("c"), 999999999)):  # asked after `a`, `b` first: other processes'
            listener = Listener(fn, role="vaultd").start()  # one at a time: each would be vaultd-<this pid>.sock
            os.rename(listener.path, listener.path.with_name(f"vaultd-{pid}.sock"))
            listener.path = listener.path.with_name(f"vaultd-{pid}.sock")
            others.append(listener)
        b, c = others
        try:
            return _settle(store, chan, new, _lost_swaps(store, chan, new, hand_over(chan)))
        finally:
            for listener in (a, b, c):
                listener.close()

    for seed in (0, 1):  # two versions of `fee`: version 2 fails at `b`
        lora = tmp_path / f"fee-{seed}.gguf"
        lora.write_bytes(random_lora_gguf(gguf_file, seed=seed))
        store.apply(shop.release(str(seed + 1), kind="adapter", source=lora, name="fee"), lic)
    served = settle("adapter:fee")
    assert asked == [("a", "2"), ("c", "1"), ("a", "1")], asked  # `c` had the store's version: not asked again
    assert [(x["ok"], x.get("back")) for x in served] == [(True, True), (False, None), (True, None)]
    asked.clear()
    lora = tmp_path / "tax.gguf"  # a first version that fails: nothing to go back to
    lora.write_bytes(random_lora_gguf(gguf_file, seed=2))
    store.apply(shop.release("1", kind="adapter", source=lora, name="tax"), lic)
    served = settle("adapter:tax")
    assert store.current("adapter:tax") is None and asked == [("a", "1")]
    assert served[0]["ok"] is False and "restart this server" in served[0]["error"], served


def test_a_staging_folder_the_tidy_up_cannot_remove_is_a_one_line_refusal(shop, store, monkeypatch):
    """A second reviewer: `apply` makes its staging folder new, and one the tidy-up could not remove (a folder inside
    it not writable, to a user who is not root) was a FileExistsError traceback, neither audited nor one line."""
    from codemoat.updates import store as store_module
    from codemoat.updates.bundle import Bundle

    lic = shop.license()
    pkg = shop.release("1")
    left = store.root / "staging" / Bundle(pkg).manifest["bundle_id"]
    left.mkdir(parents=True)
    (left / "x").write_text("left over")
    monkeypatch.setattr(store_module.shutil, "rmtree", lambda *a, **kw: None)  # as a folder root alone may remove
    with pytest.raises(CodemoatError, match="is left from an earlier install and cannot be removed") as e:
        store.apply(pkg, lic)
    assert "\n" not in str(e.value) and store.current("model") is None
