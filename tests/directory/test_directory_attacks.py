"""An attacker's review of directory sign-in (issue 23): a curious employee, a hostile page, an
on-path proxy, a phisher. Each attack that worked before its fix is named in the docstring of its
test; the rest show that the attack is stopped."""

from __future__ import annotations

import json
import re
import stat
import time

import httpx
import sqlalchemy as sa
import pytest

from codemoat.config import DirectorySettings, Settings
from codemoat.db import open_db
from codemoat.directory.ldap import DirUser
from codemoat.directory.service import DirectoryKeeper
from codemoat.errors import CodemoatError, Unauthorized
from conftest import create_token, run_cli

ISSUER = "http://127.0.0.1:9"  # never contacted: these tests start at the checked ID token's user


@pytest.fixture
def oidc_keeper(home):
    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    cfg = DirectorySettings(
        oidc_issuer=ISSUER,
        oidc_client_id="codemoat",
        oidc_redirect_url="http://127.0.0.1:9/auth/oidc/callback",
        group_map={"it-admins": "admins", "payments-devs": "payments"},
        admin_groups=["admins"],
    )
    yield DirectoryKeeper(Settings(directory=cfg), engine)
    engine.dispose()


def _oidc_user(name: str, sub: str, *groups: str) -> DirUser:
    return DirUser(name, f"oidc:{ISSUER}#{sub}", frozenset(groups))


# -- an OpenID user name is a claim, not an identity ---------------------------------------------
def test_a_second_subject_cannot_take_over_a_user_name(oidc_keeper):
    """Was broken: `preferred_username` is not unique at a provider (and often the user's to
    choose); a second subject calling itself alice got alice's account, groups and a token as her."""
    k = oidc_keeper
    secret, _ = k.issue_token(_oidc_user("alice", "sub-alice", "payments-devs"), None, how="oidc")
    with pytest.raises(Unauthorized, match="belongs to another identity"):
        k.issue_token(_oidc_user("alice", "sub-mallory"), None, how="oidc")
    with pytest.raises(Unauthorized, match="belongs to another identity"):
        k.issue_token(_oidc_user("alice", "sub-mallory", "it-admins"), None, how="oidc-console", console_ttl_s=60)
    p = k.accounts.authenticate(secret)  # alice keeps her token and her groups
    assert p.user == "alice" and "payments" in p.groups and "admins" not in p.groups
    # alice herself (the same subject) signs in again as before
    again, info = k.issue_token(_oidc_user("alice", "sub-alice", "payments-devs"), None, how="device")
    assert k.accounts.authenticate(again).user == "alice" and info["groups"] == ["everyone", "payments"]
    # an admin hands the name over by removing the account (its tokens go with it)
    k.accounts.remove_user("alice")
    new, info = k.issue_token(_oidc_user("alice", "sub-mallory"), None, how="oidc")
    assert k.accounts.authenticate(new).user == "alice" and info["groups"] == ["everyone"]
    with pytest.raises(Unauthorized):
        k.accounts.authenticate(again)
    with pytest.raises(Unauthorized, match="belongs to another identity"):
        k.issue_token(_oidc_user("alice", "sub-alice"), None, how="oidc")


def test_an_openid_sign_in_cannot_take_over_a_hand_made_account(oidc_keeper):
    """Was broken: a provider user naming itself like an account made here (an operator's) was
    given that account, its groups were replaced by the provider's, and a token was minted for it."""
    k = oidc_keeper
    k.accounts.add_user("ops", ["admins"])
    _, ops_token = k.accounts.create_token("ops-laptop", user="ops", scopes=("admin",))
    for how, ttl in (("oidc", None), ("device", None), ("oidc-console", 60.0)):
        with pytest.raises(Unauthorized, match="account made here"):
            k.issue_token(_oidc_user("ops", "sub-x", "it-admins"), None, how=how, console_ttl_s=ttl)
    assert "admins" in k.accounts.groups_of("ops") and k.accounts.authenticate(ops_token).user == "ops"
    assert [t.name for t in k.accounts.list_tokens() if t.user == "ops"] == ["ops-laptop"]


