"""A hostile-body sweep of every route of one real `codemoat serve` (on 127.0.0.1, driven by httpx and
raw sockets). The routes come from the running server's own table (its /openapi.json, asked with an
admin token) plus the console's and the hidden admin routes (their routers, read at run time), so a
new route is swept without an edit here. Per route, a seeded, bounded set: each field of the route's
documented body (tests/serve/test_http_fuzz.py's ROUTES) replaced by a wrong type, an extreme number,
a 1 MB string, a lone surrogate or a NUL; bodies that are not JSON, not UTF-8, truncated, not an
object, nested 100,000 deep, with duplicate keys, the wrong Content-Type or over server.max_body_mb;
bodies that stop early; odd Authorization bytes and huge headers. Whatever comes in: no 5xx (but the
documented 503s), the route's protocol's error shape, the server answers a normal request after each
route's batch, and `codemoat audit verify` passes at the end."""

from __future__ import annotations

import json
import random
import re
import socket

import httpx
import pytest

from conftest import ServerProcess, run_cli
from serve.test_http_fuzz import ROUTES

pytestmark = pytest.mark.slow

MB = 1 << 20
BIG = "x" * MB
# what replaces a field's value (json.dumps writes NaN/Infinity literals and \ud800 escapes)
HOSTILE = [
    "1",
    "",
    None,
    True,
    [],
    {},
    [None, {}],
    {"a": {"b": [1]}},
    0,
    -1,
    -(2**63),
    2**70,
    1e308,
    -1e308,
    float("nan"),
    float("inf"),
    3.5,
    "\ud800",
    "a\udfffb",
    "a\x00b",
    "\x00" * 64,
    "tiny\x00",
    "\u202e\ufeff",
    "AKIA" + "QWERTYUIOPASDFGH",  # what the secret screen acts on
    "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----",
    "<|fim_middle|><|endoftext|>",
]
PER_FIELD = 5  # hostile values per field, drawn (seeded) from HOSTILE
# query parameters tried on every GET (the console's filters, the admin API's, and some nobody reads)
QUERY = ["since", "until", "kind", "user", "after_seq", "limit", "before", "fmt", "route", "status", "q", "page"]
# percent-encoded as sent: a NUL, a byte that is not UTF-8, a lone surrogate's UTF-8, a cut escape
QUERY_VALUES = ["-1", "9" * 26, "1e308", "NaN", "%00", "%ff", "%ED%A0%80", "x" * 20000, "%5B%5D", "", "a%2", "-1e308"]
FORM_FIELDS = ["token", "name", "user", "groups", "new", "disabled", "id", "expires_days"]  # the console's forms
# the sign-in routes' bodies (there only with a directory: test_the_sign_in_routes_answer_hostile_requests)
AUTH_BODIES = {
    "/auth/login": {"username": "alice", "password": "alice-pw-1", "name": "laptop"},
    "/auth/device/start": {"name": "laptop"},
    "/auth/device/poll": {"device_code": "x"},
}
DOCUMENTED_503 = {"model_unavailable", "database_unavailable", "overloaded", "engine_unavailable", "lease_expired"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_gguf):
    home = tmp_path_factory.mktemp("sweep-home")
    env = {
        "CODEMOAT_HOME": str(home),
        "CODEMOAT_VAULT__TPM": "off",
        "CODEMOAT_SERVER__MAX_BODY_MB": "2",
        "CODEMOAT_MODEL__MAX_TOKENS_LIMIT": "8",
    }

    def token(*scopes: str) -> str:
        r = run_cli("tokens", "create", "--json", "--name", "sweep-" + "-".join(scopes), "--scopes", ",".join(scopes), env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["token"]

    admin, user = token("complete", "chat", "admin"), token("complete", "chat")
    with pytest.MonkeyPatch.context() as mp:  # the per-test home fixture is function-scoped
        mp.setenv("CODEMOAT_HOME", str(home))
        s = ServerProcess(["--model", str(random_gguf), "--model-id", "tiny"], env=env)
    s.env, s.admin, s.user = env, admin, user
    yield s
    s.stop()


def _routes(server) -> list[tuple[str, str]]:
    """(method, path) of every route: the server's /openapi.json, and the routers that keep out of it."""
    from codemoat.console.routes import router as console
    from codemoat.serve.admin import router as admin

    doc = httpx.get(server.url + "/openapi.json", headers=_auth(server.admin), timeout=30).json()
    found = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    for r in _walk(console, admin):
        found |= {(m, r.path) for m in getattr(r, "methods", ()) or () if m != "HEAD"}
    return sorted(found)


def _walk(*routers):
    """The routes of `routers` and of the routers they include (FastAPI 0.163 keeps those as one entry)."""
    for router in routers:
        for r in router.routes:
            inner = getattr(r, "original_router", None)
            yield from _walk(inner) if inner is not None else [r]


def _auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _leaves(doc, path=()):
    """Every path into `doc`, containers included: ("messages", 0, "content")."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield (*path, k)
        yield from _leaves(v, (*path, k))


def _replaced(doc, path, value):
    doc = json.loads(json.dumps(doc))
    d = doc
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return doc


def _bodies(route: str, rng: random.Random) -> list[tuple[str, bytes, str]]:
    """(what, body, content type) for a POST route."""
    documented = [body for name, body in sorted(ROUTES.items()) if name.split("#")[0] == route]  # OpenAI's and Tabby's
    documented = documented or [AUTH_BODIES[route]] if route in AUTH_BODIES else documented
    return [case for valid in documented or [{"model": "tiny", "name": "x"}] for case in hostile_bodies(valid, rng)]


def hostile_bodies(valid: dict, rng: random.Random, over_limit: int = 2 * MB) -> list[tuple[str, bytes, str]]:
    """(what, body, content type): `valid` with each field made hostile in turn, and bodies that are not it at all."""
    text = json.dumps(valid).encode()
    out = []
    for path in _leaves(valid):
        for v in rng.sample(HOSTILE, PER_FIELD):
            out.append((f"{path}={v!r}"[:80], json.dumps(_replaced(valid, path, v), allow_nan=True).encode(), "application/json"))
    first_text = next((p for p in _leaves(valid) if isinstance(_get(valid, p), str)), None)
    if first_text:
        out.append((f"{first_text}=1MB", json.dumps(_replaced(valid, first_text, BIG)).encode(), "application/json"))
    first_key = next(iter(valid))
    raw = [
        ("empty", b""),
        ("not utf-8", b"\xff\xfe{\x00}"),
        ("not utf-8 in a string", text.replace(b'"tiny"', b'"ti\xffny"').replace(b'"def f("', b'"def\xc3("')),
        ("truncated", text[: len(text) // 2]),
        ("array", b"[]"),
        ("number", b"1"),
        ("string", b'"s"'),
        ("null", b"null"),
        ("deep arrays", b"[" * 100_000 + b"]" * 100_000),
        ("deep objects", b'{"a":' * 20_000 + b"1" + b"}" * 20_000),
        ("duplicate keys", b"{" + json.dumps(first_key).encode() + b": [[], {}]," + text[1:]),
        ("5000 digits", b'{"max_tokens": ' + b"9" * 5000 + b"}"),
        ("NaN at the top", b'{"model": NaN, "n_predict": Infinity, "prompt": -Infinity}'),
        ("a raw NUL", b'{"model": "tiny", "prompt": "a\x00b"}'),
        ("a raw newline in a string", b'{"model": "tiny", "prompt": "a\nb"}'),
        ("over the body limit", b'{"prompt": "' + b"x" * (over_limit + 10) + b'"}'),
    ]
    out += [(w, b, "application/json") for w, b in raw]
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=zz",
        "",
        "application/json; charset=latin-1",
    ]:
        out.append((f"content-type {ct!r}", text, ct))
    return out


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def _check(method: str, path: str, what: str, r: httpx.Response) -> None:
    where = f"{method} {path} [{what}]: {r.status_code} {r.text[:300]!r}"
    assert "Traceback" not in r.text and 'File "' not in r.text, where
    if r.status_code < 400:
        _check_stream(path, where, r)
        return
    if (path == "/admin" or path.startswith("/admin/")) and not path.startswith("/admin/api/"):  # the console: HTML pages
        assert r.status_code < 500, where
        return
    assert r.headers.get("content-type", "").startswith("application/json"), where
    err = r.json()["error"]
    if path.startswith("/api/") or path in ("/v1/health", "/v1/events"):  # Ollama's, Tabby's: a string
        assert isinstance(err, str) and err, where
    elif path == "/infill":  # llama.cpp's server
        assert isinstance(err, dict) and err["code"] == r.status_code and err["message"] and err["type"], where
    elif path.startswith("/v1/"):  # OpenAI's (/v1/completions answers a Tabby body in Tabby's)
        ok = isinstance(err, dict) and err["message"] and err["type"] and {"param", "code"} <= err.keys()
        assert ok or (path == "/v1/completions" and isinstance(err, str)), where
        code = err.get("code") if isinstance(err, dict) else None
        assert r.status_code < 500 or (r.status_code == 503 and code in DOCUMENTED_503), where
        return
    else:
        assert isinstance(err, str) and err, where
    assert r.status_code < 500, where


def _check_stream(path: str, where: str, r: httpx.Response) -> None:
    """A streamed answer: every event is JSON, and an error inside it has the protocol's shape."""
    ct = r.headers.get("content-type", "")
    if "event-stream" in ct:
        events = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        events = [json.loads(e) for e in events if e != "[DONE]"]
    elif "ndjson" in ct:
        events = [json.loads(line) for line in r.text.splitlines() if line.strip()]
    else:
        return
    assert events or path.startswith("/admin/"), where  # an export of no records is empty
    for e in events:
        if "error" in e:
            err = e["error"]
            assert isinstance(err, str) if path.startswith("/api/") else isinstance(err, (dict, str)), where


def _issued(c: httpx.Client, server) -> str:
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "def f(", "max_tokens": 2}, headers=_auth(server.admin))
    return r.headers["x-codemoat-completion-id"]


