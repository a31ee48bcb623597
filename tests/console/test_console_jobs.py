"""Re-index jobs live in the shared database: another replica (another engine on the same database)
and a restarted server see a job's progress and result; a job whose process died is failed, not
running forever (a real process killed mid-job; a replica on another host that went quiet)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from codemoat.console.jobs import Jobs, table
from codemoat.db import make_engine, open_db
from codemoat.errors import CodemoatError


@pytest.fixture
def indexed(home, tmp_path):
    from codemoat.index.store import SqliteIndex, default_path
    from codemoat.index.update import add_repository

    repo = tmp_path / "svc"
    repo.mkdir()
    for k in range(20):
        (repo / f"m{k}.py").write_text(f"def f{k}(x):\n    return x + {k}\n")
    store = SqliteIndex(default_path())
    add_repository(store, repo, "svc", ["everyone"])
    store.close()
    (repo / "new.py").write_text("def g():\n    return 1\n")
    url = f"sqlite:///{home / 'codemoat.db'}"
    return url, open_db(url)


def _until(fn, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not (v := fn()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return v


def test_another_replica_and_a_restart_see_the_job(indexed):
    url, engine = indexed
    job = Jobs(engine).start("svc", "root")
    other = Jobs(make_engine(url))  # another replica: its own engine, the same database
    assert other.get(job.id).repo == "svc"
    done = _until(lambda: (j := other.get(job.id)) and j.state != "running" and j)
    assert done.state == "finished" and done.stats["files"] == 21 and done.stats["indexed"] == 1 and done.done == 21
    restarted = Jobs(make_engine(url))
    assert restarted.latest()["svc"].state == "finished" and restarted.get("0000") is None


def test_a_job_whose_process_was_killed_is_failed(indexed):
    url, engine = indexed
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "import codemoat.index.update as u\n"
            "u.update_repository = lambda *a, **k: time.sleep(3600)  # a job that never ends by itself\n"
            "from codemoat.db import open_db\n"
            "from codemoat.console.jobs import Jobs\n"
            f"print(Jobs(open_db({url!r})).start('svc', 'root').id, flush=True)\n"
            "time.sleep(3600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = child.stdout.readline().strip()
        jobs = Jobs(engine)
        assert jobs.get(job_id).state == "running"  # its process is alive and beating
        with pytest.raises(CodemoatError, match="being re-indexed already"):
            jobs.start("svc", "ops")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    j = jobs.get(job_id)
    assert j.state == "failed" and f"pid {child.pid}" in j.error and "stopped" in j.error
    with engine.connect() as c:  # stored as failed, not only shown
        assert c.execute(sa.select(table.c.state).where(table.c.id == job_id)).scalar() == "failed"
    again = jobs.start("svc", "ops")  # the repository is free again
    assert _until(lambda: (x := jobs.get(again.id)).state != "running" and x).state == "finished"


def test_a_quiet_replica_on_another_host_fails_its_job_after_the_stale_time(database_url):
    engine = open_db(database_url)
    now = time.time()
    row = dict(repo="svc", by="root", state="running", done=3, total=21, started=now - 200, host="replica-b", pid=1)
    with engine.begin() as c:
        c.execute(table.insert().values(id="quiet", heartbeat=now - 100, instance="x", **row))
        c.execute(table.insert().values(id="beating", heartbeat=now, instance="y", **{**row, "repo": "web"}))
    jobs = Jobs(engine, stale=30)
    assert jobs.get("beating").state == "running"  # another host's live job: its pid says nothing here
    q = jobs.get("quiet")
    assert q.state == "failed" and "no word from the server running it (pid 1 on replica-b)" in q.error
    assert jobs.latest()["web"].state == "running"
    with pytest.raises(CodemoatError, match="being re-indexed already"):  # refused here while it runs there
        jobs.start("web", "ops")