# -- where `codemoat login` keeps the token ---------------------------------------------------------
def _body() -> dict:
    return {"token": "cm_secret-token-value", "user": "alice", "token_id": "t1", "scopes": ["complete"], "expires_at": 1.0}


def test_login_json_is_private_whatever_was_there(home, tmp_path):
    """Was broken: a leftover login.tmp (0644, or a symlink planted in a shared $CODEMOAT_HOME) was
    opened as it was: the token landed in a world-readable file, or in the symlink's target."""
    from codemoat.directory.login_client import save_login

    elsewhere = tmp_path / "attacker-reads-this"
    elsewhere.write_text("")
    elsewhere.chmod(0o644)
    (home / "login.tmp").symlink_to(elsewhere)
    path = save_login("http://127.0.0.1:8080", _body())
    assert elsewhere.read_text() == "" and not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and json.loads(path.read_text())["token"] == _body()["token"]

    for leftover in (home / "login.tmp", path):  # a 0644 leftover, then a 0644 login.json
        leftover.unlink(missing_ok=True)
        leftover.write_text("{}")
        leftover.chmod(0o644)
        assert stat.S_IMODE(save_login("http://127.0.0.1:8080", _body()).stat().st_mode) == 0o600

    path.unlink()
    path.symlink_to(elsewhere)  # login.json itself a symlink: replaced, never written through
    save_login("http://127.0.0.1:8080", _body())
    assert elsewhere.read_text() == "" and not path.is_symlink()
    assert not [p for p in home.iterdir() if p.name.endswith(".tmp") and p.name != "login.tmp"]