def _still_up(server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "def f(", "max_tokens": 2}, headers=_auth(server.user))
        assert r.status_code == 200 and r.json()["choices"], r.text[:300]


def _console_session(c: httpx.Client, server) -> str:
    """Sign `c` in to the console as the admin; the session's CSRF token."""
    page = c.get("/admin/signin").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = c.post("/admin/signin", data={"csrf": csrf, "token": server.admin}, headers={"Origin": server.url})
    assert r.status_code == 303, r.text[:300]
    return re.search(r'name="csrf" value="([^"]+)"', c.get("/admin/people").text).group(1)


def test_every_route_answers_hostile_requests_in_its_own_shape(server):
    routes = _routes(server)
    assert ("POST", "/v1/completions") in routes and ("GET", "/admin/people") in routes  # the table was read
    with httpx.Client(base_url=server.url, timeout=120) as c, httpx.Client(base_url=server.url, timeout=120) as console:
        csrf = _console_session(console, server)
        seen = 0
        for method, template in routes:
            if template == "/admin/signout":
                continue  # it ends the console session the sweep uses; swept last below
            seen = sweep_route(c, console, csrf, server, method, template, routes, seen)
        _sweep_console(console, "POST", "/admin/signout", csrf, random.Random(0))
    _still_up(server)
    r = run_cli("audit", "verify", "--json", env=server.env)
    assert r.returncode == 0, r.stdout + r.stderr
    _quiet_log(server, "the end", seen)


