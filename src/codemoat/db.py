"""Shared state through SQLAlchemy Core, migrated with Alembic.

Each package that owns tables keeps its own Alembic branch in `<package>/migrations/`
(a revision with `branch_labels = ("<package>",)` and `down_revision = None` starts it);
`open_db` upgrades every branch to its head, so packages never edit each other's chains.
The same code runs on SQLite (WAL, the default) and PostgreSQL (psycopg 3).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, TextClause, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from . import paths

# Packages whose migrations run against the customer database, in no particular order.
CUSTOMER_BRANCHES = ("accounts", "audit", "index_meta", "usage", "console", "directory")
_lock = threading.Lock()
# pg_advisory_xact_lock key held while migrating (any fixed 64-bit number; b"cm-migr" as an integer)
MIGRATION_LOCK = 0x636D2D6D696772
_migrated: set[tuple[str, tuple[str, ...]]] = set()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An SQLAlchemy engine; SQLite files (mode 0600) get WAL and a busy timeout for concurrent writers."""
    if url.startswith("sqlite"):
        db_path = make_url(url).database
        if db_path and db_path != ":memory:" and not db_path.startswith("file:"):
            _sqlite_folder(url, Path(db_path))
            try:  # 0600 before SQLite opens it: its -wal and -shm copy the mode
                paths.private_sqlite(Path(db_path))
            except paths.NotSQLite:
                from .errors import CodemoatError

                raise CodemoatError(
                    f"{db_path} is not a codemoat database, or it is corrupted (not a SQLite file); it was left as it is"
                ) from None
        eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(eng, "connect", _sqlite_pragmas)
        return eng
    # pool_pre_ping: a connection that died with a server restart is replaced, not handed out;
    # connect_timeout: an unreachable server fails a request in seconds, never hangs it
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})


def _sqlite_folder(url: str, db_path: Path) -> None:
    """The folder of an SQLite file must exist: a mistyped database_url (`sqlite:////srv/codmoat/x.db`) is one line
    naming the folder, not a tree of folders made for it. Only the data folder itself, home of the default
    database, is created (`paths.home`: private, checked)."""
    parent = db_path.parent
    if parent.is_dir():
        return
    env = os.environ.get("CODEMOAT_HOME")
    if parent == Path(env or Path.home() / ".codemoat").expanduser():
        paths.home()
        return
    from .errors import CodemoatError

    where = make_url(url).render_as_string(hide_password=True)
    raise CodemoatError(f"database {where}: folder {parent} does not exist (fix the URL, or create the folder first)")


