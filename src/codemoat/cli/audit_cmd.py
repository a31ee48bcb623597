"""`codemoat audit verify|export|outbound|alerts|rotate|head export`: read and check the tamper-evident audit log."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .apps import _group, audit_app
from .common import ConfigOpt, JsonFlag, check_writable, console, emit, emit_failed, open_audit_log, say

head_app = _group("The signed head of the audit log: export it to keep off this machine.")
audit_app.add_typer(head_app, name="head")


def _log(config: Path | None):
    from ..config import load_settings

    return open_audit_log(load_settings(config), batched=True)  # batched: what `verify` lets follow the signed head


TrustedHeadOpt = Annotated[
    Path | None,
    typer.Option(
        "--trusted-head",
        help="A head exported earlier (`codemoat audit head export`): refuse a log that is not a continuation of it.",
    ),
]


def _check_trusted_head(path: Path | None) -> None:
    """An exported head the operator names must be one: a wrong file is their mistake, said in one line, not the
    log's failure ('FAILED at record 1'). One that reads as a head is checked against the log by verify."""
    from ..audit import trusted
    from ..errors import CodemoatError

    if path is None:
        return
    if path.is_dir():
        raise CodemoatError(f"--trusted-head {path} is a folder: name a head file (`codemoat audit head export`)")
    if not path.exists():
        raise CodemoatError(f"--trusted-head {path}: no such file")
    try:
        trusted.load(path)
    except ValueError as e:
        raise CodemoatError(f"--trusted-head: {e}") from None


@audit_app.command("verify")
def audit_verify(*, trusted_head: TrustedHeadOpt = None, config: ConfigOpt = None, as_json: JsonFlag = False) -> None:
    """Check every record, checkpoint and signature, and that nothing verified before was rolled back; exit 1 if any fails."""
    _check_trusted_head(trusted_head)
    rep = _log(config).verify(trusted_head=trusted_head)

    def human(r):
        from rich.markup import escape

        if r["ok"]:
            console.print(
                f"[green]audit log OK[/green]: {r['records']} records, {r['checkpoints']} signed checkpoints, "
                f"head at record {r['head_seq'] or 0} (audit key {r['key_id'] or 'none yet'})",
                highlight=False,
            )
            for t in r["trusted"]:
                say(f"  consistent with {t}", markup=False)
            if r["warning"]:
                say(f"  warning: {r['warning']}", style="yellow", markup=False)
        else:
            say(f"[red]audit log FAILED at record {r['first_bad']}[/red]: {escape(r['problem'])}")  # it names paths

    if not rep.ok:
        emit_failed(rep.to_dict(), as_json, human, f"audit log FAILED at record {rep.first_bad}: {rep.problem}")
    emit(rep.to_dict(), as_json, human)