def sweep_route(c: httpx.Client, console: httpx.Client, csrf: str, server, method: str, template: str, routes, seen: int) -> int:
    """One route's hostile set (bodies or query strings, callers, headers), then the server still serves
    and logged no traceback; the log's length now."""
    path = re.sub(r"\{[^}]+\}", "x", template)
    rng = random.Random(f"{method} {path}")
    if path.startswith("/admin/") and not path.startswith("/admin/api/"):
        _sweep_console(console, method, path, csrf, rng)
    elif method == "GET":
        for q in rng.sample(QUERY, 4):
            for v in rng.sample(QUERY_VALUES, 4):
                _check(method, path, f"?{q}={v[:20]}", c.get(f"{path}?{q}={v}", headers=_auth(server.admin)))
    else:
        cases = _bodies(path, rng)
        if path == "/v1/events":  # also about a completion this caller really had: deeper than an unknown id
            cases += hostile_bodies({**ROUTES[path], "completion_id": _issued(c, server)}, rng)
        for what, body, ct in cases:
            h = {**_auth(server.admin), **({"Content-Type": ct} if ct else {})}
            _check(method, path, what, c.request(method, path, content=body, headers=h))
    _callers(c, server, method, template, routes)
    _headers(server, method, path)
    _still_up(server)
    return _quiet_log(server, f"{method} {path}", seen)