# -- the server's address -------------------------------------------------------------------------
@pytest.mark.parametrize("server", ["http://codemoat.example.com", "http://10.1.2.3:8080", "ftp://127.0.0.1"])
def test_codemoat_login_sends_nothing_in_the_clear(home, server, free_port):
    """Was broken: `codemoat login --server http://host` sent the directory password (and took the
    token back) over plain HTTP to any host, readable by anyone on the path."""
    # should the check regress, the request goes to a closed loopback port, never off this machine
    dead = {k: f"http://127.0.0.1:{free_port}" for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")}
    for args, stdin in ((["--user", "alice", "--password-stdin"], "alice-pw\n"), ([], None)):
        r = run_cli("login", "--server", server, *args, input=stdin, env={**dead, "NO_PROXY": "", "no_proxy": ""}, timeout=60)
        assert r.returncode == 1 and "https://" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (home / "login.json").exists()


def test_codemoat_login_may_use_plain_http_on_loopback(free_port):
    from codemoat.directory.login_client import check_server

    for ok in ("https://codemoat.example.com", f"http://127.0.0.1:{free_port}", "http://localhost:1", "http://[::1]:2"):
        check_server(ok)
    for bad in ("http://127.0.0.1.example.com", "http://user:pw@codemoat.example.com", "codemoat.example.com"):
        with pytest.raises(CodemoatError):
            check_server(bad)


# -- guessing a directory password through the server -------------------------------------------------
@pytest.mark.slow
def test_spelling_a_name_differently_does_not_buy_more_guesses(
    tmp_path, dir_settings, tiny_gguf, serve_process, monkeypatch, ldap_config
):
    """Was broken: the throttle counted failures per typed name, but LDAP finds `bob` as ` bob`,
    `bob `, `BOB\\t`, full-width `ｂｏｂ`...: five guesses per spelling, without end. Now the name the
    directory resolved is counted, and checked before the password is tried. Also broken: a password
    with a control character (a tab) was answered 503 "directory unreachable" and not counted. And:
    guesses sent together all passed the check before the first failed (24 at once: 24 guesses)."""
    monkeypatch.setenv("CODEMOAT_CONFIG", ldap_config(0))
    s = serve_process(["--model", str(tiny_gguf)])

    def login(name: str, password: str) -> httpx.Response:
        return httpx.post(s.url + "/auth/login", json={"username": name, "password": password}, timeout=30)

    spellings = ["bob", " bob", "bob ", "BOB\t", "ｂｏｂ", "bob  ", "  Bob"]
    codes = [login(n, f"guess{i}").status_code for i, n in enumerate(spellings)]
    assert codes == [401] * 5 + [429, 429]
    r = login("ＢＯＢ ", "bob-pw-2")  # the right password, yet another spelling
    assert r.status_code == 429 and "Retry-After" in r.headers
    # guesses sent all at once: each is counted before its password is tried, so five get through
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(24) as pool:
        burst = sorted(pool.map(lambda i: login("dave", f"guess{i}").status_code, range(24)))
    assert burst == [401] * 5 + [429] * 19
    # names that find no one are counted as typed; someone else is not locked out by bob's guesser
    assert [login(f"nobody{i} ", "x").status_code for i in range(2)] == [401, 401]
    r = login("alice", "alice-pw-1")
    assert r.status_code == 200 and r.json()["user"] == "alice"
    # an empty or blank password, or a DN typed as the user name, never signs anyone in
    for name, pw in (("alice", " "), ("alice", "\t"), (dir_settings.user_base.replace("ou=", "uid=alice,ou=", 1), "alice-pw-1")):
        r = login(name, pw)
        assert r.status_code == 401, (name, pw, r.text)


# -- what an ID token may say -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "claims, why",
    [
        ({"sub": "s1", "preferred_username": "alice", "groups": "it-admins"}, "not a list"),  # a string, not a list
        ({"sub": "s1", "preferred_username": "alice", "groups": ["it-admins", 7]}, "not a list"),
        ({"sub": "s1", "preferred_username": "alice", "groups": {"it-admins": True}}, "not a list"),
        ({"sub": "s1", "preferred_username": "cn=admin,dc=example,dc=com"}, "not a usable user name"),
        ({"sub": "s1", "preferred_username": "../alice"}, "not a usable user name"),
        ({"sub": "s1", "preferred_username": "alice\nadmin"}, "not a usable user name"),
        # was accepted (`$` matches before a final newline): an account that reads as alice in every page
        ({"sub": "s1", "preferred_username": "alice\n"}, "not a usable user name"),
        ({"sub": "s1", "preferred_username": "ａｌｉｃｅ"}, "not a usable user name"),
        ({"sub": "s1", "preferred_username": ["alice"]}, "not a usable user name"),
    ],
)
def test_an_id_tokens_odd_claims_sign_nobody_in(oidc_keeper, claims, why):
    with pytest.raises(Unauthorized, match=why):
        oidc_keeper.oidc.user_from(claims)


def test_unmapped_and_non_ascii_groups_grant_nothing(oidc_keeper):
    k = oidc_keeper
    groups = ["IT-ADMINS", "it-admins ", "іt-admins", "admins", *[f"g{i}" for i in range(5000)]]  # "і": Cyrillic
    user = k.oidc.user_from({"sub": "s9", "preferred_username": "zed", "groups": groups})
    secret, info = k.issue_token(user, None, how="oidc")
    assert info["groups"] == ["everyone"] and info["scopes"] == ["complete", "chat"]
    with pytest.raises(Unauthorized, match="not in an admin group"):
        k.issue_token(user, None, how="oidc-console", console_ttl_s=60)


# -- an admin the directory demotes ---------------------------------------------------------------------
@pytest.fixture
def ldap_keeper(dir_settings, home):
    from codemoat.audit.log import AuditLog

    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    k = DirectoryKeeper(Settings(directory=dir_settings), engine, audit=AuditLog(engine))
    yield k
    k.directory.close()
    engine.dispose()


