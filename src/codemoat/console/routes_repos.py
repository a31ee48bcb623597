"""The console's Repositories page: the indexed repositories and their languages, and re-index jobs
started from it (`console.jobs`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..errors import CodemoatError
from .web import guarded_post, note, page, run, see_other, session_of, to_signin, usage_engine

router = APIRouter(include_in_schema=False)


@router.get("/admin/repositories")
async def repositories(request: Request):
    s = await run(session_of, request)
    if s is None:
        return to_signin()
    repos, error, langs = [], None, {}
    try:
        from ..index.store import SqliteIndex, default_path

        if default_path().exists():
            idx = SqliteIndex(default_path())
            try:
                from .repos import languages

                repos = await run(idx.repos, True)
                langs = await run(languages, idx)
            finally:
                idx.close()
    except Exception as e:  # the page says why rather than failing
        error = f"cannot read the code index: {type(e).__name__}: {e}"
    return page(request, "repositories.html", s, repos=repos, error=error, jobs=_jobs(request).latest(), langs=langs)


def _jobs(request: Request):
    from .jobs import Jobs

    j = getattr(request.app.state, "console_jobs", None)
    if j is None:
        j = request.app.state.console_jobs = Jobs(usage_engine(request))
    return j


@router.post("/admin/repositories/reindex")
async def reindex(request: Request):
    s, f = await guarded_post(request)
    if s is None:
        return f
    name = f.get("name", "")
    try:
        job = await run(_jobs(request).start, name, s.user)
    except CodemoatError as e:
        note(request, f"console: re-index refused: {e}")
        return page(request, "repositories.html", s, status=400, repos=[], error=str(e), jobs={})
    note(request, f"console: re-index of {name} started (job {job.id})")
    return see_other(f"/admin/repositories/jobs/{job.id}")


@router.get("/admin/repositories/jobs/{job_id}")
async def reindex_job(request: Request, job_id: str):
    s = await run(session_of, request)
    if s is None:
        return to_signin()
    job = _jobs(request).get(job_id)
    if job is None:
        return page(request, "job.html", s, status=404, job=None)
    return page(request, "job.html", s, job=job)
