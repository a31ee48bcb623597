"""Directory at company size: LDAP sign-in latency and `codemoat directory sync` time against a real
OpenLDAP (the tests' throw-away slapd) seeded with `--users` users in `--groups` groups (a quarter of
the groups nested inside others), full sync from empty, a sync with nothing to do, and an incremental
sync after 10 changes in the directory. Each sync is the real CLI (`codemoat directory sync --json`).
Sign-in, side by side in one run: the way it was (one service connection behind a lock, a fresh
connection per password check, every group read to follow nesting) against the pooled directory
(`ldap_pool_size` connections per pool, password checks re-binding a pooled connection, only the
groups above the user read), one at a time and from 8 threads at once.

    .venv/bin/python bench/directory.py [--users 10000] [--groups 500]

Writes bench/results/directory.md. Targets (issue 23): full sync ≤ 30 s, incremental sync of 10
changes ≤ 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_in_place  # bench/ is the script's folder: other sections of the file stay

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "directory"))
from slapd import BASE, SERVICE, Slapd, slapd_bin  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "directory.md"
CODEMOAT = [sys.executable, "-m", "codemoat.cli.main"]


def seed(ldap: Slapd, n_users: int, n_groups: int) -> list[str]:
    """Users u00000… and groups g000…: every user in 3 groups; groups past 3/4 hold other groups."""
    import ldap3

    conn = ldap.admin()
    dns = []
    for i in range(n_users):
        dn = f"uid=u{i:05d},ou=people,{BASE}"
        conn.add(dn, ["inetOrgPerson"], {"uid": f"u{i:05d}", "cn": f"u{i}", "sn": "x", "userPassword": f"pw{i}"})
        dns.append(dn)
    flat = int(n_groups * 0.75)
    members: dict[int, list[str]] = {g: [] for g in range(n_groups)}
    for i, dn in enumerate(dns):
        for k in range(3):
            members[(i * 7 + k * 131) % flat].append(dn)
    for g in range(flat, n_groups):  # nested: each holds two flat groups
        members[g] = [f"cn=g{(g * 3) % flat:03d},ou=groups,{BASE}", f"cn=g{(g * 5 + 1) % flat:03d},ou=groups,{BASE}"]
    for g in range(n_groups):
        conn.add(f"cn=g{g:03d},ou=groups,{BASE}", ["groupOfNames"], {"cn": f"g{g:03d}", "member": members[g] or [dns[0]]})
    conn.unbind()
    del ldap3
    return dns


def _before(cfg):
    """The sign-in path as it was before pooling, rebuilt from the same class for a side-by-side run."""
    from codemoat.directory import LdapDirectory

    class Before(LdapDirectory):
        def check_password(self, dn: str, password: str) -> None:
            self._bind(dn, password).unbind()  # a fresh connection (TCP + bind) per sign-in

        def _groups_of(self, dn: str) -> frozenset[str]:
            return frozenset(self._closure(self._all_groups()).get(dn.lower(), set()))  # every group, each time

    d = Before(cfg.model_copy(update={"ldap_pool_size": 1}))  # one service connection, one search at a time
    d.service_pool._wait_s = 3600  # ...behind a lock that waited as long as it took
    return d


def _signins(d, users: list[int], threads: int) -> tuple[list[float], float]:
    """Each sign-in's latency, and the wall time for all of them."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> float:
        t = time.perf_counter()
        d.authenticate(f"u{i:05d}", f"pw{i}")
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        lat = list(ex.map(one, users))
    return lat, time.perf_counter() - t0


