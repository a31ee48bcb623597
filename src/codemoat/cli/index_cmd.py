"""`codemoat index add|update|remove|list` and `codemoat retrieve`: the private code index."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from .apps import app, index_app
from .common import JsonFlag, console, emit, emit_failed, print_error, table, terminal_text

GROUPS_HELP = (
    "Comma-separated groups whose members may read this repository. Every user is implicitly in "
    "'everyone'; members of 'admin' read every repository."
)


@contextmanager
def _progress(enabled: bool, label: str):
    """A rich progress bar fed by the indexer's (done, total, path) callback; none when the output is not a
    terminal (a transient bar would leave an empty line in front of the summary)."""
    if not enabled or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("[dim]{task.fields[path]}"), console=console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(label, total=None, path="")

        def tick(done: int, total: int, path: str) -> None:
            if done == 1 or done % 16 == 0 or done == total:
                bar.update(task, completed=done, total=total, path=escape(terminal_text(path[-60:])))  # a name is no markup

        yield tick


def _stats_line(s: Any) -> str:
    return (
        f"[bold]{s.repo}[/bold]: {s.files} files, {s.indexed} (re)indexed, {s.unchanged} unchanged, "
        f"{s.removed} removed, {s.skipped} skipped; {s.chunks} chunks, {s.symbols} symbols written"
    ) + _refused_lines(s.refused)


def _refused_lines(refused: dict[str, str], limit: int = 20) -> str:
    """The paths never read (symlinks, special files…), each with its reason; `--json` lists them all. A file name
    is a committer's text: shown, not acted on (`terminal_text`), and never read as markup."""
    items = list(refused.items())
    text = "".join(f"\n  not read: {escape(terminal_text(p))}: {escape(terminal_text(why))}" for p, why in items[:limit])
    return text + (f"\n  … and {len(items) - limit} more (--json lists them all)" if len(items) > limit else "")


@index_app.command("add")
def add(
    path: Annotated[Path, typer.Argument(help="Folder of the repository (a git work tree or any folder).")],
    *,
    name: Annotated[str, typer.Option("--name", help="Name of the repository in the index.")],
    groups: Annotated[str, typer.Option("--groups", help=GROUPS_HELP)] = "everyone",
    include: Annotated[list[str] | None, typer.Option("--include", help="Only files matching this glob (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Skip files matching this glob (repeatable).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Index a repository: files from `git ls-files` (or a .gitignore-aware walk), tree-sitter chunks, symbols."""
    from ..index.store import SqliteIndex
    from ..index.update import add_repository, parse_groups

    store = SqliteIndex()
    with _progress(not as_json, f"indexing {name}") as tick:
        stats = add_repository(store, path, name, parse_groups(groups), include or (), exclude or (), tick)
    info = store.repo(name)
    emit({**vars(stats), "groups": list(info.groups), "root": info.root, "git_url": info.git_url}, as_json,
         lambda d: console.print(_stats_line(stats) + f"\nreadable by: {', '.join(info.groups)}"))  # fmt: skip


@index_app.command("update")
def update(
    name: Annotated[str | None, typer.Argument(help="Repository to update (default: all).")] = None,
    *,
    groups: Annotated[str | None, typer.Option("--groups", help="Replace the repository's groups. " + GROUPS_HELP)] = None,
    as_json: JsonFlag = False,
) -> None:
    """Re-index changed files (by content hash); files deleted from the folder leave the index."""
    from ..errors import CodemoatError
    from ..index.store import SqliteIndex
    from ..index.update import PACK_ROOT, UpdateStats, parse_groups, update_repository

    store = SqliteIndex()
    if groups is not None:
        if name is None:
            raise CodemoatError("--groups needs a repository name")
        new = parse_groups(groups)
        if not new:
            raise CodemoatError("a repository needs at least one group (e.g. --groups everyone)")
        store.set_groups(name, new)
    names = [name] if name else [r.name for r in store.repos()]
    out, failed = [], []
    for n in names:
        info = store.repo(n)
        if info.root.startswith(PACK_ROOT):
            # a knowledge pack has no folder and changes only through `update apply`: say so, not "0 files"
            out.append({**vars(UpdateStats(n)), "groups": list(info.groups), "knowledge_pack": True})
            if not as_json:
                console.print(f"[bold]{n}[/bold]: a knowledge pack, left as it is (`codemoat update apply` changes it)")
            continue
        try:
            with _progress(not as_json, f"updating {n}") as tick:
                stats = update_repository(store, n, tick)
        except CodemoatError as e:
            if name:  # the one asked for: its error is the command's
                raise
            # all of them: one that cannot be read (a damaged .git/index) is named and left as it was, and the
            # others are still updated (they all stopped at it)
            failed.append(n)
            out.append({"repo": n, "error": str(e)})
            if not as_json:
                print_error(f"{n}: {e}")
            continue
        out.append({**vars(stats), "groups": list(store.repo(n).groups)})
        if not as_json:
            console.print(_stats_line(stats))
    if failed:  # for people each was told as it failed
        emit_failed(out, as_json, lambda _: None, f"{len(failed)} of {len(names)} repositories not updated: {', '.join(failed)}")
    if as_json:
        emit(out, True)
    elif not names:
        console.print("no repositories indexed yet (`codemoat index add PATH --name NAME`)")


@index_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="Repository to remove from the index.")],
    *,
    as_json: JsonFlag = False,
) -> None:
    """Remove a repository and everything indexed from it."""
    from ..index.store import SqliteIndex

    SqliteIndex().remove_repo(name)
    emit({"removed": name}, as_json, lambda d: console.print(f"removed [bold]{name}[/bold]"))


