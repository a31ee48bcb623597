"""Re-indexing started from the console: one background thread per job, its progress read by the
job's page (which refreshes itself each second while the job runs: no script needed). Jobs live in
the process that started them (`app.state.console_jobs`); the index itself is shared."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CodemoatError


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


class Jobs:
    def __init__(self, keep: int = 50):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.keep = keep

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def latest(self) -> dict[str, Job]:
        """The newest job of each repository."""
        out: dict[str, Job] = {}
        for j in sorted(self._jobs.values(), key=lambda j: j.started):
            out[j.repo] = j
        return out

    def start(self, repo: str, by: str) -> Job:
        """Re-index `repo` in a thread; refused while a job for it is running."""
        from ..index.store import SqliteIndex, default_path

        with self._lock:
            if any(j.repo == repo and j.state == "running" for j in self._jobs.values()):
                raise CodemoatError(f"repository {repo!r} is being re-indexed already")
            store = SqliteIndex(default_path())
            try:
                store.repo(repo)  # unknown: a one-line error now, not a failed job
            except CodemoatError:
                store.close()
                raise
            job = Job(secrets.token_hex(8), repo, by)
            self._jobs[job.id] = job
            for old in sorted(self._jobs.values(), key=lambda j: j.started)[: max(0, len(self._jobs) - self.keep)]:
                if old.state != "running":
                    del self._jobs[old.id]
        threading.Thread(target=self._run, args=(job, store), name=f"reindex-{repo}", daemon=True).start()
        return job

    @staticmethod
    def _run(job: Job, store) -> None:
        from ..index.update import update_repository

        def progress(done: int, total: int, _path: str) -> None:
            job.done, job.total = done, total

        try:
            stats = update_repository(store, job.repo, progress)
            job.stats = asdict(stats)
            job.done = job.total = stats.files
            job.state = "finished"
        except Exception as e:  # the job page says why
            job.error, job.state = (str(e) if isinstance(e, CodemoatError) else f"{type(e).__name__}: {e}"), "failed"
        finally:
            job.finished = time.time()
            store.close()
