"""A hostile look at `codemoat tune` and the adapter it writes: secrets committed to a repository are not
training data; --out never replaces one of the run's inputs, and what cannot be written is said before the
run, not after it; an adapter's name is a name (the audit record names it); a failure once the base is
loaded is still one line under --json."""

from __future__ import annotations

from pathlib import Path

import pytest

from codemoat.engines.adapters import LoadedAdapter
from codemoat.errors import CodemoatError
from codemoat.serve.adapters import choose
from codemoat.tune.corpus import load_corpus
from tests.cli_errors import one_line_error
from tests.conftest import run_cli
from tests.tune.test_tune import PAY, _index, tune_options

AWS_ID = "AKIAIOSFODNN7EXAMPLQ"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
GH_TOKEN = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A"
PASSWORD = "Tr0ub4dor-prod-db-7781"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n-----END RSA PRIVATE KEY-----"
LEAKY = {
    "payments/settings.py": (
        f'AWS_ACCESS_KEY_ID = "{AWS_ID}"\naws_secret_access_key = "{AWS_SECRET}"\n'
        f'GITHUB_TOKEN = "{GH_TOKEN}"\ndb_password = "{PASSWORD}"\n\n\ndef fee(c):\n    return c * 15 // 1000\n'
    ),
    "deploy/deploy.sh": f"export DB_PASSWORD={PASSWORD}\nexport REGION=eu-west-1\n",
    "deploy/key.txt": PEM + "\n",
}


def test_secrets_committed_to_a_repository_are_not_training_data(tmp_path):
    """A key, a token or a password in the indexed code was trained on as it was: the adapter could complete
    it for everyone it serves, after the key left the repository. Each is replaced by [REDACTED:<kind>]
    (audit.redact, the prompts' detectors); the code around it stays, and the count is kept."""
    _index(tmp_path, "payments", {**PAY, **LEAKY}, ["payments"])
    c = load_corpus(["payments"])
    text = "\n".join(f.text for f in c.files)
    for secret in (AWS_ID, AWS_SECRET, GH_TOKEN, PASSWORD, "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun"):
        assert secret not in text
    assert "[REDACTED:aws_access_key_id]" in text and "[REDACTED:github_token]" in text
    assert "def fee(c):" in text and "REGION=eu-west-1" in text  # the code itself is still there
    assert c.secrets >= 6
    assert load_corpus(["payments"]).files == c.files  # the same text each time: a killed run resumes


def test_code_of_a_repository_indexed_inside_another_is_not_the_outer_ones_training_data(tmp_path):
    """`hr` indexed inside `outer`'s folder: its files are hr's (groups hr), yet an index from before `index add`
    took them out of `outer`'s rows still listed them as outer's, and tune trained the adapter served to
    outer's groups on hr's code. The corpus reads as `index update` does: never inside another repository."""
    from codemoat.index.store import SqliteIndex

    root = _index(tmp_path, "outer", {**PAY, "hr/salaries.py": "SALARY_CEO = 'nine hundred thousand'\n" * 4}, ["dev"])
    store = SqliteIndex()
    with store.transaction():  # as such an index holds it: hr added, outer's rows not updated since
        store.add_repo("hr", str(root / "hr"), ["hr"], None)
    store.close()
    c = load_corpus(["outer"])
    assert sorted(f.path for f in c.files) == sorted(f"outer/{p}" for p in PAY) and c.skipped == 1
    assert not any("SALARY_CEO" in f.text for f in c.files)


@pytest.mark.parametrize("out", [".moat", "..moat", "a\x1bb.moat", "pay\nops.moat", "x" * 200 + ".moat", "-.moat"])
def test_an_adapter_name_that_is_not_a_name_is_refused_before_anything_loads(tmp_path, home, out):
    """The name is --out's file name up to its first dot. `--out .moat` wrote an adapter named "": serve took
    it, every caller it was for got a 400 ("no adapter named '' is loaded") and the audit record named no
    adapter; a control character went into every audit record that named it."""
    from codemoat.tune.trainer import check_options

    with pytest.raises(CodemoatError, match="is not a name") as e:
        check_options(tune_options(tmp_path / out, tmp_path / "m.gguf"))
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    check_options(tune_options(tmp_path / "pay.v2.moat", tmp_path / "m.gguf"))  # name "pay"
    args = ["tune", "--repos", "shop", "--out", str(tmp_path / out), "--model", str(tmp_path / "m.gguf")]
    one_line_error(run_cli(*args), "is not a name")
    assert not (tmp_path / out).exists()


