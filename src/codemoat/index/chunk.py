"""Split a source file into retrieval chunks and a symbol table, with tree-sitter.

One chunk per function or method (with the headers of its enclosing classes prepended, so a method
reads in its scope), one skeleton chunk per class (its header, fields and the signatures of its
methods, their bodies elided), one per type declaration, and line windows over whatever lies between
(imports, constants, module-level code). Long definitions are cut into pieces that each repeat the
signature. Files in languages without a grammar here become plain line windows.

This follows the chunking Tabby and Continue use (tree-sitter definitions, line windows otherwise);
the method-in-class-scope header follows CodeRAG-Bench/cAST's observation that chunks which keep
their syntactic context retrieve better than fixed windows (Zhang et al. 2025, "cAST").
The grammars and the node types each language's definitions use are `languages.py`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .languages import (
    BODIES,
    CLASSES,
    FN_VALUES,
    FUNCS,
    NAME_TYPES,
    SCOPES,
    TRANSPARENT,
    TYPES,
    WRAPPERS,
    language_for,
    parser_for,
)

MAX_DEF_LINES = 80  # a definition longer than this is cut into pieces
PIECE_LINES = 60
WINDOW_LINES = 40  # line windows for gaps and for files without a grammar

_EIGHT_ALNUM = re.compile(r"(?:[\W_]*[^\W_]){8}")  # at least 8 letters or digits: a window worth a chunk


@dataclass
class Chunk:
    start: int  # 1-based, inclusive
    end: int
    kind: str  # function | method | class | type | module | text
    name: str  # qualified name of the definition, "" for windows
    text: str


@dataclass
class Symbol:
    name: str
    qualname: str
    kind: str  # function | method | class | type | variable
    signature: str
    doc: str
    start: int  # 1-based, inclusive
    end: int
    chunk: int  # index into the file's chunks


@dataclass
class _Def:
    kind: str
    name: str
    qualname: str
    start: int  # 0-based rows, inclusive
    end: int
    sig_end: int
    signature: str
    doc: str
    header: str  # the first line, shown above a method's chunk
    children: list[_Def] = field(default_factory=list)


def _text(node: Any) -> str:
    return node.text.decode("utf-8", "replace")


def _name_of(node: Any, lang: str) -> str | None:
    t = node.type
    if t == "impl_item":
        n = node.child_by_field_name("type")
        return re.sub(r"<.*", "", _text(n)) if n else None
    n = node.child_by_field_name("name")
    if n is None and t in ("function_definition", "type_definition"):  # C/C++: follow the declarator chain
        d = node.child_by_field_name("declarator")
        while d is not None and d.child_by_field_name("declarator") is not None:
            d = d.child_by_field_name("declarator")
        n = d
    if n is None:
        for c in node.named_children:
            if c.type in NAME_TYPES:
                n = c
                break
    if n is None:
        return None
    s = _text(n)
    return s if len(s) < 200 else None


def _body(node: Any) -> Any:
    b = node.child_by_field_name("body")
    if b is not None:
        return b
    for c in node.named_children:
        if c.type in BODIES:
            return c
    return None


_QUOTES = re.compile(r"^[rRbBuUfF]*('''|\"\"\"|'|\")|('''|\"\"\"|'|\")$")
_COMMENT = re.compile(r"^\s*(/\*\*?|\*/|\*|///?|#)\s?")


def _doc(node: Any, outer: Any, body: Any, lang: str) -> str:
    if lang == "python" and body is not None and body.named_child_count:
        first = body.named_children[0]
        if first.type == "expression_statement" and first.named_child_count:
            first = first.named_children[0]
        return _QUOTES.sub("", _text(first)).strip().split("\n\n")[0][:300] if first.type == "string" else ""
    lines: list[str] = []
    prev, row = outer.prev_named_sibling, outer.start_point.row
    while prev is not None and "comment" in prev.type and prev.end_point.row >= row - 1 and len(lines) < 12:
        lines[:0] = [_COMMENT.sub("", ln).rstrip(" */") for ln in _text(prev).split("\n")]
        row, prev = prev.start_point.row, prev.prev_named_sibling
    return " ".join(ln.strip() for ln in lines if ln.strip())[:300]


def _comment_start(outer: Any) -> int:
    """The first row of the doc comments directly above a definition."""
    row, prev = outer.start_point.row, outer.prev_named_sibling
    while prev is not None and "comment" in prev.type and prev.end_point.row >= row - 1:
        row, prev = prev.start_point.row, prev.prev_named_sibling
    return row


class _Collector:
    def __init__(self, lang: str, lines: list[str]):
        self.lang, self.lines = lang, lines
        self.funcs, self.classes = FUNCS.get(lang, set()), CLASSES.get(lang, set())
        self.types = TYPES.get(lang, set())
        self.variables: list[tuple[str, str, int, int]] = []  # name, qualname, start, end (rows)

    def visit(self, node: Any, scope: list[str], in_class: bool, out: list[_Def], outer: Any = None) -> None:
        for child in node.named_children:
            t = child.type
            if t in TRANSPARENT:
                wrap = child if (t in WRAPPERS and outer is None) else outer
                if t == "expression_statement":
                    self._assignment(child, scope)
                self.visit(child, scope, in_class, out, wrap)
            elif t in self.funcs or t in self.classes or t in self.types:
                d = self._def(child, outer or child, scope, in_class)
                if d is not None:
                    out.append(d)
            elif t in SCOPES:
                name = _name_of(child, self.lang)
                body = _body(child)
                if body is not None:
                    self.visit(body, [*scope, name] if name else scope, False, out)
            elif t in ("lexical_declaration", "variable_declaration") and not in_class:
                self._js_decl(child, outer or child, scope, out)
            elif t in ("const_declaration", "var_declaration", "const_item", "static_item", "preproc_def") and not in_class:
                for spec in [child] if t in ("const_item", "static_item", "preproc_def") else child.named_children:
                    n = _name_of(spec, self.lang)
                    if n:
                        self.variables.append((n, ".".join([*scope, n]), spec.start_point.row, spec.end_point.row))
            elif t == "assignment" and not in_class:
                self._assignment(child, scope)

    def _assignment(self, stmt: Any, scope: list[str]) -> None:
        if self.lang != "python":
            return
        a = stmt if stmt.type == "assignment" else (stmt.named_children[0] if stmt.named_child_count else stmt)
        if a.type == "assignment":
            left = a.child_by_field_name("left")
            if left is not None and left.type == "identifier":
                n = _text(left)
                self.variables.append((n, ".".join([*scope, n]), stmt.start_point.row, stmt.end_point.row))

    def _js_decl(self, decl: Any, outer: Any, scope: list[str], out: list[_Def]) -> None:
        for v in decl.named_children:
            if v.type != "variable_declarator":
                continue
            name_node, value = v.child_by_field_name("name"), v.child_by_field_name("value")
            if name_node is None or name_node.type != "identifier":
                continue
            n = _text(name_node)
            if value is not None and value.type in FN_VALUES:
                d = self._make(decl, outer, n, scope, "function", _body(value))
                out.append(d)
            else:
                self.variables.append((n, ".".join([*scope, n]), decl.start_point.row, decl.end_point.row))

    def _def(self, node: Any, outer: Any, scope: list[str], in_class: bool) -> _Def | None:
        t = node.type
        if (
            t in ("struct_specifier", "enum_specifier", "union_specifier", "class_specifier")
            and node.child_by_field_name("body") is None
        ):
            return None
        name = _name_of(node, self.lang)
        if not name:
            return None
        body = _body(node)
        if t in self.funcs:
            kind = "method" if in_class else "function"
        elif t in self.classes:
            kind = "class"
        else:
            kind = "type"
        if t == "method_declaration" and self.lang == "go":  # func (s *Server) Handle(...): a method of Server
            recv = node.child_by_field_name("receiver")
            m = re.search(r"\(\s*(?:\w+\s+)?\*?\s*(\w+)", _text(recv)) if recv is not None else None
            if m:
                scope, kind = [*scope, m.group(1)], "method"
        d = self._make(node, outer, name, scope, kind, body)
        if kind == "class" and body is not None:
            self.visit(body, [*scope, name.split("::")[-1]], True, d.children)
        return d

    def _make(self, node: Any, outer: Any, name: str, scope: list[str], kind: str, body: Any) -> _Def:
        start = _comment_start(outer) if self.lang != "python" else outer.start_point.row
        end = node.end_point.row - (1 if node.end_point.column == 0 and node.end_point.row > node.start_point.row else 0)
        if body is not None and body.start_point.row > node.start_point.row and not _text(body).startswith("{"):
            sig_end = body.start_point.row - 1
        elif body is not None:
            sig_end = body.start_point.row
        else:
            sig_end = end
        src = node.text
        sig = src[: body.start_byte - node.start_byte] if body is not None else src
        # Each line as written (an outline quotes it verbatim), a multi-line signature on one line.
        signature = " ".join(ln.strip() for ln in sig.decode("utf-8", "replace").split("\n") if ln.strip())[:240].rstrip(" {")
        parts = re.split(r"::|\.", name)
        short = parts[-1]
        qual = ".".join([*scope, *parts])
        header = self.lines[outer.start_point.row] if outer.start_point.row < len(self.lines) else ""
        if self.lang == "python" and outer is not node:  # decorators: show the `class` line itself
            header = self.lines[node.start_point.row]
        return _Def(kind, short, qual, start, end, sig_end, signature, _doc(node, outer, body, self.lang), header)


def _pieces(lines: list[str], start: int, end: int, prefix: list[str], cont: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, text) pieces of rows start..end, each at most PIECE_LINES long after the first."""
    if end - start + 1 <= MAX_DEF_LINES:
        return [(start, end, "\n".join([*prefix, *lines[start : end + 1]]))]
    out = [(start, start + PIECE_LINES - 1, "\n".join([*prefix, *lines[start : start + PIECE_LINES]]))]
    s = start + PIECE_LINES
    while s <= end:
        e = min(end, s + PIECE_LINES - 1)
        out.append((s, e, "\n".join([*prefix, *cont, *lines[s : e + 1]])))
        s = e + 1
    return out


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