def _callers(c: httpx.Client, server, method: str, template: str, routes: list) -> None:
    """The route's own body from a caller without the scope, without a token, with a wrong one; a method
    it does not take; hostile path parameters."""
    path = re.sub(r"\{[^}]+\}", "x", template)
    body = json.dumps(ROUTES.get(path) or ROUTES.get(path + "#tabby") or {}).encode()
    for who in [_auth(server.user), {}, {"Authorization": "Bearer cm_wrong"}, {"Authorization": "Basic Og=="}]:
        r = c.request(method, path, content=body if method == "POST" else None, headers=who)
        _check(method, path, f"caller {list(who.values())[:1]}", r)
    for other in sorted({"GET", "POST", "PUT", "DELETE", "PATCH"} - {m for m, t in routes if t == template})[:2]:
        _check(other, path, "a method it does not take", c.request(other, path, headers=_auth(server.admin)))
    if "{" in template:
        for v in ["..%2f..%2fetc%2fpasswd", "%00", "%ff%fe", "a" * 5000, "%ED%A0%80", "tiny%0d%0aX-A:%20b"]:
            p = re.sub(r"\{[^}]+\}", v, template)
            _check(method, path, f"path {v[:20]}", c.request(method, p, headers=_auth(server.admin)))


def test_a_failed_swap_of_a_huge_path_writes_a_bounded_audit_record(server):
    """The swap route recorded the caller's model path whole: a megabyte of audit log per failed swap."""
    h = _auth(server.admin)
    r = httpx.post(server.url + "/admin/api/model/swap", json={"model": "x" * MB}, headers=h, timeout=60)
    assert r.status_code == 400, r.text[:300]
    recs = httpx.get(server.url + "/admin/api/audit?kind=update&limit=1", headers=h, timeout=60).json()["records"]
    assert recs[0]["route"] == "update swap_failed" and len(json.dumps(recs[0])) < 5000, len(json.dumps(recs[0]))


def _quiet_log(server, where: str, seen: int) -> int:
    """No traceback nor internal error in the server's log since `seen` (a stream that failed after its
    200, an error no answer showed, a client gone mid-body); the log's length now."""
    log = server.output()
    new = log[seen:]
    assert "Traceback" not in new and "internal error" not in new, (where, new[-3000:])
    return len(log)


def _sweep_console(c: httpx.Client, method: str, path: str, csrf: str, rng: random.Random) -> None:
    h = {"Origin": str(c.base_url).rstrip("/")}
    if method == "GET":
        for q in rng.sample(QUERY, 4):
            for v in rng.sample(QUERY_VALUES, 3):
                _check(method, path, f"?{q}={v[:20]}", c.get(f"{path}?{q}={v}", headers=h))
        return
    form = {**h, "Content-Type": "application/x-www-form-urlencoded"}
    for f in FORM_FIELDS:
        for v in rng.sample(QUERY_VALUES, 2):
            _check(method, path, f"{f}={v[:20]}", c.post(path, content=f"csrf={csrf}&{f}={v}".encode(), headers=form))
    for what, raw in [
        ("not utf-8", b"csrf=" + csrf.encode() + b"&name=\xff\xfe"),
        ("bad percent", b"csrf=" + csrf.encode() + b"&name=%ff%fe%"),
        ("many fields", b"&".join(b"f%d=1" % i for i in range(5000))),
        ("json", json.dumps({"csrf": csrf, "name": [1]}).encode()),
    ]:
        _check(
            method,
            path,
            what,
            c.post(path, content=raw, headers={**form, **({"Content-Type": "application/json"} if what == "json" else {})}),
        )