def test_a_nameless_adapter_serves_nobody():
    """An adapter written before tune refused such names: the audit record could not name it, so it is not chosen."""
    nameless = LoadedAdapter("", (("payments", ("payments",)),), "0" * 64, -1)
    named = LoadedAdapter("pay", (("payments", ("payments",)),), "0" * 64, -1)
    assert choose([nameless], {"payments"}, ["payments"]) is None
    assert choose([nameless, named], {"payments"}, ["payments"]) is named
    assert choose([LoadedAdapter("", (), None, -1, ("everyone",))], {"dev"}, []) is None  # a vendor one too


def test_out_onto_an_input_is_refused_even_with_force(tmp_path, home):
    """`tune --model m.gguf --out m.gguf --force` ran the whole tune and then replaced the base model with the
    adapter (likewise its license, the configuration or the code index). --force replaces an earlier
    output, never an input: refused in one line before anything loads, by file (a link to it, or another
    spelling of its path, is the same file), and the input is left as it was."""
    base = tmp_path / "m.gguf"
    base.write_bytes(b"GGUF a base model")
    lic = tmp_path / "m.lic"
    lic.write_bytes(b"a license")
    cfg = tmp_path / "codemoat.toml"
    cfg.write_text("")
    (tmp_path / "link.gguf").symlink_to(base)
    common = ["tune", "--repos", "shop", "--model", str(base), "--force"]
    for out, what in (
        (base, "base model"),
        (tmp_path / "link.gguf", "base model"),
        (f"{tmp_path}/./m.gguf", "base model"),
        (lic, "license"),
        (cfg, "configuration"),
    ):
        one_line_error(run_cli(*common, "--out", str(out), "--license", str(lic), "--config", str(cfg)), f"is the {what}")
    index = Path(home) / "index.db"
    index.write_bytes(b"the index")
    one_line_error(run_cli(*common, "--out", str(index)), "is the code index")
    assert base.read_bytes() == b"GGUF a base model" and lic.read_bytes() == b"a license" and cfg.read_text() == ""
    assert index.read_bytes() == b"the index"
    # a model folder: none of its files either
    folder = tmp_path / "m.hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    args = ["tune", "--repos", "shop", "--model", str(folder), "--out", str(folder / "model.safetensors"), "--force"]
    one_line_error(run_cli(*args), "is the base model")
    assert (folder / "model.safetensors").read_bytes() == b"weights"