def migration_dirs(packages: tuple[str, ...]) -> list[str]:
    root = Path(__file__).parent
    return [str(root / p / "migrations" / "versions") for p in packages if (root / p / "migrations" / "versions").is_dir()]


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """For an SQLite file, an exclusive flock on `<file>.migrate-lock` while migrating: processes
    starting together (a server and a CLI command on a first run) otherwise race to create the
    same tables ("table alembic_version already exists"). Other backends: nothing."""
    db = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not db or db == ":memory:" or db.startswith("file:"):
        yield
        return
    fd = os.open(f"{db}.migrate-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def upgrade(engine: Engine, packages: tuple[str, ...]) -> None:
    """Run every package's Alembic branch up to its head (idempotent)."""
    from alembic import command
    from alembic.config import Config

    dirs = migration_dirs(packages)
    if not dirs:
        return
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("version_locations", " ".join(dirs))
    cfg.set_main_option("path_separator", "space")
    with _sqlite_file_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Replicas starting together against one database: the first to take this lock
            # migrates, the others wait for it and then find nothing to do. A transaction-level
            # lock, so a replica killed mid-way releases it with its connection.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")


def open_db(url: str | None = None, packages: tuple[str, ...] = CUSTOMER_BRANCHES) -> Engine:
    """Open (and migrate once per process) a database."""
    url = url or paths.db_url()
    engine = _engine_for(url)
    key = (url, packages)
    with _lock:
        if key not in _migrated:
            try:
                upgrade(engine, packages)
            except DBAPIError as e:
                engine.dispose()
                raise _open_error(url, e) from None
            _migrated.add(key)
    return engine


def _engine_for(url: str) -> Engine:
    """`make_engine`, with a URL SQLAlchemy cannot read or has no driver for said in one line (the password,
    if the URL could be read, hidden; an unreadable one is not echoed: it may hold one)."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from .errors import CodemoatError

    try:
        return make_engine(url)
    except NoSuchModuleError:
        u = make_url(url)
        raise CodemoatError(
            f"database {u.render_as_string(hide_password=True)}: no database driver for {u.drivername!r} (NoSuchModuleError); "
            "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE"
        ) from None
    except ImportError as e:  # a dialect whose driver is not installed (postgresql+psycopg2)
        u = make_url(url)
        raise CodemoatError(
            f"database {u.render_as_string(hide_password=True)}: its driver is not installed ({e}); "
            "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE"
        ) from None
    except ArgumentError:
        raise CodemoatError(
            "database_url is not a database URL: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE"
        ) from None


# SQLite's words for a file that is not one of its databases, or is one no longer
_NOT_A_DATABASE = ("file is not a database", "database disk image is malformed", "file is encrypted")


def _open_error(url: str, e: DBAPIError) -> Exception:
    """One line naming the database when it cannot be opened; the file is never touched."""
    from .errors import CodemoatError

    u = make_url(url)
    where = (
        (u.database or "the in-memory database") if u.get_backend_name() == "sqlite" else u.render_as_string(hide_password=True)
    )
    problem = driver_words(e, u.password)
    if any(s in problem for s in _NOT_A_DATABASE):
        return CodemoatError(f"{where} is not a codemoat database, or it is corrupted (SQLite: {problem}); it was left as it is")
    if "unable to open database file" in problem:
        return CodemoatError(f"cannot open database {where}: {problem}")
    return CodemoatError(f"database {where}: cannot open it ({problem}); check database_url and that the server is up")


def driver_words(e: DBAPIError, password: str | None = None) -> str:
    """The first line of what the database driver said, without the SQL statement and parameters that
    SQLAlchemy's own text adds (a parameter may be a token or a password) and without `password`."""
    first = next((line.strip() for line in str(e.orig or type(e).__name__).splitlines() if line.strip()), "")
    first = first or type(e.orig or e).__name__
    return first.replace(password, "***") if password else first


# (statement, dialect name) -> (the statement's SQL in the driver's paramstyle, parameter order or None)
_fast_sql: dict[tuple[int, str], tuple[Any, str, tuple[str, ...] | None]] = {}


def fast_execute(conn: Connection, stmt: TextClause, params: dict[str, Any]) -> Any:
    """`conn.execute(stmt, params)` straight on the driver's cursor, in `conn`'s transaction: for the few
    fixed `text()` statements of a hot path (the key server's lease), where SQLAlchemy's per-call work
    (parameter and result processing) costs more CPU than SQLite does. The statement is compiled once per
    dialect (`?` for sqlite3, `%(name)s` for psycopg); the answer is the driver's cursor (`rowcount`,
    `fetchone()` tuples in the SELECT's column order), and an error is the driver's own."""
    key = (id(stmt), conn.dialect.name)
    got = _fast_sql.get(key)
    if got is None:
        compiled = stmt.compile(dialect=conn.dialect)
        order = tuple(compiled.positiontup or ()) if compiled.positional else None
        got = _fast_sql[key] = (stmt, compiled.string, order)  # the statement kept: its id stays its own
    _, sql, order = got
    cur = conn.connection.cursor()
    cur.execute(sql, params if order is None else tuple(params[k] for k in order))
    return cur


class WriterLock:
    """A process's write transactions on one database taken in turn, by its threads and, for an SQLite file,
    by every process holding the `writer_lock` of that file (a flock on `<file>.write-lock`): a process that
    finds the write lock taken by another then waits in the kernel and wakes when it is let go, instead of
    SQLite's busy handler polling for it (sleeps of 1, 2, 5, 10 ms... while the event loop that called it
    stands still). SQLite's own lock stays the authority; other backends get the thread lock alone."""

    def __init__(self, path: str | None):
        self._lock = threading.Lock()
        self._fd = os.open(f"{path}.write-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600) if path else None

    def __enter__(self) -> None:
        self._lock.acquire()
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._lock.release()
                raise

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._lock.release()


_writer_locks: dict[tuple[int, str], WriterLock] = {}


def writer_lock(engine: Engine) -> WriterLock:
    """The `WriterLock` of `engine`'s database: one per SQLite file and process (a forked child makes its
    own: a flock is shared through an inherited descriptor), a thread lock of its own for any other."""
    db = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not db or db == ":memory:" or db.startswith("file:"):
        return WriterLock(None)
    key = (os.getpid(), os.path.abspath(db))
    with _lock:
        got = _writer_locks.get(key)
        if got is None:
            got = _writer_locks[key] = WriterLock(key[1])
    return got