class _Builder:
    def __init__(self, lines: list[str]):
        self.lines = lines
        self.chunks: list[Chunk] = []
        self.symbols: list[Symbol] = []

    def add(self, d: _Def, headers: list[str]) -> None:
        lines = self.lines
        if d.kind == "class" and d.children:
            keep: list[str] = []
            skip_until = -1
            kids = {c.start: c for c in d.children}
            for r in range(d.start, d.end + 1):
                if r <= skip_until:
                    continue
                keep.append(lines[r])
                c = kids.get(r)
                if c is not None and c.end > c.sig_end:
                    keep.extend(lines[r + 1 : c.sig_end + 1])
                    nxt = lines[c.sig_end + 1] if c.sig_end + 1 < len(lines) else ""
                    keep.append(_indent(nxt or lines[r] + "    ") + "...")
                    skip_until = c.end
            first = len(self.chunks)
            cont = [keep[0], _indent(keep[1] if len(keep) > 1 else "    ") + "..."]
            for i in range(0, len(keep), MAX_DEF_LINES):
                body = keep[i : i + MAX_DEF_LINES]
                text = "\n".join([*headers, *(cont if i else []), *body])
                self.chunks.append(Chunk(d.start + 1, d.end + 1, "class", d.qualname, text))
            self._symbol(d, first)
            for c in d.children:
                self.add(c, [*headers, d.header])
            return
        first = len(self.chunks)
        cont = [lines[d.start] if d.start == d.sig_end else d.header, _indent(lines[min(d.sig_end + 1, d.end)]) + "..."]
        for s, e, text in _pieces(lines, d.start, d.end, headers, cont):
            self.chunks.append(Chunk(s + 1, e + 1, d.kind, d.qualname, text))
        self._symbol(d, first)

    def _symbol(self, d: _Def, chunk: int) -> None:
        self.symbols.append(Symbol(d.name, d.qualname, d.kind, d.signature, d.doc, d.start + 1, d.end + 1, chunk))

    def windows(self, rows: list[int], kind: str) -> None:
        """Line windows over `rows` (sorted 0-based row numbers), split at gaps and every WINDOW_LINES."""
        run: list[int] = []
        for r in rows:
            if run and (r != run[-1] + 1 or len(run) >= WINDOW_LINES):
                self._window(run, kind)
                run = []
            run.append(r)
        if run:
            self._window(run, kind)

    def _window(self, run: list[int], kind: str) -> None:
        text = "\n".join(self.lines[run[0] : run[-1] + 1])
        if _EIGHT_ALNUM.match(text):
            self.chunks.append(Chunk(run[0] + 1, run[-1] + 1, kind, "", text))