def test_an_out_the_sealer_cannot_write_is_refused_before_the_run(tmp_path, home):
    """The sealer writes `.NAME.<32 hex>.part` beside --out and renames it: a file name that fits alone but not
    with those 39 characters ended a whole run with "error: OSError: [Errno 36] File name too long" (its
    checkpoint keyed by that --out, so no other --out resumed it). Said before anything loads, and nothing
    is left beside --out."""
    out = tmp_path / ("a" * 230 + ".moat")
    args = ["tune", "--repos", "shop", "--out", str(out), "--model", str(tmp_path / "m.gguf")]
    one_line_error(run_cli(*args), "cannot write the adapter beside")
    assert list(tmp_path.iterdir()) == []
    # one that fits goes on to the next thing wrong (nothing indexed in this home), leaving nothing behind
    one_line_error(run_cli(*args[:4], str(tmp_path / "a.moat"), *args[5:]), "no indexed repository named 'shop'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_failure_after_the_base_is_loaded_is_one_line_under_json(tmp_path, tiny_gguf, home):
    """transformers' GGUF reader drew its "Converting and de-quantizing GGUF tensors" bar on stderr (torch had
    imported tqdm before TQDM_DISABLE was set), so an error once the base was loaded was not one line, and
    --json's stderr was never clean."""
    _index(tmp_path, "tiny", {f"{n}.py": f"def {n}():\n    return 1\n" for n in "abc"}, ["dev"])
    args = ["tune", "--repos", "tiny", "--out", str(tmp_path / "t.moat"), "--model", str(tiny_gguf), "--steps", "1"]
    r = run_cli(*args, "--rank", "2", "--threads", "1", "--eval-tokens", "20", "--infill-lines", "0", "--json", timeout=300)
    one_line_error(r, "too little code to tune on")


def test_a_second_tune_onto_the_same_out_is_refused_while_the_first_runs(tmp_path, home):
    """The same command started twice trained twice side by side on one checkpoint: the first to end removed
    it with the other's half-written temporary file (`.KEY.ckpt.<hex>.part`), which then failed when it next
    saved, and the last to end replaced the first's adapter. A run holds --out (by the file it resolves to)
    until it ends; a second is refused in one line at once, and goes on once the first has ended."""
    from codemoat.tune import checkpoint
    from codemoat.tune.trainer import tune

    out = tmp_path / "pay.moat"
    (tmp_path / "same").symlink_to(tmp_path)
    args = ["tune", "--repos", "shop", "--model", str(tmp_path / "m.gguf")]
    with checkpoint.running(out):
        for spelt in (out, tmp_path / "same" / "pay.moat"):
            one_line_error(run_cli(*args, "--out", str(spelt)), f"another codemoat tune is writing {spelt} now")
        with pytest.raises(CodemoatError, match="another codemoat tune is writing"):
            tune(tune_options(out, tmp_path / "m.gguf"))
        one_line_error(run_cli(*args, "--out", str(tmp_path / "other.moat")), "no indexed repository named 'shop'")
    one_line_error(run_cli(*args, "--out", str(out)), "no indexed repository named 'shop'")


def test_a_runs_lock_file_goes_with_it_and_a_lock_on_the_removed_file_does_not_count(tmp_path, home):
    """One `tune/out-<hash>.lock` was left for every --out ever tuned. It is removed when the run ends; a run that
    had opened it just before (and locks it after) holds a file no longer at that name, so it must lock the new one
    instead, or two runs would write one --out side by side again."""
    import fcntl
    import os

    from codemoat.tune import checkpoint

    out = tmp_path / "pay.moat"
    folder = home / "tune"
    with checkpoint.running(out):
        (lock,) = folder.glob("out-*.lock")
        late = os.open(lock, os.O_RDWR)  # a second run, between its open and its flock
    assert not lock.exists()
    fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it gets the removed file's lock: that must not count
    try:
        with checkpoint.running(out):  # a third run takes the name's new file...
            assert lock.exists()
            assert os.fstat(late).st_ino != lock.stat().st_ino
            with pytest.raises(CodemoatError, match="another codemoat tune is writing"):
                with checkpoint.running(out):  # ...and holds it against a fourth
                    pass
    finally:
        os.close(late)
    assert list(folder.glob("out-*.lock")) == []


def test_a_lock_taken_on_a_file_removed_after_it_was_opened_is_taken_again(tmp_path, home):
    """The race itself: the run holding the lock ends and removes the file after this run opened it, before this
    run locks it. The lock this run then gets is on a file nobody else can find; it must open the name again."""
    import os

    from codemoat.tune import checkpoint

    real_open, opened = os.open, []

    def open_then_lose_it(path, *a, **kw):  # the holder's end lands between this run's open and its flock
        fd = real_open(path, *a, **kw)
        if str(path).endswith(".lock") and not opened:
            os.unlink(path)
        opened.append(fd)
        return fd

    patch = pytest.MonkeyPatch()  # its own: undoing the test's would undo the home fixture's too
    patch.setattr(checkpoint.os, "open", open_then_lose_it)
    out = tmp_path / "pay.moat"
    with checkpoint.running(out):
        patch.undo()
        (lock,) = (home / "tune").glob("out-*.lock")
        assert len(opened) == 2
        with pytest.raises(CodemoatError, match="another codemoat tune is writing"):
            with checkpoint.running(out):
                pass


def test_serve_refuses_a_nameless_adapter_at_start_in_one_line(tmp_path, home):
    """An adapter an older tune wrote with an empty name (`--out .moat`) or a control character in it: serve started,
    and then every user it applied to got a 400 "no adapter named ''"; now serve's start names it (the selection
    guard above stays for one loaded before)."""
    import json

    from codemoat.engines.adapters import Adapter, load_adapters, seal_adapter
    from codemoat.errors import CodemoatError

    for name in ("", "pay\x1b[2J"):
        meta = {"name": name, "kind": "codemoat-adapter", "version": 1, "base": {"name": "m", "sha256": "0" * 64}}
        meta["repos"] = []
        path = seal_adapter(Adapter(meta, b"GGUF", b"weights", json.dumps({"r": 8})), tmp_path / "x.moat")
        with pytest.raises(CodemoatError, match="is not a name that serving and the audit log can use") as e:
            load_adapters([str(path)], "0" * 64)
        assert "\x1b" not in str(e.value)
        path.unlink()