def _headers(server, method: str, path: str) -> None:
    """Odd Authorization bytes, a huge header, and bodies that stop early, over a raw socket."""
    body = b'{"model": "tiny", "prompt": "x"}'
    cases = [
        [b"Authorization: Bearer \xff\xfe\x80", b"Content-Length: %d" % len(body)],
        [b"Authorization: Bearer cm_\x01\x7f", b"Content-Length: %d" % len(body)],
        [b"Authorization: Basic " + b"\xc3" * 3000, b"Content-Length: %d" % len(body)],
        [b"Authorization: Bearer " + server.admin.encode(), b"X-Huge: " + b"a" * 200_000, b"Content-Length: %d" % len(body)],
        [b"Authorization: Bearer " + server.admin.encode(), b"Authorization: Bearer cm_other", b"Content-Length: %d" % len(body)],
        [b"x-api-key: \xff\x00", b"Content-Length: %d" % len(body)],
        [b"Cookie: codemoat_session=\xff\xfe; codemoat_signin=%00" + b"; a=b" * 2000, b"Content-Length: %d" % len(body)],
        [b"Origin: http://\xff", b"X-Forwarded-Proto: \xc3", b"Host: x", b"Content-Length: %d" % len(body)],
        [b"Authorization: Bearer " + server.admin.encode(), b"Content-Length: 5, 5", b"Content-Encoding: gzip"],
    ]
    for extra in cases:
        status, text = raw_request(server.port, method, path, extra, body)
        assert status != -1 and (status is None or status < 500 or status == 503), (path, extra[0][:40], status, text[:300])
        assert b"Traceback" not in text, text[:300]
    # the body stops early: a Content-Length not met, a chunked body without its last chunk
    for extra, sent in [
        ([b"Content-Length: 1000"], body),
        ([b"Transfer-Encoding: chunked"], b"10\r\n" + body[:16] + b"\r\n"),
        ([b"Transfer-Encoding: chunked"], b"zz\r\n"),
    ]:
        status, text = raw_request(
            server.port, method, path, [b"Authorization: Bearer " + server.admin.encode(), *extra], sent, half=True
        )
        assert status != -1 and (status is None or status < 500), (path, extra, status, text[:300])


