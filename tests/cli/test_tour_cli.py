"""README's five-minute tour, the steps that need something the tour does not set up: each says, in one line,
what is missing; and what a piped tour step prints (no empty line in front, no id cut short)."""

import json
from pathlib import Path

from cli_errors import one_line_error
from conftest import ROOT, create_token, run_cli

REPO = ROOT / "src" / "codemoat" / "index"


def test_directory_sync_without_a_directory_names_the_setting():
    line = one_line_error(run_cli("directory", "sync", "--dry-run"), "no LDAP directory configured: set ldap_url")
    assert "[directory] section" in line and "CODEMOAT_CONFIG" in line


def test_login_at_a_server_without_sign_in_names_the_directory_section(tiny_gguf, serve_process):
    s = serve_process(["--model", str(tiny_gguf)])
    for args, needle in (
        (["--user", "alice", "--password-stdin"], "offers no directory sign-in"),
        (["--user", "alice"], "offers no directory sign-in"),  # piped without --password-stdin: no getpass warning
        ([], "offers no sign-in with an identity provider"),
    ):
        line = one_line_error(run_cli("login", "--server", s.url, *args, input="pw\n"), needle)
        assert "[directory]" in line and "docs/operations.md" in line
    one_line_error(run_cli("login", "--server", s.url, "--user", "alice", input=""), "no password on standard input")

    # the console's sign-in page (README step 7) says how to make an admin token: that command runs as shown
    import re
    import shlex

    import httpx

    page = httpx.get(s.url + "/admin/signin", timeout=30).text
    shown = re.search(r"<code>(codemoat tokens create [^<]*)</code>", page).group(1)
    r = run_cli(*shlex.split(shown)[1:], "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["scopes"] == ["admin"], (shown, r.stderr)


def test_piped_index_add_starts_with_its_summary_and_retrieve_names_a_missing_file():
    r = run_cli("index", "add", str(REPO), "--name", "payments", "--groups", "payments")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("payments: "), repr(r.stdout[:40])
    one_line_error(  # the same folder again under another name: no link is involved, and none is named
        run_cli("index", "add", str(REPO), "--name", "payments-2"), f"{REPO} is already indexed as another repository"
    )
    one_line_error(
        run_cli("retrieve", "--repo", "payments", "--path", "app/billing.py", "--line", "42"),
        f"no file app/billing.py in the repository payments ({REPO})",
    )


def test_token_and_license_ids_are_whole_in_an_80_column_table(tiny_gguf, tmp_path: Path):
    """`tokens revoke ID` and `vendor license show ID` take the id a narrow table used to cut to `lic_24b…`."""
    create_token("--name", "alice-with-a-long-editor-name", "--scopes", "complete,chat,metrics")
    token_id = json.loads(run_cli("tokens", "list", "--json").stdout)[0]["id"]
    narrow = {"COLUMNS": "80"}
    listed = run_cli("tokens", "list", env=narrow).stdout
    assert token_id in listed and "…" not in listed, listed  # other cells wrap, none is cut short
    # the tour's first command: its sentence on one line (it broke at "keep it / safe:"), the token alone on the next
    lines = run_cli("tokens", "create", "--name", "alice", env=narrow).stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("shown once, keep it safe:") and lines[1].startswith("cm_"), lines

    vendor, ident, moat = tmp_path / "vendor", tmp_path / "acme-machine.json", tmp_path / "acme.moat"
    assert run_cli("vendor", "init", "--vendor", str(vendor)).returncode == 0
    ident.write_text(run_cli("machine-id", "--json").stdout)
    r = run_cli("vendor", "seal", str(tiny_gguf), "--vendor", str(vendor), "--customer", "ACME", "--out", str(moat))
    assert r.returncode == 0, r.stderr
    r = run_cli("vendor", "license", "issue", "--vendor", str(vendor), "--customer", "ACME", "--model", str(moat),
                "--machine", str(ident), "--expires", "2099-12-31", "--out", str(tmp_path / "acme.lic"), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lic_id = json.loads(r.stdout)["id"]
    listed = run_cli("vendor", "license", "list", "--vendor", str(vendor), env=narrow).stdout
    assert lic_id in listed and "…" not in listed, listed
    # `inspect` shows its dates as dates (it showed `expires: 4102358400`), each once
    shown = run_cli("inspect", str(tmp_path / "acme.lic")).stdout
    assert "expires: 2099-12-31T00:00:00Z" in shown and "expires_iso" not in shown, shown
    assert "created: 20" in run_cli("inspect", str(moat)).stdout


def test_readme_tour_vendor_steps_run_as_written(tmp_path: Path):
    """Steps 4, 6 and 9 of the README's tour, copied line by line into a shell in a fresh folder (the servers,
    training, tuning and the directory left out): each exits 0, and the trace names the customer."""
    import os
    import re
    import shutil
    import subprocess

    from conftest import BUNDLED, CODEMOAT

    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## A five-minute tour") : text.index("## Documentation")]
    script = "\n".join(re.findall(r"```sh\n(.*?)```", tour, re.S)).replace("\\\n", " ")
    wanted = ("codemoat vendor ", "codemoat machine-id", "codemoat verify", "codemoat trace", "codemoat update ")
    skipped = ("codemoat vendor train",)
    steps = [ln for ln in script.splitlines() if ln.startswith(wanted) and not ln.startswith(skipped)]
    assert len(steps) >= 9, steps
    (tmp_path / "models").symlink_to(BUNDLED.parent)
    shutil.copy(BUNDLED, tmp_path / "v2.gguf")  # "v2.gguf: e.g. step 5's"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "codemoat").write_text(f'#!/bin/sh\nexec {" ".join(CODEMOAT)} "$@"\n')
    (bindir / "codemoat").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    for step in steps:
        r = subprocess.run(["bash", "-c", step], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (step, r.stdout, r.stderr)
        if step.startswith("codemoat trace"):
            assert "carries the fingerprint of ACME" in r.stdout.replace("\n", " "), r.stdout


def test_config_show_keeps_every_setting_name_whole():
    """`config show` at 80 and 120 columns: every setting's name whole (the environment column, cut short for
    most settings even at 120 columns, is one line of rule under the table); nothing cut with an ellipsis."""
    from codemoat.config import describe

    for columns in ("80", "120"):
        out = run_cli("config", "show", env={"COLUMNS": columns}).stdout
        assert "…" not in out, out
        assert all(f"│ {name} " in out for name, _desc, _default in describe())
        assert "CODEMOAT_SERVER__PORT" in out.splitlines()[-1]


def test_every_command_option_and_argument_has_help():
    """`codemoat --help` and each noun's: every command has a help text whose first paragraph (the line the noun's
    list shows) is one sentence-line, every option and argument says what it is."""
    import typer

    from codemoat.cli.main import app

    missing, broken, leaves = [], [], []

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
            return
        leaves.append(" ".join(path))
        first = (cmd.help or "").strip().split("\n\n")[0]
        if not first:
            missing.append(" ".join(path))
        if "\n" in first:
            broken.append(" ".join(path))
        for p in cmd.params:
            if "--help" not in getattr(p, "opts", ()) and not (getattr(p, "help", None) or "").strip():
                missing.append(f"{' '.join(path)} {p.name}")

    walk(typer.main.get_command(app), ["codemoat"])
    assert len(leaves) > 50 and not missing and not broken, (missing, broken)


def test_vendor_train_of_a_missing_corpus_prints_only_the_error(tmp_path: Path):
    """README step 5 with a corpus folder that is not there: the one-line error, and no progress bar above it."""
    r = run_cli("vendor", "train", "--corpus", str(tmp_path / "src" / "lib"), "--out", str(tmp_path / "m.gguf"), "--minutes", "1")
    one_line_error(r, f"corpus directory not found: {tmp_path / 'src' / 'lib'}")
    assert r.stdout == "", r.stdout


def test_watermark_detect_refuses_a_model_file_at_once(tmp_path: Path):
    """`watermark detect` reads text (a model's outputs); given the leaked GGUF of README step 6 it scored its
    7 MB as text for more than ten minutes. Now: one line, before any model loads."""
    from conftest import BUNDLED

    for model in (BUNDLED, BUNDLED.with_suffix(".hf") / "model.safetensors"):
        r = run_cli("watermark", "detect", str(model), "--vendor", str(tmp_path / "vendor"), timeout=60)
        one_line_error(r, f"{model} is a model file, not text (a model's weights are what `codemoat trace` tests)")