def chunk_file(path: str, text: str) -> tuple[list[Chunk], list[Symbol]]:
    """Chunks and symbols of one file (`text` with any line endings)."""
    text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    b = _Builder(lines)
    lang = language_for(path)
    if lang is None:
        b.windows(list(range(len(lines))), "text")
        return b.chunks, b.symbols
    tree = parser_for(lang).parse(text.encode("utf-8"))
    col = _Collector(lang, lines)
    defs: list[_Def] = []
    col.visit(tree.root_node, [], False, defs)
    covered = bytearray(len(lines))
    for d in defs:
        b.add(d, [])
        covered[d.start : d.end + 1] = b"\1" * (d.end + 1 - d.start)
    n_def_chunks = len(b.chunks)
    b.windows([r for r in range(len(lines)) if not covered[r]], "module")
    # Variables point at the window (or definition) that holds their line.
    for name, qual, s, e in col.variables:
        idx = next((i for i in range(n_def_chunks, len(b.chunks)) if b.chunks[i].start <= s + 1 <= b.chunks[i].end), None)
        if idx is None:
            idx = next((i for i, c in enumerate(b.chunks[:n_def_chunks]) if c.start <= s + 1 <= c.end), None)
        if idx is not None:
            line = lines[s].strip()
            b.symbols.append(Symbol(name, qual, "variable", line[:240], "", s + 1, e + 1, idx))
    return b.chunks, b.symbols


def parse_only(path: str, text: str) -> None:
    """Parse without chunking: the baseline the benchmark compares indexing time against."""
    lang = language_for(path)
    if lang is not None:
        parser_for(lang).parse(text.replace("\r\n", "\n").encode("utf-8"))