def raw_request(
    port: int, method: str, path: str, headers: list[bytes], body: bytes, half: bool = False
) -> tuple[int | None, bytes]:
    """Send a request as raw bytes; (status, or None when the server closed without one, -1 when it hung; what came back)."""
    head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n" % (method.encode(), path.encode(), port)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + b"\r\n".join(headers) + b"\r\nConnection: close\r\n\r\n" + body)
        if half:
            s.shutdown(socket.SHUT_WR)  # the client goes away mid-body
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            return -1, data  # a hang
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return (int(m.group(1)) if m else None), data


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def directory_server(request, tmp_path_factory, random_gguf):
    """`codemoat serve` with a real company directory (slapd) and a real OpenID provider (oidc-provider
    under Node, device flow on): the /auth/* routes exist only then. On SQLite, then on PostgreSQL
    (which refuses a NUL in any text the routes might put in a query)."""
    pytest.importorskip("ldap3", reason="ldap3 is not installed (the `directory` extra)")
    from directory.oidcstack import start_stack
    from directory.slapd import BASE, SERVICE, Slapd, slapd_bin

    if slapd_bin() is None:
        pytest.skip("OpenLDAP is not installed here (Debian package `slapd`)")
    folder = tmp_path_factory.mktemp("sweep-directory")
    db = {}
    if request.param == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        db = {"CODEMOAT_DATABASE_URL": cluster.new_database()}
    ldap = Slapd(slapd_bin()).start()
    try:
        ldap.group("payments-devs", [ldap.user("alice", "alice-pw-1")])
        pw = folder / "ldap-pw"
        pw.write_text(ldap.service_pw)
        pw.chmod(0o600)
        (folder / "tiny.gguf").symlink_to(random_gguf)
        extra = (
            f'ldap_url = "{ldap.url}"\nbind_dn = "{SERVICE}"\nbind_password_file = "{pw}"\n'
            f'user_base = "ou=people,{BASE}"\ngroup_base = "ou=groups,{BASE}"\ntimeout_s = 3\n'
            "[server]\nmax_body_mb = 2\n[model]\nmax_tokens_limit = 8\n"
        )
        stack = start_stack(folder, folder / "tiny.gguf", {"eve": {"groups": []}}, extra_config=extra, env=db)
    except BaseException:
        ldap.stop()
        raise
    env = {"CODEMOAT_HOME": str(stack.home), "CODEMOAT_VAULT__TPM": "off", "CODEMOAT_CONFIG": str(folder / "codemoat.toml"), **db}

    def token(*scopes: str) -> str:
        r = run_cli("tokens", "create", "--json", "--name", "sweep-" + "-".join(scopes), "--scopes", ",".join(scopes), env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["token"]

    class Served:  # what the sweep's helpers read of a server
        url, port = stack.url, int(stack.url.rsplit(":", 1)[1])
        admin, user = token("complete", "chat", "admin"), token("complete", "chat")

        @staticmethod
        def output() -> str:
            return (folder / "serve.log").read_text(errors="replace")

    Served.env = env
    yield Served
    stack.stop()
    ldap.stop()


def test_the_sign_in_routes_answer_hostile_requests(directory_server):
    """The /auth/* routes (directory password sign-in, OpenID Connect browser sign-in, the device grant)
    through the same hostile set as every other route, plus what only they take: callback query fields
    (state, code, error) and a real pending device code and sign-in state with hostile company."""
    server = directory_server
    routes = _routes(server)
    auth = [(m, t) for m, t in routes if t.startswith(("/auth/", "/admin/oidc/"))]  # the console's OIDC sign-in too
    assert {t for _, t in auth} == {
        "/auth/login",
        "/auth/oidc/start",
        "/auth/oidc/callback",
        "/auth/device/start",
        "/auth/device/poll",
        "/admin/oidc/start",
        "/admin/oidc/callback",
    }
    with httpx.Client(base_url=server.url, timeout=120) as c:
        states = {}  # real pending sign-ins, taken before the sweep reaches the per-address bound
        for where in ("/auth/oidc", "/admin/oidc"):
            start = c.get(where + "/start")
            assert start.status_code in (302, 303), start.text[:300]
            states[where] = re.search(r"[?&]state=([^&]+)", start.headers["location"]).group(1)
        device = c.post("/auth/device/start", json={"name": "laptop"}).json()["device_code"]
        seen = 0
        for method, template in auth:
            seen = sweep_route(c, c, "", server, method, template, routes, seen)
        rng = random.Random("auth")
        for where, state in states.items():  # each state with hostile codes, and hostile states
            for field in ("state", "code", "error"):
                for v in QUERY_VALUES:
                    q = {"state": state, "code": "c", field: None}
                    query = "&".join(f"{k}={x}" for k, x in q.items() if x is not None) + f"&{field}={v}"
                    _check("GET", where + "/callback", f"{field}={v[:20]}", c.get(f"{where}/callback?{query}"))
        for what, body, ct in hostile_bodies({"device_code": device, "grant_type": "device_code"}, rng):
            r = c.post("/auth/device/poll", content=body, headers={"Content-Type": ct} if ct else {})
            _check("POST", "/auth/device/poll", what, r)
        for v in QUERY_VALUES:  # form-encoded, as RFC 8628 clients send it
            r = c.post(
                "/auth/device/poll",
                content=f"device_code={v}&name={v}".encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            _check("POST", "/auth/device/poll", f"form {v[:20]}", r)
        _still_up(server)
        _quiet_log(server, "the sign-in routes' own fields", seen)
    r = run_cli("audit", "verify", "--json", env=server.env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_forged_forwarded_for_does_not_dodge_the_device_code_bound(directory_server):
    """Unfinished device codes are bounded per client address (directory.oidc_pending_per_address, 50).
    X-Forwarded-For from a peer not in server.trusted_proxies is not believed, so a caller who has reached
    the bound does not get more by naming other addresses. Fails before (uvicorn believed it from
    127.0.0.1): each made-up address got a fresh code."""
    with httpx.Client(base_url=directory_server.url, timeout=60) as c:
        for _ in range(60):  # the sweep may have reached the bound already
            r = c.post("/auth/device/start", json={})
            if r.status_code == 429:
                break
            assert r.status_code == 200, r.text[:300]
        assert r.status_code == 429 and r.json()["error"] == "slow_down", r.text[:300]
        for i in range(3):
            r = c.post("/auth/device/start", json={}, headers={"X-Forwarded-For": f"198.51.100.{i + 1}"})
            assert r.status_code == 429 and r.json()["error"] == "slow_down", r.text[:300]
