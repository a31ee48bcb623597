"""Attacker's tests: a path named on the command line (or in a setting) that is a FIFO, a device or a
huge file is refused in one line, never read for good.

Before `paths.read_regular`, these commands read the named file whole: a FIFO (a hostile USB stick)
blocked them for good (the open itself waits for a writer), /dev/zero would have filled memory, a
multi-GiB file was read into memory before being found not to be a license. The device case uses
/dev/null (a character device like /dev/zero, so the same check, but harmless to the code before the
fix); the over-limit case a sparse file one byte over the command's limit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ggufs import write_gguf

from vaulthelp import bundle, one_line_error

TIMEOUT = 30  # a FIFO hung the commands for good before; a run ends in seconds now


def run(*args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in (os.environ | (env or {})).items() if k != "CODEMOAT_DEBUG" and v is not None}
    return subprocess.run(
        [sys.executable, "-m", "codemoat.cli.main", *args], capture_output=True, text=True, env=e, timeout=TIMEOUT
    )


def plant(path: Path, kind: str, limit: int, first: bytes = b"") -> str:
    """`path` made into the attacker's kind of file; returns the path to name on the command line."""
    if kind == "fifo":
        os.mkfifo(path)
        return str(path)
    if kind == "device":
        return "/dev/null"
    with open(path, "wb") as f:  # sparse: one byte over the limit costs no disk
        f.write(first)
        f.truncate(limit + 1)
    return str(path)


EXPECT = {"fifo": "not a regular file", "device": "not a regular file", "huge": "is larger than"}
KINDS = list(EXPECT)


@pytest.fixture
def sealed(vendor, machine, tmp_path):
    model = tmp_path / "m.gguf"
    write_gguf(model, 4096)
    moat, lic, _ = bundle(vendor, model, tmp_path / "a", machine)
    ident = tmp_path / "machine.json"
    ident.write_text(json.dumps(machine.identity()))
    return vendor, moat, ident


