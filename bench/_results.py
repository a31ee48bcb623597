"""How a bench writes its run into bench/results/NAME.md and keeps what others wrote there.

A results file is a title line (`# ...`), maybe text under it, then parts: each runs from a `# ` or `## `
heading line to the next one (deeper headings stay inside their part; a line inside a ``` fence is never a
heading). A run's text goes first, under the title; it replaces every old part whose heading line it writes
again, and every other old part (earlier runs, other benches' sections, notes written by hand) follows in its
old order, byte for byte. A heading is matched as a whole line, never as text found inside another part.
A file laid out by topic rather than by run (`replace`) keeps its order: a part written again is replaced
where it stands.
"""

from __future__ import annotations

from pathlib import Path


def parts(text: str, depth: int = 2) -> list[tuple[str | None, str]]:
    """`text` cut before each heading of level 1..`depth`: (heading line without its end, the part's text)
    pairs; the text before the first heading, if any, is a part whose heading is None."""
    out: list[tuple[str | None, str]] = []
    fenced = False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        level = len(line) - len(line.lstrip("#"))
        if not fenced and 1 <= level <= depth and line[level : level + 1] == " ":
            out.append((line.rstrip(), line))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + line)
        else:
            out.append((None, line))
    return out


def merge(old: str, new: str, title: str | None = None) -> str:
    """The results file: `new` first (under `title`, when given and `new` does not start with it), then
    every part of `old` whose heading `new` does not write, as it was. With `title` given, the old file's
    text under its title line is kept too (after `new`); without one, `new`'s own `# ` part replaces it."""
    if title is not None and not new.startswith(title + "\n"):
        new = f"{title}\n\n{new.lstrip(chr(10))}"
    heads = {h for h, _ in parts(new) if h is not None}
    kept = []
    for head, text in parts(old):
        if head is not None and head == title:
            head, text = None, text.partition("\n")[2]
        elif head is not None and head in heads:
            continue
        if text.strip():
            kept.append(text if head is not None else text.lstrip("\n"))
    out = new.rstrip("\n") + "\n"
    return out + ("\n" + "".join(kept).rstrip("\n") + "\n" if kept else "")


def replace(old: str, new: str) -> str:
    """`old` with each part whose heading `new` writes again replaced by `new`'s where it stands (a results
    file laid out by topic, not by run); `new`'s other parts are added at the end, every other part of
    `old` stays byte for byte. The first of two old parts with one heading is the one replaced."""
    fresh = parts(new)
    todo = {h: text for h, text in fresh if h is not None}
    out = [text for h, text in fresh if h is None]  # text before new's first heading: first
    for head, text in parts(old):
        out.append(todo.pop(head).rstrip("\n") + "\n\n" if head in todo else text)
    body, extra = "".join(out), "".join(text.rstrip("\n") + "\n\n" for text in todo.values())
    joined = (body.rstrip("\n") + "\n\n" if body.strip() else "") + extra
    return joined.rstrip("\n") + "\n" if joined.strip() else ""


def write(path: Path, new: str, title: str | None = None) -> None:
    """Merge `new` into the results file at `path` (which may not exist yet) and write it."""
    path.write_text(merge(path.read_text() if path.exists() else "", new, title))


def write_in_place(path: Path, new: str) -> None:
    """`replace` `new`'s parts in the results file at `path` (which may not exist yet) and write it."""
    path.write_text(replace(path.read_text() if path.exists() else "", new))