def test_an_admin_taken_out_of_the_admin_group_loses_the_admin_scope(ldap_keeper, company):
    """Was broken: the admin scope is minted into a token from the user's groups at sign-in; when the
    directory took bob out of `admins`, the sync removed the group but his 30-day token (and an
    8-hour console session) kept the admin scope."""
    k = ldap_keeper
    k.sync()
    admin_secret, info = k.login("bob", "bob-pw-2")
    assert "admin" in info["scopes"]
    console_secret, _ = k.issue_token(k.directory.find("bob"), None, how="oidc-console", console_ttl_s=3600)
    _, editor_secret = k.accounts.create_token("bob-editor", user="bob", scopes=("complete",))
    alice_secret, _ = k.login("alice", "alice-pw-1")
    company.modify("cn=admins,ou=groups,dc=example,dc=com", {"member": [("MODIFY_REPLACE", [company.people["dave"]])]})
    rep = k.sync()
    assert rep.updated["bob"]["to"] == ["engineering", "web"]
    for secret in (admin_secret, console_secret):
        with pytest.raises(Unauthorized):
            k.accounts.authenticate(secret)
    assert k.accounts.authenticate(editor_secret).user == "bob"  # what he may still do, he keeps
    assert k.accounts.authenticate(alice_secret).user == "alice"
    with k.engine.connect() as c:
        details = [json.loads(d) for (d,) in c.exec_driver_sql("select detail from audit_records where kind = 'directory'")]
    assert {
        "action": "groups",
        "from": ["admins", "engineering", "web"],
        "to": ["engineering", "web"],
        "admin_tokens_revoked": 2,
    } in details
    # signing in again gives him a token without the admin scope
    _, info = k.login("bob", "bob-pw-2")
    assert "admin" not in info["scopes"]


