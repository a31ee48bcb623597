"""deploy/: the compose file, the Kubernetes manifests, the HAProxy config and the Dockerfile are
checked by their own formats' validators (offline: compose-spec, kubernetes-validate's bundled
schemas, `haproxy -c`), and against what codemoat promises (secrets as files, non-root, probes on
routes that exist and answer without a token)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import httpx
import pytest
import yaml

from conftest import ROOT, run_cli

DEPLOY = ROOT / "deploy"


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # resolves the x-replica anchor


def test_compose_file_is_valid_compose():
    compose_spec = pytest.importorskip("compose_spec")
    c = compose_spec.PyCompose.from_json(json.dumps(_compose()))
    for name in ("postgres", "replica1", "replica2", "haproxy", "keyserver", "index"):
        assert c.get_service(name) is not None, name


def test_compose_validator_refuses_a_mistake():
    """The validator is not a rubber stamp: a misspelt key is refused."""
    compose_spec = pytest.importorskip("compose_spec")
    bad = _compose()
    bad["services"]["replica1"]["enviroment"] = {"X": "1"}
    with pytest.raises(ValueError, match="enviroment"):
        compose_spec.PyCompose.from_json(json.dumps(bad))


def test_compose_keeps_secrets_in_files():
    d = _compose()
    for name, svc in d["services"].items():
        for k, v in (svc.get("environment") or {}).items():
            assert not re.search(r"://[^/@]*:[^/@]*@", str(v)), f"{name}: {k} holds credentials"
            assert "PASSWORD" not in k or k.endswith("_FILE"), f"{name}: {k} should be a *_FILE secret"
    for name in ("replica1", "replica2"):
        svc = d["services"][name]
        assert svc["environment"]["CODEMOAT_DATABASE_URL_FILE"].startswith("/run/secrets/")
        assert any((s if isinstance(s, str) else s["source"]) == "license" for s in svc["secrets"])
        assert svc["read_only"] is True and "ALL" in svc["cap_drop"]
    assert all("file" in s for s in d["secrets"].values())


def test_compose_replicas_trust_x_forwarded_for_from_haproxy_only():
    """deploy/haproxy.cfg appends each editor's address; the replicas believe it from HAProxy's fixed
    address and from nobody else (tests/deploy/test_replicas.py shows the header at work)."""
    import ipaddress

    d = _compose()
    lb = d["services"]["haproxy"]["networks"]["default"]["ipv4_address"]
    subnet = d["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(lb) in ipaddress.ip_network(subnet)
    for name in ("replica1", "replica2"):
        assert json.loads(d["services"][name]["environment"]["CODEMOAT_SERVER__TRUSTED_PROXIES"]) == [lb], name
    assert "option forwardfor" in (DEPLOY / "haproxy.cfg").read_text()


def _manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "codemoat.yaml").read_text()) if d]


def test_kubernetes_manifests_validate():
    kv = pytest.importorskip("kubernetes_validate")
    kinds = set()
    for d in _manifests():
        kv.validate(d, "1.30", strict=True)
        kinds.add(d["kind"])
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim", "Job", "PodDisruptionBudget"} <= kinds


def test_kubernetes_validator_refuses_a_mistake():
    kv = pytest.importorskip("kubernetes_validate")
    dep = next(d for d in _manifests() if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"bad": 1}
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, "1.30", strict=True)


def test_kubernetes_pods_run_unprivileged_with_probes():
    for d in _manifests():
        if d["kind"] not in ("Deployment", "Job"):
            continue
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert all("secretKeyRef" not in json.dumps(e) for e in c.get("env", []))  # secrets are mounted files
        if d["kind"] == "Deployment":
            c = pod["containers"][0]
            assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
            assert c["readinessProbe"]["httpGet"]["path"] == "/health"


def test_dockerfile_is_multi_stage_non_root_and_portable():
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
    assert len(froms) == 2 and froms[0][1] == "builder"
    build, runtime = text.split("\nFROM ", 2)[1:]
    assert "cmake" in build and "pip install" in build  # llama.cpp compiled in the builder
    assert "cmake" not in runtime and "build-essential" not in runtime
    assert re.search(r"^USER codemoat", runtime, re.M)
    assert "GGML_NATIVE=OFF" in text  # a portable build: the image may run on any x86-64 node


def test_haproxy_config_checks():
    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("HAProxy is not installed here (Debian package `haproxy`; .ci/run installs it)")
    env = dict(
        os.environ,
        CODEMOAT_LB_BIND="127.0.0.1:18080",
        CODEMOAT_LB_STATS="127.0.0.1:18404",
        CODEMOAT_REPLICA1="127.0.0.1:18081",
        CODEMOAT_REPLICA2="127.0.0.1:18082",
    )
    r = subprocess.run([exe, "-c", "-f", str(DEPLOY / "haproxy.cfg")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (DEPLOY / "haproxy.cfg").read_text()
    assert "httpchk GET /health" in text  # readiness (tests/vault/test_seats_replicas.py shows why)
    # a completion is heavy: one that outlives `timeout server` is not run again elsewhere
    retry = re.search(r"^\s*retry-on\s+(.*)$", text, re.M)
    assert retry and "response-timeout" not in retry.group(1) and "all-retryable-errors" not in retry.group(1)


def test_database_url_from_a_secret_file(tmp_path, home, monkeypatch):
    """CODEMOAT_DATABASE_URL_FILE (how compose and Kubernetes hand over the URL) is honoured, and an
    empty or unreadable one is a one-line error."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    f = tmp_path / "database-url"
    f.write_text(url + "\n")
    monkeypatch.setenv("CODEMOAT_DATABASE_URL_FILE", str(f))
    r = run_cli("users", "add", "carol")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "shared.db").exists() and not (home / "codemoat.db").exists()
    f.write_text("")
    r = run_cli("users", "list")
    assert r.returncode == 1 and "is empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    monkeypatch.setenv("CODEMOAT_DATABASE_URL_FILE", str(tmp_path / "missing"))
    r = run_cli("users", "list")
    assert r.returncode == 1 and "cannot read it" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_probe_routes_answer_without_a_token(tiny_gguf, serve_process):
    """The liveness and readiness routes the manifests and HAProxy use exist, need no token, and
    disclose nothing about the model or license."""
    s = serve_process(["--model", str(tiny_gguf)])
    for path in ("/health", "/livez"):
        r = httpx.get(s.url + path, timeout=10)
        assert r.status_code == 200, (path, r.text)
        assert "license" not in r.text and str(tiny_gguf) not in r.text
