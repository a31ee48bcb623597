"""Re-indexing started from the console: a background thread per job, its state in the shared
database (`console_jobs`), so that every replica's job page shows it and a restart keeps it. The
job's page refreshes itself each second while the job runs (no script needed).

A running job's thread writes its progress and a heartbeat every `BEAT` seconds. A job whose process
is gone is shown, and stored, as failed: at once when that process was on this host (its pid is not
alive, or the pid now belongs to another start of the server), otherwise once its heartbeat is
`STALE` seconds old."""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from ..errors import CodemoatError

BEAT = 0.5
STALE = 30.0
INSTANCE = secrets.token_hex(8)  # this start of this process

meta = sa.MetaData()
table = sa.Table(
    "console_jobs",
    meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("repo", sa.String(256)),
    sa.Column("by", sa.String(128)),
    sa.Column("state", sa.String(16)),
    sa.Column("done", sa.Integer),
    sa.Column("total", sa.Integer),
    sa.Column("started", sa.Float),
    sa.Column("finished", sa.Float),
    sa.Column("stats", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("instance", sa.String(32)),
    sa.Column("heartbeat", sa.Float),
)


@dataclass
class Job:
    id: str
    repo: str
    by: str
    state: str = "running"  # running | finished | failed
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    stats: dict[str, Any] | None = None
    error: str | None = None


def _job(r) -> Job:
    return Job(
        r.id, r.repo, r.by, r.state, r.done, r.total, r.started, r.finished, json.loads(r.stats) if r.stats else None, r.error
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class Jobs:
    def __init__(self, engine: Engine, keep: int = 50, *, stale: float = STALE):
        self.engine, self.keep, self.stale = engine, keep, stale
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        if "\x00" in job_id:  # no job's id; PostgreSQL refuses a NUL in a query's text (a 500, was)
            return None
        with self.engine.begin() as c:
            self._reap(c)
            r = c.execute(sa.select(table).where(table.c.id == job_id)).first()
        return _job(r) if r else None

    def latest(self) -> dict[str, Job]:
        """The newest job of each repository."""
        with self.engine.begin() as c:
            self._reap(c)
            rows = c.execute(sa.select(table).order_by(table.c.started)).all()
        return {r.repo: _job(r) for r in rows}

    def start(self, repo: str, by: str) -> Job:
        """Re-index `repo` in a thread; refused while a job for it is running (on any replica)."""
        from ..index.store import SqliteIndex, default_path

        most = table.c.repo.type.length
        if len(repo) > most:  # PostgreSQL refuses a longer one in the column (a 500, was); `index add` takes any length
            raise CodemoatError(
                f"a repository name of {len(repo)} characters: the console re-indexes names of at most {most}"
                " (`codemoat index update NAME` takes any)"
            )
        with self._lock, self.engine.begin() as c:
            self._reap(c)
            if c.execute(sa.select(table.c.id).where(table.c.repo == repo, table.c.state == "running")).first():
                raise CodemoatError(f"repository {repo!r} is being re-indexed already")
            store = SqliteIndex(default_path())
            try:
                store.repo(repo)  # unknown: a one-line error now, not a failed job
            except CodemoatError:
                store.close()
                raise
            job = Job(secrets.token_hex(8), repo, by)
            c.execute(
                table.insert().values(
                    **{k: v for k, v in asdict(job).items() if k != "stats"},
                    host=socket.gethostname()[:255],
                    pid=os.getpid(),
                    instance=INSTANCE,
                    heartbeat=time.time(),
                )
            )
            old = c.execute(
                sa.select(table.c.id).where(table.c.state != "running").order_by(table.c.started.desc()).offset(self.keep)
            ).scalars()
            c.execute(table.delete().where(table.c.id.in_(list(old))))
        threading.Thread(target=self._run, args=(job, store), name=f"reindex-{repo}", daemon=True).start()
        return job

    def _reap(self, c) -> None:
        """Mark failed the running jobs whose process is gone."""
        now, host = time.time(), socket.gethostname()[:255]
        for r in c.execute(sa.select(table).where(table.c.state == "running")).all():
            if r.host == host and (r.instance != INSTANCE if r.pid == os.getpid() else not _alive(r.pid)):
                why = f"the server process running it (pid {r.pid} on {r.host}) stopped"
            elif r.heartbeat < now - self.stale:
                why = f"no word from the server running it (pid {r.pid} on {r.host}) for {now - r.heartbeat:.0f} s"
            else:
                continue
            c.execute(
                table.update()
                .where(table.c.id == r.id, table.c.state == "running")
                .values(state="failed", error=why, finished=r.heartbeat)
            )

    def _save(self, job: Job, **final: Any) -> None:
        with self.engine.begin() as c:
            c.execute(
                table.update()
                .where(table.c.id == job.id, table.c.state == "running")
                .values(done=job.done, total=job.total, heartbeat=time.time(), **final)
            )

    def _run(self, job: Job, store) -> None:
        from ..index.update import update_repository

        stop = threading.Event()

        def beat() -> None:  # progress and a sign of life, also while one large file takes long
            while not stop.wait(BEAT):
                try:
                    self._save(job)
                except Exception:  # the database busy a moment: the next beat retries
                    pass

        def progress(done: int, total: int, _path: str) -> None:
            job.done, job.total = done, total

        beater = threading.Thread(target=beat, name=f"reindex-beat-{job.repo}", daemon=True)
        beater.start()
        try:
            stats = update_repository(store, job.repo, progress)
            job.stats = asdict(stats)
            job.done = job.total = stats.files
            job.state = "finished"
        except Exception as e:  # the job page says why
            job.error, job.state = (str(e) if isinstance(e, CodemoatError) else f"{type(e).__name__}: {e}"), "failed"
        finally:
            stop.set()
            beater.join()
            job.finished = time.time()
            store.close()
            self._save(
                job,
                state=job.state,
                finished=job.finished,
                stats=json.dumps(job.stats) if job.stats is not None else None,
                error=job.error,
            )