@index_app.command("list")
def list_(as_json: JsonFlag = False) -> None:
    """Indexed repositories with their groups and sizes."""
    import time

    from ..index.store import SqliteIndex

    repos = SqliteIndex().repos(counts=True)
    data = [
        {"name": r.name, "root": r.root, "git_url": r.git_url, "groups": list(r.groups), "files": r.files,
         "chunks": r.chunks, "symbols": r.symbols,
         "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.updated)) if r.updated else None}
        for r in repos
    ]  # fmt: skip

    def human(rows: list[dict]) -> None:
        if not rows:
            console.print("no repositories indexed yet (`codemoat index add PATH --name NAME`)")
            return
        t = table("name", "groups", "files", "chunks", "symbols", "updated", "root")
        for d in rows:
            t.add_row(d["name"], ",".join(d["groups"]), str(d["files"]), str(d["chunks"]), str(d["symbols"]),
                      d["updated"] or "", d["root"])  # fmt: skip
        console.print(t)

    emit(data, as_json, human)


@app.command("retrieve")
def retrieve(
    *,
    repo: Annotated[str, typer.Option("--repo", help="Indexed repository name.")],
    path: Annotated[str, typer.Option("--path", help="File path relative to the repository.")],
    line: Annotated[int, typer.Option("--line", min=1, help="Cursor line (1-based).")],
    column: Annotated[int | None, typer.Option("--column", min=0, help="Cursor column (0-based; default: end of line).")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Snippets to return at most.")] = 5,
    budget: Annotated[int, typer.Option("--budget", min=1, help="Token budget for the snippets (≈4 characters a token).")] = 512,
    groups: Annotated[
        str,
        typer.Option(
            "--groups", help="Retrieve as a caller in these groups (comma-separated); default: admin, who reads everything."
        ),
    ] = "admin",
    as_json: JsonFlag = False,
) -> None:
    """Print the snippets a completion with the cursor at --line/--column would get (prefix = the file up to the cursor)."""
    from ..errors import CodemoatError
    from ..index.reader import MAX_BYTES, read_bytes
    from ..index.store import SqliteIndex
    from ..index.update import parse_groups
    from ..retrieve import Retriever

    info = SqliteIndex().repo(repo)
    root = Path(info.root).resolve()
    file = (root / path).resolve()
    if not file.is_relative_to(root):
        raise CodemoatError(f"--path {path} is outside the repository {repo} ({root})")
    raw = read_bytes(file)  # as `index update` reads: a regular file of at most MAX_BYTES (a FIFO is not waited on)
    if raw is None and not file.exists():
        raise CodemoatError(f"no file {path} in the repository {repo} ({root})")
    if raw is None:
        raise CodemoatError(f"cannot read {file}: not a regular file of at most {MAX_BYTES:,} bytes")
    lines = raw.decode("utf-8", "replace").split("\n")
    if line > len(lines):
        raise CodemoatError(f"{path} has {len(lines)} lines; --line {line} is past its end")
    cur = lines[line - 1]
    col = len(cur) if column is None else min(column, len(cur))
    prefix = "\n".join([*lines[: line - 1], cur[:col]])
    suffix = "\n".join([cur[col:], *lines[line:]])
    snippets = Retriever().snippets_for_completion(
        groups=frozenset(parse_groups(groups)), repo=repo, path=path, prefix=prefix, suffix=suffix, k=k,
        budget_tokens=budget,
    )  # fmt: skip

    def human(items: list) -> None:
        if not items:
            console.print(f"no snippets (groups: {groups})")
        for s in items:
            where = escape(terminal_text(f"{s.repo}:{s.path}:{s.start_line}-{s.end_line}"))  # a committer's names and text
            console.rule(f"[bold]{where}[/bold]  score {s.score:.4f}", align="left")
            console.print(terminal_text(s.text), highlight=False, markup=False, soft_wrap=True)  # code, not re-wrapped

    emit([s.to_dict() for s in snippets], as_json, lambda _d: human(snippets))
