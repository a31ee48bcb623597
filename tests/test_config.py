"""One settings tree: TOML file, then CODEMOAT_* environment, then flags; every setting documented."""

import json

import pytest

from codemoat.config import describe, load_settings
from codemoat.errors import CodemoatError
from conftest import ROOT, run_cli


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "codemoat.toml"
    cfg.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[model]\nn_ctx = 2048\nmax_tokens_limit = 100\n')
    s = load_settings(cfg)
    assert (s.server.port, s.server.host, s.model.n_ctx) == (9000, "0.0.0.0", 2048)
    monkeypatch.setenv("CODEMOAT_SERVER__PORT", "9100")
    assert load_settings(cfg).server.port == 9100  # environment beats the file
    s = load_settings(cfg, **{"server.port": 9200, "model.n_ctx": None})
    assert s.server.port == 9200 and s.model.n_ctx == 2048  # flags beat both; unset flags change nothing
    assert s.model.max_tokens_limit == 100


def test_bad_config_is_a_clean_error(tmp_path):
    with pytest.raises(CodemoatError, match="config file not found"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'many'\n")
    r = run_cli("config", "show", "--config", str(bad))
    assert r.returncode == 1 and "invalid configuration: server.port" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    bad.write_text("[server\nport=")
    r = run_cli("config", "show", "--config", str(bad))
    assert r.returncode == 1 and "cannot read configuration" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_every_setting_has_a_description_and_is_documented():
    doc = (ROOT / "docs" / "operations.md").read_text()
    for name, desc, _ in describe():
        assert desc, f"{name} has no description"
        assert f"| `{name}` |" in doc, f"{name} has no row in docs/operations.md's settings table"


def test_config_show_json():
    r = run_cli("config", "show", "--json", env={"CODEMOAT_MODEL__N_CTX": "1234"})
    assert r.returncode == 0, r.stderr
    rows = {row["setting"]: row for row in json.loads(r.stdout)}
    assert rows["model.n_ctx"]["value"] == 1234 and rows["model.n_ctx"]["env"] == "CODEMOAT_MODEL__N_CTX"


def test_unknown_fim_template_is_refused_at_start_up(tmp_path):
    want = "error: invalid configuration: model.fim_template: unknown FIM template 'nosuch': choose from qwen, deepseek, starcoder, codellama, codegemma"
    cfg = tmp_path / "fim.toml"
    cfg.write_text('[model]\nfim_template = "nosuch"\n')
    missing = str(tmp_path / "no-such-model.gguf")
    for args, env in (
        (["--fim-template", "nosuch"], None),
        (["--config", str(cfg)], None),
        ([], {"CODEMOAT_MODEL__FIM_TEMPLATE": "nosuch"}),
    ):
        # refused while the settings load, before the model is looked for (else: "model not found")
        r = run_cli("serve", "--model", missing, "--port", "0", *args, env=env)
        assert r.returncode == 1 and r.stderr.strip() == want, r.stderr
    s = load_settings(**{"model.fim_template": "starcoder"})
    assert s.model.fim_template == "starcoder"
    with pytest.raises(ValueError, match="unknown FIM template"):
        s.model.fim_template = "nosuch"  # checked on assignment too


def test_config_folder_is_named_as_such(tmp_path):
    r = run_cli("config", "show", "--config", str(tmp_path))
    assert r.returncode == 1 and r.stderr.strip() == f"error: config file {tmp_path} is a folder, not a TOML file"


def test_config_unknown_keys_warn_in_one_line(tmp_path):
    cfg = tmp_path / "codemoat.toml"
    cfg.write_text("[nosuch]\na = 1\n[server]\nprot = 9000\nport = 9001\n")
    r = run_cli("config", "show", "--json", "--config", str(cfg))
    assert r.returncode == 0, r.stderr  # a newer codemoat's settings must not stop an older one
    assert r.stderr.strip() == (
        f"warning: {cfg}: unknown settings 'nosuch', 'server.prot' ignored (`codemoat config show` lists every setting)"
    )
    assert {row["setting"]: row["value"] for row in json.loads(r.stdout)}["server.port"] == 9001
    cfg.write_text("[server]\nport = 9001\n")
    r = run_cli("config", "show", "--json", "--config", str(cfg))
    assert r.returncode == 0 and r.stderr == ""
    cfg.write_bytes(b"[server]\nhost = '\xff'\n")
    r = run_cli("config", "show", "--config", str(cfg))
    assert r.returncode == 1 and r.stderr.strip() == f"error: cannot read configuration {cfg}: not UTF-8 text (byte 17)"
