"""A private PostgreSQL cluster for the tests, from Debian's `postgresql` package.

`PgCluster.start()` runs `initdb` and `pg_ctl` (as the `postgres` user when the tests run as root,
since initdb refuses root) in a temp folder, listening on 127.0.0.1 on a free port with its unix
socket in that folder, password-authenticated (SCRAM). Each test gets a fresh database from
`new_database()`; `stop()` tears the whole cluster down. Nothing here touches a system cluster.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ports import free_port


def pg_bin() -> Path | None:
    """Folder of initdb/pg_ctl/postgres, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "initdb").exists():
            return Path(d)
    return None


class PgCluster:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="codemoat-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.user = "codemoat"
        self.as_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self._n = 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> PgCluster:
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)
        pw = self.root / "pw"
        pw.write_text(self.password + "\n")
        if self.as_root:
            shutil.chown(pw, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--pwfile",
            str(pw),
            "-A",
            "scram-sha-256",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale",
            "C",
        )
        pw.unlink()
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        r = self._run(
            "pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start", check=False
        )
        if r.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {r.stdout}{r.stderr}\n{self.log()}")
        return self

    def log(self) -> str:
        p = self.root / "log"
        return p.read_text(errors="replace") if p.exists() else ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname="postgres", autocommit=True
        ) as c:
            c.execute(sql)

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        self._n += 1
        name = f"t{os.getpid()}_{self._n}_{secrets.token_hex(3)}"
        self.admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def pause(self) -> None:
        """Stop the server (data kept), as an outage would."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)

    def resume(self) -> None:
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        deadline = time.time() + 10
        while (self.data / "postmaster.pid").exists() and time.time() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)