def issue(vendor, moat, machine_file: str, root: Path | None = None) -> list[str]:
    return [
        *("vendor", "license", "issue", "--vendor", str(root or vendor.root), "--customer", "acme"),
        *("--model", str(moat), "--expires", "30d", "--machine", machine_file),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_refuses_a_fifo_device_or_huge_license(tmp_path, kind):
    """`codemoat inspect FILE` (License.load for a file starting with '{'): limit 16 MiB."""
    f = plant(tmp_path / "x.lic", kind, 16 << 20, b"{")
    assert EXPECT[kind] in one_line_error(run("inspect", f))


@pytest.mark.parametrize("kind", KINDS)
def test_license_issue_refuses_a_fifo_device_or_huge_machine_identity(sealed, tmp_path, kind):
    """`vendor license issue --machine FILE`: the customer's machine identity, limit 1 MiB."""
    vendor, moat, _ = sealed
    f = plant(tmp_path / "id.json", kind, 1 << 20, b"{")
    assert EXPECT[kind] in one_line_error(run(*issue(vendor, moat, f)))


@pytest.mark.parametrize("kind", KINDS)
def test_a_fifo_device_or_huge_file_in_the_vendor_folder_is_refused(sealed, tmp_path, kind):
    """A vendor folder (given with --vendor) whose master.key is not a regular file: limit 1 MiB."""
    vendor, moat, ident = sealed
    root = tmp_path / "vendor-copy"
    shutil.copytree(vendor.root, root)
    (root / "master.key").unlink()
    f = plant(root / "master.key", kind, 1 << 20)
    if kind == "device":
        (root / "master.key").symlink_to(f)
    assert EXPECT[kind] in one_line_error(run(*issue(vendor, moat, str(ident), root)))


@pytest.mark.parametrize("kind", KINDS)
def test_config_show_refuses_a_fifo_device_or_huge_config(tmp_path, kind):
    """`--config FILE` (every command's TOML configuration): limit 16 MiB."""
    f = plant(tmp_path / "codemoat.toml", kind, 16 << 20)
    assert EXPECT[kind] in one_line_error(run("config", "show", "--config", f, env={"CODEMOAT_HOME": str(tmp_path / "h")}))


@pytest.mark.parametrize("kind", KINDS)
def test_tpm_trust_ca_refuses_a_fifo_device_or_huge_pem(vendor, tmp_path, kind):
    """`vendor tpm trust-ca FILE`: limit 16 MiB."""
    f = plant(tmp_path / "ca.pem", kind, 16 << 20)
    assert EXPECT[kind] in one_line_error(run("vendor", "tpm", "trust-ca", f, "--vendor", str(vendor.root)))


@pytest.mark.parametrize("kind", KINDS)
def test_a_fifo_device_or_huge_database_url_file_is_refused(tmp_path, kind):
    """CODEMOAT_DATABASE_URL_FILE (a mounted secret): limit 1 MiB."""
    f = plant(tmp_path / "database-url", kind, 1 << 20)
    env = {"CODEMOAT_HOME": str(tmp_path / "h"), "CODEMOAT_DATABASE_URL_FILE": f, "CODEMOAT_DATABASE_URL": None}
    assert EXPECT[kind] in one_line_error(run("users", "list", env=env))


@pytest.mark.parametrize("kind", KINDS)
def test_watermark_detect_refuses_a_fifo_device_or_huge_text(vendor, tmp_path, kind):
    """`watermark detect FILE...`: the suspect texts, read before anything else; limit 64 MiB."""
    f = plant(tmp_path / "suspect.py", kind, 64 << 20)
    assert EXPECT[kind] in one_line_error(run("watermark", "detect", f, "--vendor", str(vendor.root)))


def test_retrieve_refuses_a_fifo_in_the_repository(tmp_path):
    """`retrieve --path` reads a file of an indexed repository: one swapped for a FIFO after indexing
    hung it; it is read as `index update` reads (regular files up to MAX_BYTES)."""
    env = {"CODEMOAT_HOME": str(tmp_path / "h")}
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("def f():\n    return 1\n")
    assert run("index", "add", str(repo), "--name", "r", "--json", env=env).returncode == 0
    (repo / "a.py").unlink()
    os.mkfifo(repo / "a.py")
    assert "not a regular file" in one_line_error(run("retrieve", "--repo", "r", "--path", "a.py", "--line", "1", env=env))


@pytest.mark.parametrize("kind", KINDS)
def test_tco_refuses_a_fifo_device_or_huge_price_file(tmp_path, kind):
    """`tco --prices FILE`: a TOML price file; limit 16 MiB."""
    f = plant(tmp_path / "prices.toml", kind, 16 << 20)
    assert EXPECT[kind] in one_line_error(run("tco", "--prices", f, env={"CODEMOAT_HOME": str(tmp_path / "h")}))


def model_input(tmp_path: Path, case: str) -> Path:
    """The vendor's model input made into the attacker's kind of file: a FIFO named as a GGUF or
    safetensors model (with config.json beside it, as a real one has), a FIFO as the weights of a model
    folder, or a safetensors name linked to /dev/null. No size limit: models are large by design."""
    kind, _, name = case.partition("-")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    target = folder / name
    if kind == "folder":
        os.mkfifo(folder / "w.safetensors")
        return folder
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/null")
    return target


SEAL_CASES = ["fifo-x.gguf", "fifo-x.safetensors", "folder-", "device-x.safetensors"]


@pytest.mark.parametrize("case", SEAL_CASES)
def test_vendor_seal_refuses_a_fifo_or_device_as_the_model(vendor, tmp_path, case):
    """`vendor seal MODEL`: before, a FIFO named x.safetensors (or the weights of a model folder) hung it,
    x.safetensors linked to /dev/null was sealed as an empty model, a FIFO x.gguf got 'a model is a .gguf
    file...'."""
    model = model_input(tmp_path, case)
    args = ("vendor", "seal", str(model), "--vendor", str(vendor.root), "--customer", "acme", "--out", str(tmp_path / "o.moat"))
    assert "not a regular file" in one_line_error(run(*args))
    assert not (tmp_path / "o.moat").exists()


RELEASE_CASES = [
    ("--model", "fifo-x.safetensors"),
    ("--adapter", "fifo-a.gguf"),
    ("--adapter", "device-a.safetensors"),
    ("--knowledge-pack", "fifo-pack.zip"),
    ("--knowledge-pack", "device-pack.zip"),
    ("--base-model", "fifo-base.gguf"),
]


@pytest.mark.parametrize("option,case", RELEASE_CASES, ids=[f"{o[2:]}-{c}" for o, c in RELEASE_CASES])
def test_vendor_release_refuses_a_fifo_or_device_as_its_input(sealed, tmp_path, option, case):
    """`vendor release --model/--adapter/--knowledge-pack/--base-model FILE` (the customer licensed):
    before, a FIFO as the knowledge pack or the model hung it, a FIFO adapter or base model got 'an
    adapter is one file' / 'base model not found', /dev/null was read as an empty adapter or pack."""
    vendor, _, _ = sealed
    f = model_input(tmp_path, case)
    args = ["vendor", "release", "--vendor", str(vendor.root), "--customer", "acme", "--version", "2"]
    args += ["--out", str(tmp_path / "b.moatpkg"), option, str(f)]
    if option == "--base-model":
        adapter = tmp_path / "a.safetensors"  # a LoRA as peft writes one (release checks the adapter first)
        head = json.dumps({"m.layers.0.q_proj.lora_A.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}})
        adapter.write_bytes(len(head).to_bytes(8, "little") + head.encode() + bytes(4))
        args += ["--adapter", str(adapter)]
    assert "not a regular file" in one_line_error(run(*args))
    assert not (tmp_path / "b.moatpkg").exists()


def test_vendor_train_skips_a_fifo_in_the_corpus(tmp_path):
    """`vendor train --corpus DIR`: a FIFO named like a code file hung the corpus walk (its size is 0, so
    it was read); it is skipped now, so a corpus of only a FIFO has no code files."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    os.mkfifo(corpus / "a.py")
    args = ("vendor", "train", "--corpus", str(corpus), "--out", str(tmp_path / "m.gguf"), "--size", "micro", "--steps", "1")
    assert "no code files found" in one_line_error(run(*args, env={"CODEMOAT_HOME": str(tmp_path / "h")}))
