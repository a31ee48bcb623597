"""The console's Audit page: records with filters, outbound calls and alerts; verify the chain;
export the filtered records as JSON lines or CSV."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..audit.reading import withheld_record
from ..errors import CodemoatError
from . import auditview
from .web import guarded_post, note, page, refused, run, secure, see_other, session_of, to_signin

router = APIRouter(include_in_schema=False)


@router.get("/admin/audit")
async def audit(request: Request):
    s = await run(session_of, request)
    if s is None:
        return to_signin()
    from ..audit.outbound import read_outbound

    f = auditview.Filters.of(dict(request.query_params))
    error = None
    try:
        b = request.query_params.get("before", "")
        before = int(b) if b.isascii() and b.isdigit() and len(b) <= 18 else None  # a record number fits 64 bits
        recs = await run(auditview.page, request.app.state.trust.log.engine, f, before)
    except CodemoatError as e:
        recs, error = [], str(e)
    outbound = (await run(read_outbound))[-50:]
    alerts = await run(auditview.alerts, request.app.state.trust.log.engine)
    return page(
        request,
        "audit.html",
        s,
        records=recs,
        filters=f,
        error=error,
        verify=getattr(request.app.state, "console_verify", None),
        outbound=list(reversed(outbound)),
        alerts=alerts,
        detail_text=auditview.detail_text,
        withheld_record=withheld_record,
        page_size=auditview.PAGE,
    )


@router.post("/admin/audit/verify")
async def audit_verify(request: Request):
    s, f = await guarded_post(request)
    if s is None:
        return f
    rep = await run(request.app.state.trust.log.verify)
    request.app.state.console_verify = {"at": time.time(), **rep.to_dict()}
    note(request, f"console: verified the audit log: {'OK' if rep.ok else f'FAILED at record {rep.first_bad}'}")
    return see_other("/admin/audit")


@router.get("/admin/audit/export")
async def audit_export(request: Request):
    s = await run(session_of, request)
    if s is None:
        return to_signin()
    import csv
    import io
    import json

    from ..audit.chain import FIELDS
    from ..audit.reading import csv_cell

    fmt = request.query_params.get("fmt", "jsonl")
    if fmt not in ("jsonl", "csv"):
        return refused(request, "unknown export format (jsonl or csv)")
    f = auditview.Filters.of(dict(request.query_params))
    try:
        f.where()
    except CodemoatError as e:
        return refused(request, str(e))
    log_engine = request.app.state.trust.log.engine
    cols = ["seq", "time", *FIELDS[2:], "hash"]

    def lines():
        if fmt == "csv":
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in auditview.rows(log_engine, f):
                w.writerow({k: csv_cell(v) for k, v in r.items()})
                if buf.tell() > 1 << 16:
                    yield buf.getvalue()
                    buf.seek(0)
                    buf.truncate()
            yield buf.getvalue()
        else:
            for r in auditview.rows(log_engine, f):
                yield json.dumps(r, ensure_ascii=False) + "\n"

    note(request, f"console: exported audit records as {fmt}")
    media = "text/csv" if fmt == "csv" else "application/x-ndjson"
    resp = StreamingResponse(
        lines(), media_type=media, headers={"Content-Disposition": f'attachment; filename="codemoat-audit.{fmt}"'}
    )
    return secure(resp)
