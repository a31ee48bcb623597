"""A throw-away OpenLDAP server (Debian's `slapd`) on a free loopback port, seeded for the tests.

`Slapd.start()` writes a slapd.conf (core, cosine, inetorgperson schemas; one mdb database under
dc=example,dc=com) in a temp folder and runs `slapd -d 0` on ldap://127.0.0.1:PORT; `add`,
`modify` and `delete` change the directory as an administrator would. Nothing touches a system
slapd.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ports import free_port

BASE = "dc=example,dc=com"
ADMIN = f"cn=admin,{BASE}"
SERVICE = f"cn=codemoat,ou=services,{BASE}"


def slapd_bin() -> str | None:
    for p in (shutil.which("slapd"), "/usr/sbin/slapd"):
        if p and Path(p).exists():
            return p
    return None


class Slapd:
    def __init__(self, exe: str):
        self.exe = exe
        self.root = Path(tempfile.mkdtemp(prefix="codemoat-slapd-"))
        self.port = free_port()
        self.admin_pw = "admin-" + self.root.name[-6:]
        self.service_pw = "svc-" + self.root.name[-6:]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def start(self) -> Slapd:
        (self.root / "db").mkdir()
        conf = self.root / "slapd.conf"
        conf.write_text(f"""
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
pidfile {self.root}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
sizelimit unlimited
database mdb
maxsize 1073741824
suffix "{BASE}"
rootdn "{ADMIN}"
rootpw {self.admin_pw}
directory {self.root}/db
index objectClass,uid,member eq
access to attrs=userPassword by self =xw by anonymous auth by * none
access to * by dn.exact="{SERVICE}" read by self read by * none
""")
        self._spawn()
        self.seed_base()
        return self

    def restart(self) -> Slapd:
        """Start it again on the same port and data, after `stop` (the directory came back)."""
        self._spawn()
        return self

    def _spawn(self) -> None:
        conf = self.root / "slapd.conf"
        self.proc = subprocess.Popen(
            [self.exe, "-f", str(conf), "-h", self.url + "/", "-d", "0"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "slapd.log", "w"),
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("slapd exited: " + (self.root / "slapd.log").read_text())
            try:
                self.admin().unbind()
                break
            except Exception:
                time.sleep(0.1)
        else:
            raise RuntimeError("slapd did not start: " + (self.root / "slapd.log").read_text())

    def admin(self):
        import ldap3

        return ldap3.Connection(
            ldap3.Server(self.url, get_info=ldap3.NONE), ADMIN, self.admin_pw, auto_bind=True, raise_exceptions=True
        )

    def add(self, dn: str, classes: list[str], attrs: dict) -> None:
        c = self.admin()
        c.add(dn, classes, attrs)
        c.unbind()

    def modify(self, dn: str, changes: dict) -> None:
        c = self.admin()
        c.modify(dn, changes)
        c.unbind()

    def delete(self, dn: str) -> None:
        c = self.admin()
        c.delete(dn)
        c.unbind()

    def seed_base(self) -> None:
        self.add(BASE, ["dcObject", "organization"], {"o": "Example", "dc": "example"})
        for ou in ("people", "groups", "services"):
            self.add(f"ou={ou},{BASE}", ["organizationalUnit"], {"ou": ou})
        self.add(
            SERVICE, ["person", "simpleSecurityObject"], {"cn": "codemoat", "sn": "service", "userPassword": self.service_pw}
        )

    def user(self, uid: str, password: str, **extra) -> str:
        dn = f"uid={uid},ou=people,{BASE}"
        self.add(dn, ["inetOrgPerson"], {"uid": uid, "cn": uid, "sn": uid, "userPassword": password, **extra})
        return dn

    def group(self, cn: str, members: list[str]) -> str:
        dn = f"cn={cn},ou=groups,{BASE}"
        self.add(dn, ["groupOfNames"], {"cn": cn, "member": members})
        return dn

    def stop(self, keep: bool = False) -> None:
        """Stop slapd; its data is removed unless `keep` (then `restart` brings the same directory back)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