def _row(what: str, lat: list[float], wall: float) -> str:
    q = statistics.quantiles(lat, n=20)
    return f"| {what} | {statistics.median(lat) * 1000:.0f} ms | {q[18] * 1000:.0f} ms | {len(lat) / wall:.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--groups", type=int, default=500)
    args = ap.parse_args()
    exe = slapd_bin()
    if exe is None:
        raise SystemExit("bench/directory.py needs Debian's slapd")
    scratch = Path(tempfile.mkdtemp(prefix="codemoat-dirbench-"))
    os.environ["CODEMOAT_HOME"] = str(scratch / "home")
    ldap = Slapd(exe).start()
    try:
        t0 = time.perf_counter()
        dns = seed(ldap, args.users, args.groups)
        seeded = time.perf_counter() - t0
        pw = scratch / "pw"
        pw.write_text(ldap.service_pw)
        cfg = scratch / "codemoat.toml"
        group_map = "".join(f'"g{g:03d}" = "team-{g:03d}"\n' for g in range(args.groups))
        cfg.write_text(f"""[directory]
ldap_url = "{ldap.url}"
bind_dn = "{SERVICE}"
bind_password_file = "{pw}"
user_base = "ou=people,{BASE}"
group_base = "ou=groups,{BASE}"
disabled_filter = "(employeeType=disabled)"
sync_interval_s = 0
[directory.group_map]
{group_map}""")
        env = dict(os.environ, CODEMOAT_CONFIG=str(cfg))

        def sync() -> tuple[float, dict]:
            t = time.perf_counter()
            r = subprocess.run([*CODEMOAT, "directory", "sync", "--json"], capture_output=True, text=True, env=env, check=True)
            return time.perf_counter() - t, json.loads(r.stdout)

        full_s, full = sync()
        idle_s, idle = sync()
        # ten changes: 4 users leave, 3 are disabled, 3 join a group
        for dn in dns[:4]:
            ldap.delete(dn)
        for dn in dns[4:7]:
            ldap.modify(dn, {"employeeType": [("MODIFY_REPLACE", ["disabled"])]})
        for i, dn in enumerate(dns[7:10]):
            ldap.modify(f"cn=g{i:03d},ou=groups,{BASE}", {"member": [("MODIFY_ADD", [dn])]})
        inc_s, inc = sync()

        # sign-in latency: the directory checks the password (search, user bind, groups)
        from codemoat.config import load_settings
        from codemoat.directory import LdapDirectory

        os.environ["CODEMOAT_CONFIG"] = str(cfg)
        dcfg = load_settings().directory
        rows = []
        for label, d in (("before", _before(dcfg)), (f"pooled ({dcfg.ldap_pool_size})", LdapDirectory(dcfg))):
            d.authenticate("u00020", "pw20")  # warm: the first connections opened
            rows.append(_row(f"{label}, one at a time, 30 sign-ins", *_signins(d, list(range(20, 50)), 1)))
            rows.append(_row(f"{label}, 8 threads, 80 sign-ins", *_signins(d, list(range(100, 180)), 8)))
            d.close()
    finally:
        ldap.stop()

    lines = [
        "# Directory at company size: LDAP sync and sign-in",
        "",
        f"`.venv/bin/python bench/directory.py --users {args.users} --groups {args.groups}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (load average {os.getloadavg()[0]:.1f} at the end).",
        f"OpenLDAP 2.5 (Debian slapd, mdb, on this machine), {args.users:,} users each in 3 groups, {args.groups} groups of which a quarter",
        f"hold other groups (nested), every group mapped to a codemoat group; SQLite accounts database. Seeding took {seeded:.0f} s.",
        "Each sync is the real CLI, `codemoat directory sync --json`, so its time includes starting Python (about 1 s here).",
        "",
        "| what | time | changes | target |",
        "|---|---|---|---|",
        f"| full sync from an empty accounts database | {full_s:.1f} s | {full['changes']:,} ({len(full['added']):,} users added) | ≤ 30 s: {'met' if full_s <= 30 else 'NOT met'} |",
        f"| sync with nothing to change | {idle_s:.1f} s | {idle['changes']} | — |",
        f"| incremental: 4 users deleted, 3 disabled, 3 added to a group | {inc_s:.1f} s | {inc['changes']} "
        f"({len(inc['disabled'])} disabled, {len(inc['updated'])} regrouped) | ≤ 2 s: {'met' if inc_s <= 2 else 'NOT met'} |",
        "",
        "A sync reads the whole directory in three paged searches (users, disabled users, groups) and computes nested",
        "memberships in memory.",
        "",
        "LDAP sign-in (`LdapDirectory.authenticate`: find the user, check the password by binding as them, nested groups,",
        "disabled flag), side by side in this run. *Before*: one service connection behind a lock, a fresh connection",
        "per password check, every group read to follow nesting. *Pooled*: `directory.ldap_pool_size` connections per",
        "pool, password checks re-bind a pooled connection, only the groups above the user are read (one search a level).",
        "slapd runs on the same 2 CPUs as the benchmark.",
        "",
        "| sign-ins | p50 | p95 | sign-ins/s |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    write_in_place(RESULTS, "\n".join(lines))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
