"""Settings a person gets wrong, refused when they are read (`config show`, `serve`), in one line: not after the
model has loaded, and never printed as JSON that is not JSON."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.mark.parametrize(
    "var, value, needle",
    [
        ("CODEMOAT_SERVER__MAX_BODY_MB", "inf", "server.max_body_mb"),
        ("CODEMOAT_SERVER__READ_TIMEOUT_S", "nan", "server.read_timeout_s"),
        ("CODEMOAT_MODEL__ANSWER_TIMEOUT_S", "Infinity", "model.answer_timeout_s"),
        ("CODEMOAT_SERVER__LOG_LEVEL", "bogus", "server.log_level"),
    ],
)
def test_a_setting_out_of_its_kind_is_refused_by_config_show_and_serve_before_the_model_loads(var, value, needle, tiny_gguf):
    """Was (an outside tester): `max_body_mb = inf` passed `config show` (which printed `Infinity`, not JSON) and
    killed `serve` with `OverflowError` once its model had loaded; `log_level = bogus` printed "serving" and then
    died with `KeyError: 'bogus'`. Now each is a one-line error naming the setting, from both, before anything
    starts. The negative: a log level in capitals is uvicorn's own name, and finite numbers pass."""
    for args in (("config", "show", "--json"), ("serve", "--model", str(tiny_gguf), "--port", "0")):
        r = run_cli(*args, env={var: value}, timeout=60)
        assert r.returncode != 0, (args, r.stdout[-500:])
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert needle in r.stderr.replace("__", ".").lower() or needle.split(".")[1] in r.stderr, r.stderr
        assert "serving" not in r.stdout, r.stdout
    r = run_cli("config", "show", "--json", env={"CODEMOAT_SERVER__LOG_LEVEL": "WARNING", "CODEMOAT_SERVER__MAX_BODY_MB": "16.5"})
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)  # valid JSON: no Infinity
    flat = json.dumps(shown)
    assert '"warning"' in flat and "16.5" in flat, flat[:500]


def test_the_key_servers_log_level_is_checked_before_it_starts(tmp_path):
    """Was (an outside tester): `keyserver --log-level bogus` printed "key server on http://..." and then died with
    `KeyError: 'bogus'`. Now it is one line before anything starts; a level in capitals is accepted."""
    vendor = tmp_path / "vendor"
    assert run_cli("vendor", "init", "--vendor", str(vendor)).returncode == 0
    r = run_cli("keyserver", "--vendor", str(vendor), "--port", "0", "--log-level", "bogus", timeout=60)
    assert r.returncode == 1 and "--log-level must be one of" in r.stderr and "key server on" not in r.stdout, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