def test_a_sign_in_body_is_small_or_refused_unread(dir_settings, home):
    """Was broken: POST /auth/login, which anyone may call, had the whole server's body limit (8 MiB), and
    FastAPI parsed all of it as JSON on the event loop before any check (about half a second for 8 MiB of
    tiny values, every other request waiting). A sign-in body past 16 KiB is now a 413, never parsed;
    a real one still signs in."""
    from fastapi.testclient import TestClient

    from codemoat.accounts import Accounts
    from codemoat.engines.holder import ModelHolder
    from codemoat.serve.app import create_app

    accounts = Accounts(open_db(f"sqlite:///{home / 'codemoat.db'}"))
    app = create_app(Settings(directory=dir_settings), holder=ModelHolder("m"), accounts=accounts)
    junk = b'{"username": "alice", "password": "x", "junk": [' + b"[]," * 300_000 + b"[]]}"
    with TestClient(app, raise_server_exceptions=False) as c:
        for headers in (
            {"content-type": "application/json"},
            {"content-type": "application/json", "transfer-encoding": "chunked"},
        ):
            body = junk if "transfer-encoding" not in headers else iter([junk[:65536], junk[65536:]])
            r = c.post("/auth/login", content=body, headers=headers)
            assert r.status_code == 413 and "Traceback" not in r.text, (r.status_code, r.text[:200])
        r = c.post("/auth/login", json={"username": "alice", "password": "alice-pw-1"})
        assert r.status_code == 200 and r.json()["user"] == "alice", r.text[:200]
        r = c.post("/auth/login", content=b'{"username": "alice"', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "Traceback" not in r.text, r.text[:200]


def test_a_directory_group_named_admin_is_not_mirrored_into_codemoat_admin(home):
    """Was broken: without a group_map every directory group is mirrored under its own name, and a group
    called `admin` became codemoat's `admin` group, whose members read every indexed repository. Many
    identity providers let any user create a group (Google Groups, GitLab, self-service groups in Entra
    ID): one named `admin` read all the company's code through retrieval. Like `everyone`, `admin` is
    never mirrored (a group_map may still name it: the admin's own choice)."""
    from codemoat.retrieve import can_read

    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    cfg = DirectorySettings(
        oidc_issuer=ISSUER, oidc_client_id="codemoat", oidc_redirect_url="http://127.0.0.1:9/auth/oidc/callback"
    )
    k = DirectoryKeeper(Settings(directory=cfg), engine)
    try:
        user = k.oidc.user_from({"sub": "s7", "preferred_username": "mallory", "groups": ["admin", "web"]})
        _, info = k.issue_token(user, None, how="oidc")
        assert "admin" not in info["groups"] and "web" in info["groups"], info
        assert not can_read(["payments"], info["groups"])  # the repositories of a group mallory is not in
        mapped = DirectoryKeeper(Settings(directory=cfg.model_copy(update={"group_map": {"code-admins": "admin"}})), engine)
        user = mapped.oidc.user_from({"sub": "s8", "preferred_username": "ada", "groups": ["code-admins"]})
        assert mapped.issue_token(user, None, how="oidc")[1]["groups"] == ["admin", "everyone"]
    finally:
        engine.dispose()


def test_a_flood_of_sign_in_starts_is_bounded_per_address_and_in_all(stub_provider, home, free_port):
    """Was broken: GET /auth/oidc/start needs no token and kept one row per call, pruning expired rows
    with a scan of the whole table (0.2 ms per start at 1,000 rows, 1.5 ms at 20,000), so one address
    grew the table and every start's cost without bound. Now one address holds at most
    `oidc_pending_per_address` unfinished sign-ins (429), the server `oidc_pending_max` (503, those
    under way still finish), and expired rows are pruned through an index. Real uvicorn; the client
    addresses are 127.0.0.1-3 (loopback source addresses)."""
    import threading

    import uvicorn

    from codemoat.accounts import Accounts
    from codemoat.directory.oidc import pending
    from codemoat.engines.holder import ModelHolder
    from codemoat.serve.app import create_app

    url, docs = stub_provider.url, stub_provider.docs
    docs["/.well-known/openid-configuration"] = {"issuer": url, "authorization_endpoint": url + "/authorize"}
    cfg = DirectorySettings(
        oidc_issuer=url, oidc_client_id="codemoat", oidc_redirect_url=url + "/cb", oidc_pending_per_address=3, oidc_pending_max=5
    )
    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    app = create_app(Settings(directory=cfg), holder=ModelHolder("m"), accounts=Accounts(engine))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started and t.is_alive():
        time.sleep(0.05)

    def start(source: str, path: str = "/auth/oidc/start") -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as c:
            return c.get(f"http://127.0.0.1:{free_port}{path}")

    def rows() -> int:
        with engine.connect() as c:
            return c.execute(sa.select(sa.func.count()).select_from(pending)).scalar_one()

    try:
        assert [start("127.0.0.1").status_code for _ in range(3)] == [302] * 3
        for _ in range(5):  # the flood from one address: refused in one line, nothing kept
            r = start("127.0.0.1")
            assert r.status_code == 429 and "oidc_pending_per_address" in r.text and "Traceback" not in r.text, r.text
            assert r.headers.get("retry-after")
        r = start("127.0.0.1", "/admin/oidc/start")  # the console's sign-in shares the cap
        assert r.status_code == 429 and "oidc_pending_per_address" in r.text and "Traceback" not in r.text, r.text
        assert rows() == 3
        assert [start("127.0.0.2").status_code for _ in range(2)] == [302] * 2  # another address still starts
        r = start("127.0.0.3")  # the whole server at its cap: 503, and the five under way are kept
        assert r.status_code == 503 and "oidc_pending_max" in r.text and "Traceback" not in r.text, r.text
        assert rows() == 5
        with engine.begin() as c:  # ten minutes later: expired rows are pruned by the next start
            c.execute(pending.update().values(created_at=pending.c.created_at - 601))
        assert start("127.0.0.1").status_code == 302 and rows() == 1
        with engine.connect() as c:  # pruning and counting go through indexes, not a scan of the table
            for sql in ("DELETE FROM oidc_pending WHERE created_at < 0", "SELECT count(*) FROM oidc_pending WHERE client = 'x'"):
                plan = " ".join(str(row[-1]) for row in c.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
                assert "USING" in plan and "INDEX" in plan, (sql, plan)
    finally:
        server.should_exit = True
        t.join(10)
        engine.dispose()


def test_admin_groups_without_a_group_map_is_warned_about_at_start(home, caplog):
    """Was open: `admin_groups` without a `group_map` names the OpenID provider's own groups, and where
    any user may create a group there one named like the admin group gets the admin scope. The setting's
    description and docs push a group_map; serve's start logs one warning line; with a map, none."""
    import logging

    engine = open_db(f"sqlite:///{home / 'codemoat.db'}")
    cfg = DirectorySettings(
        oidc_issuer=ISSUER, oidc_client_id="codemoat", oidc_redirect_url=ISSUER + "/cb", admin_groups=["it-admins"]
    )
    try:
        for group_map, warned in (({}, True), ({"it-admins": "admins"}, False)):
            caplog.clear()
            k = DirectoryKeeper(Settings(directory=cfg.model_copy(update={"group_map": group_map})), engine)
            with caplog.at_level(logging.WARNING, "codemoat.directory"):
                k.start()
            k.stop()
            lines = [r.getMessage() for r in caplog.records if r.name == "codemoat.directory"]
            if warned:
                assert len(lines) == 1 and "directory.group_map" in lines[0] and "\n" not in lines[0], lines
            else:
                assert lines == [], lines
        assert "group_map" in DirectorySettings.model_fields["admin_groups"].description
    finally:
        engine.dispose()


def _cookie_flags(r: httpx.Response, name: str) -> set[str]:
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(name + "="))
    return {p.strip().split("=")[0].lower() for p in cookie.split(";")}


def _sign_in(url: str, admin: str) -> httpx.Response:
    """The console's sign-in form, its POST saying X-Forwarded-Proto: https (as HAProxy behind TLS would)."""
    with httpx.Client(base_url=url) as c:
        form = c.get("/admin/signin")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        tls = {"X-Forwarded-Proto": "https"}
        return c.post("/admin/signin", data={"csrf": csrf, "token": admin}, headers=tls, follow_redirects=False)


def _oidc_start(url: str, path: str) -> httpx.Response:
    return httpx.get(url + path, headers={"X-Forwarded-Proto": "https"}, follow_redirects=False)


def test_a_forwarded_proto_counts_only_from_a_trusted_proxy(serve_process, random_gguf, stub_provider):
    """X-Forwarded-Proto: https marks the console's session cookie and the OpenID sign-in's binding cookies
    `Secure`. Fails before: it was read from any caller (serve/directory.py, console/web.py, console/signin.py),
    so an untrusted peer decided the flag; now only a server.trusted_proxies peer's header counts (uvicorn sets
    the request's scheme from it), as for X-Forwarded-For."""
    admin = create_token("--name", "ops", "--scopes", "admin")
    idp = stub_provider.url
    stub_provider.docs["/.well-known/openid-configuration"] = {"issuer": idp, "authorization_endpoint": idp + "/authorize"}
    oidc = {
        "CODEMOAT_DIRECTORY__OIDC_ISSUER": idp,
        "CODEMOAT_DIRECTORY__OIDC_CLIENT_ID": "codemoat",
        "CODEMOAT_DIRECTORY__OIDC_REDIRECT_URL": idp + "/cb",
    }
    cookies = {"/auth/oidc/start": "codemoat_oidc_api", "/admin/oidc/start": "codemoat_oidc"}
    untrusted = serve_process(["--model", str(random_gguf)], env=oidc)
    r = _sign_in(untrusted.url, admin)
    assert r.status_code == 303 and "secure" not in _cookie_flags(r, "codemoat_session")
    for path, name in cookies.items():
        r = _oidc_start(untrusted.url, path)
        assert r.status_code in (302, 303) and "secure" not in _cookie_flags(r, name), (path, r.headers)
    assert untrusted.stop() == 0

    proxy = serve_process(["--model", str(random_gguf)], env={**oidc, "CODEMOAT_SERVER__TRUSTED_PROXIES": '["127.0.0.1"]'})
    r = _sign_in(proxy.url, admin)
    assert r.status_code == 303 and "secure" in _cookie_flags(r, "codemoat_session")
    for path, name in cookies.items():
        r = _oidc_start(proxy.url, path)
        assert r.status_code in (302, 303) and "secure" in _cookie_flags(r, name), (path, r.headers)
    assert proxy.stop() == 0