@audit_app.command("export")
def audit_export(
    *,
    since: Annotated[
        str | None, typer.Option(help="Only records from this time: ISO (2026-11-28T10:00) or a duration back (15m, 2h, 7d).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    kind: Annotated[
        str | None,
        typer.Option(
            help="Only records of this kind: request, unauthenticated, alert, egress_blocked, rotation, engine_crashed, "
            "directory, update, tamper, tpm_checkpoint or withheld."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this new file instead of standard output.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the file at --output (kept whole until the export is).")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Export records, with their hashes, as JSON lines or CSV."""
    from .. import paths
    from ..audit.log import check_kind, parse_since
    from ..errors import CodemoatError

    start = parse_since(since)
    if fmt not in ("jsonl", "csv"):
        raise CodemoatError(f"unknown export format {fmt!r}: use jsonl or csv")
    check_kind(kind)
    if output is not None:  # as every other --output: an earlier export is not overwritten unasked
        check_writable(output, force, "an earlier export: name a new file, e.g. one a day")
    log = _log(config)
    if output is None:
        for chunk in log.export(fmt, since=start, kind=kind):
            sys.stdout.write(chunk)
        return
    try:  # a new file (or a replacement, with --force) that appears whole or not at all
        with paths.open_out(output, force=force) as out:
            for chunk in log.export(fmt, since=start, kind=kind):
                out.write(chunk)
    except FileExistsError:
        raise CodemoatError(f"{output} exists: pass --force to replace it") from None
    except OSError as e:
        raise CodemoatError(f"cannot write {output}: {e.strerror}") from None


def _printable(text: str) -> str:
    """Control characters (a terminal escape sequence written into the file, say) shown as \\xNN,
    so reading the log cannot drive the terminal."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)


@audit_app.command("outbound")
def audit_outbound(*, as_json: JsonFlag = False) -> None:
    """Show, verbatim, every payload this machine has sent off it (license heartbeats)."""
    from ..audit.outbound import outbound_file, read_outbound

    rows = read_outbound()

    def human(rs):
        if not rs:
            console.print(
                f"nothing has been sent off this machine ({outbound_file()} does not exist or is empty)",
                highlight=False,
                markup=False,
            )
            return
        for r in rs:
            if "raw" in r:
                why = "not valid UTF-8, bad bytes shown as \ufffd" if r.get("not_utf8") else "not a JSON object"
                console.print(f"line {r['line']} ({why}): {_printable(r['raw'])}", highlight=False, markup=False)
                continue
            status = "sending" if r.get("status") is None else f"status {r['status']}"
            console.print(
                _printable(f"{r.get('time')}  {r.get('method')} {r.get('destination')}  {status}"), highlight=False, markup=False
            )
            if r.get("body") is not None:
                say(f"  {_printable(str(r['body']))}", markup=False)
        console.print(f"{len(rs)} lines in {outbound_file()}", highlight=False, markup=False)

    emit(rows, as_json, human)


@audit_app.command("alerts")
def audit_alerts(*, config: ConfigOpt = None, as_json: JsonFlag = False) -> None:
    """List the distillation alarms raised (newest first)."""
    rows = list(_log(config).records(kind="alert", newest_first=True))

    def human(rs):
        if not rs:
            console.print("no alerts", highlight=False)
            return
        for r in rs:
            # a detail someone edited in the database (not an object, odd values) is shown as far as it goes, and
            # the alerts after it still are
            d = r["detail"] if isinstance(r["detail"], dict) else {}
            s = d.get("signals") if isinstance(d.get("signals"), dict) else {}
            reasons = d.get("reasons") if isinstance(d.get("reasons"), list) else []
            say(
                f"record {r['seq']}  {r['time'][:19]}  user {r['user']}: {', '.join(str(x) for x in reasons)}  "
                f"(requests in window {s.get('requests', '?')}, novelty {s.get('novelty', '?')}, "
                f"mean tokens {s.get('mean_completion_tokens', '?')}, accept rate {s.get('accept_rate', '?')})",
                markup=False,
            )

    emit(rows, as_json, human)


@audit_app.command("rotate")
def audit_rotate(
    *,
    archive: Annotated[Path, typer.Option(help="New file to move the current records, checkpoints and head into (JSON lines).")],
    config: ConfigOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Archive the log and start a new chain anchored to the archive (retention, or after an investigated tampering)."""
    d = _log(config).rotate(archive)

    def human(x):
        state = "verified OK" if x["previous_ok"] else f"NOT intact: {x['previous_problem']}"
        say(
            f"moved {x['records']} records to {x['archive']} (sha256 {x['archive_sha256'][:16]}…; the old chain {state}); "
            "the new chain starts with a signed rotation record",
            markup=False,
        )

    emit(d, as_json, human)


@head_app.command("export")
def audit_head_export(
    *,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write to this new file instead of standard output (a head kept earlier is not replaced)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the file at --output.")] = False,
    trusted_head: TrustedHeadOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Verify the log, then print its signed head (JSON, nothing secret) to keep off this machine for `audit verify --trusted-head`."""
    import json

    from .. import paths
    from ..audit import trusted
    from ..errors import CodemoatError

    _check_trusted_head(trusted_head)
    if output is not None:  # an exported head is the anchor that catches a rollback: an earlier one is kept
        check_writable(output, force, "an exported head: keep each, e.g. one file a day")
    log = _log(config)
    rep = log.verify(trusted_head=trusted_head)
    if not rep.ok:
        raise CodemoatError(f"not exporting the head of a log that fails verification: record {rep.first_bad}: {rep.problem}")
    if rep.head is None:
        raise CodemoatError("the audit log is empty: there is no signed head to export yet")
    text = json.dumps(trusted.document(rep.head, log.public_key()), indent=1) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    try:  # as a new file (or replaced with --force): a file or link put there meanwhile is refused, not written through
        paths.write_out(output, text.encode(), force=force)
    except FileExistsError:
        raise CodemoatError(f"{output} exists: pass --force to replace it") from None
    except OSError as e:
        raise CodemoatError(f"cannot write {output}: {e.strerror}") from None
    say(
        f"signed head at record {rep.head.seq} written to {output}: keep it off this machine and check with "
        f"`codemoat audit verify --trusted-head {output}`",
        markup=False,
    )
