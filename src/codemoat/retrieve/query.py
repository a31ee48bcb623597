"""What to look for at a cursor: the identifiers in use and the text around it.

Two signals, as in the repository-level completion literature:
- the last lines before the cursor as a bag of words for BM25 (CrossCodeEval, Ding et al. 2023;
  RepoCoder, Zhang et al. 2023, use the preceding lines as the retrieval query);
- the identifiers in use (imports, called names, attribute chains, type names) looked up in the
  symbol table, as RepoFuse and Tabby's declaration lookup do. Names imported but not yet used are
  the likeliest to be used next, so they weigh more; names defined in the file itself weigh less
  (their definitions are already in the prompt).
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass, field

from ..index.terms import STOPWORDS, split_identifier, terms

WINDOW_LINES = 12  # prefix lines used as the BM25 query and for weighting identifiers
SUFFIX_LINES = 3
MAX_TERMS = 48

_BUILTINS = frozenset(
    """
    print len range str int dict list set tuple isinstance issubclass getattr setattr hasattr super
    object type open min max sum any all map filter zip enumerate sorted reversed repr format iter
    next abs round id hash callable vars dir bytes float bool self cls none true false console log
    require exports module window document undefined null this fmt err error errors make append
    string println printf strings nil std vec string_view size_t auto var let const
    """.split()
)
_IDENT = re.compile(r"[^\W\d]\w*")
# The client's prefix and suffix (and an indexed file's imports, in outlines.py) are read by these
# patterns, so each must cost time linear in the text, whatever it holds: a name starts only where no
# word character precedes it (else a long run of letters with no "(" after it is tried from each of
# its letters: quadratic), runs that cannot give anything back are possessive, a line's indentation
# is `[^\S\n]*` (`\s*` after `^` also swallows every following blank line: quadratic in blank lines),
# and a bracketed list stops at the next opening bracket, an import's names at the next `import`.
_CALL = re.compile(r"(?<!\w)([^\W\d]\w*+)\s*+\(")
_CHAIN = re.compile(r"(?<!\w)([^\W\d]\w*+(?:\s*+(?:\.|::|->)\s*+[^\W\d]\w*+)++)")
_OWNER = re.compile(r"(?<!\w)([^\W\d]\w*+)\s*+(?:\.|::|->)\s*+$")  # the cursor right after `owner.`
_DEF = re.compile(
    r"^[^\S\n]*(?:async\s+)?(?:def|class|function|func|fn|struct|interface|type|enum|trait)\s+(?:\([^()]*\)\s*)?([^\W\d]\w*)",
    re.M,
)

_PY_FROM = re.compile(r"^[^\S\n]*from\s+([.\w]+)\s+import\s+(\([^()]*\)|[^\n#]+)", re.M)
_PY_IMPORT = re.compile(r"^[^\S\n]*import\s+([\w.]+(?:\s+as\s+\w+)?(?:\s*,\s*[\w.]+(?:\s+as\s+\w+)?)*)", re.M)
_JS_IMPORT = re.compile(r"\bimport\s++(?:type\s++)?+((?:(?!\bimport\s|from\s*['\"])[^'\";])*+)from\s*+['\"]([^'\"]++)['\"]")
_JS_REQUIRE = re.compile(r"(?:const|let|var)\s+(\{[^{}]*\}|\w+)\s*=\s*require\(\s*['\"]([^'\"]+)['\"]\s*\)")
_GO_IMPORT = re.compile(r"^[^\S\n]*(?:import\s+)?(\w+\s+)?\"([\w./\-]+)\"\s*$", re.M)
_JVM_IMPORT = re.compile(r"^[^\S\n]*import\s+(?:static\s+)?([\w.]+)[^\S\n]*+;?[^\S\n]*+$", re.M)
_RUST_USE = re.compile(r"^[^\S\n]*(?:pub\s+)?use\s+([\w:]+?)(?:::\{([^{}]*)\})?\s*;", re.M)
_PHP_USE = re.compile(r"^[^\S\n]*use\s+([\w\\]+)(?:\s+as\s+(\w+))?\s*;", re.M)
_FAMILY = {
    "py": "py", "pyi": "py", "js": "js", "mjs": "js", "cjs": "js", "jsx": "js", "ts": "js", "mts": "js", "cts": "js",
    "tsx": "js", "vue": "js", "svelte": "js", "go": "go", "java": "jvm", "kt": "jvm", "kts": "jvm", "scala": "jvm",
    "rs": "rust", "php": "php",
    # Their includes name files, not definitions: nothing to read here.
    "c": "", "h": "", "cc": "", "cpp": "", "cxx": "", "hpp": "", "hh": "", "cs": "", "rb": "",
}  # fmt: skip
_INCLUDE = re.compile(r"^[^\S\n]*#\s*include\s+\"([^\"]+)\"|^[^\S\n]*require(?:_relative)?\s+['\"]([^'\"]+)['\"]", re.M)


@dataclass
class Query:
    """Identifiers with weights, module hints per name, BM25 terms."""

    weights: dict[str, float] = field(default_factory=dict)
    hints: dict[str, set[str]] = field(default_factory=dict)  # name -> path fragments of modules it comes from
    qualified: dict[str, set[str]] = field(default_factory=dict)  # name -> owners seen as Owner.name
    bm25_terms: list[str] = field(default_factory=list)
    path_hints: set[str] = field(default_factory=set)  # modules imported by the file
    owner: str | None = None  # the cursor follows `owner.`: an attribute of owner comes next
    owner_module: str | None = None  # owner is an imported module: its path fragment
    owner_hints: set[str] = field(default_factory=set)  # owner is an imported name: modules it comes from
    member_weights: dict[str, float] = field(default_factory=dict)  # owner.attr seen elsewhere in the file
    cursor_words: frozenset[str] = frozenset()  # words of the identifiers on the cursor's line, before it
    expects: str | None = None  # what the syntax at the cursor wants: "exception" after raise, "predicate" after if
    cache: dict = field(default_factory=dict)  # per-query results shared by the rankings

    def relative_to_package(self, package: str) -> None:
        """Module paths as the repository spells them when its root folder is the package `package`:
        `typer/core` -> `core`, `typer` -> `` (the root `__init__`)."""

        def rel(frag: str) -> str:
            if frag == package:
                return ""
            return frag[len(package) + 1 :] if frag.startswith(package + "/") else frag

        self.hints = {n: {rel(f) for f in fs} for n, fs in self.hints.items()}
        self.path_hints = {rel(f) for f in self.path_hints}
        self.owner_hints = {rel(f) for f in self.owner_hints}
        if self.owner_module is not None:
            self.owner_module = rel(self.owner_module)

    def name_match(self, name: str) -> float:
        """The share of `name`'s words that the cursor's line already says (`request = ` ~ `Request`,
        `conn = ` ~ `HTTPConnection`): what a line is about names what it calls."""
        if not self.cursor_words:
            return 0.0
        parts = split_identifier(name)
        words = parts[1:] if len(parts) > 1 else parts
        if not words:
            return 0.0
        hit = sum(1 for w in words if w in self.cursor_words or (len(w) >= 3 and any(
            len(c) >= 3 and (w.startswith(c) or c.startswith(w)) for c in self.cursor_words)))  # fmt: skip
        return hit / len(words)

    def fits(self, kind: str, name: str, signature: str) -> bool:
        """Whether a definition is what the syntax at the cursor expects (an exception class after
        `raise`, a test after `if`), as an IDE ranks completions by the expected type."""
        if self.expects == "exception":
            return kind in ("class", "type") and bool(_EXCEPTION.search(signature))
        if self.expects == "predicate":
            return kind in ("function", "method") and bool(_PREDICATE_SIG.search(signature) or _PREDICATE_NAME.match(name))
        return False

    def add(self, name: str, w: float) -> None:
        if len(name) > 1 and name.lower() not in STOPWORDS and name not in _BUILTINS:
            self.weights[name] = self.weights.get(name, 0.0) + w


def _module_path(module: str, current: str) -> str:
    """`.utils` seen from `pkg/sub/a.py` -> `pkg/sub/utils`; `a.b` -> `a/b`; `./x` -> `dir/x`."""
    here = posixpath.dirname(current)
    if module.startswith("."):
        if "/" in module:  # JS relative path
            return posixpath.normpath(posixpath.join(here, module))
        dots = len(module) - len(module.lstrip("."))
        base = here
        for _ in range(dots - 1):
            base = posixpath.dirname(base)
        rest = module[dots:].replace(".", "/")
        return posixpath.join(base, rest) if rest else base
    if module.startswith("/"):
        return module.lstrip("/")
    return module.replace("::", "/").replace("\\", "/").replace(".", "/")


def _imports(prefix: str, path: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """(imported name -> module path fragments, alias -> module path) from the import statements of
    the file's language (all of them when its extension is unknown: some patterns cost milliseconds)."""
    names: dict[str, set[str]] = {}
    modules: dict[str, str] = {}

    def name(n: str, mod: str) -> None:
        n = n.strip()
        if n and n != "*":
            names.setdefault(n, set()).add(mod)

    fam = _FAMILY.get(path.rsplit(".", 1)[-1].lower()) if "." in path.rsplit("/", 1)[-1] else None
    on = {fam} if fam is not None else {"py", "js", "go", "jvm", "rust", "php"}  # unknown file type: every syntax
    for m in _PY_FROM.finditer(prefix) if "py" in on else ():
        mod = _module_path(m.group(1), path)
        for part in m.group(2).strip("() \n").split(","):
            bits = part.split()
            if not bits:
                continue
            if len(bits) == 3 and bits[1] == "as":
                name(bits[0], mod)
                modules[bits[2]] = posixpath.join(mod, bits[0])
                names.setdefault(bits[2], set()).add(mod)
            else:
                name(bits[0], mod)
                modules.setdefault(bits[0], posixpath.join(mod, bits[0]))  # `from pkg import submodule`
    for m in _PY_IMPORT.finditer(prefix) if "py" in on else ():
        for part in m.group(1).split(","):
            bits = part.split()
            if not bits:
                continue
            mod = _module_path(bits[0], path)
            alias = bits[2] if len(bits) == 3 else bits[0].split(".")[0]
            modules[alias] = mod if len(bits) == 3 else alias
    for m in _JS_IMPORT.finditer(prefix) if "js" in on else ():
        mod = _module_path(m.group(2), path)
        spec = m.group(1).rstrip()
        for inner in re.findall(r"\{([^{}]*)\}", spec):
            for part in inner.split(","):
                bits = part.split()
                if bits:
                    name(bits[0], mod)
                    if len(bits) == 3:
                        names.setdefault(bits[2], set()).add(mod)
        outer = re.sub(r"\{[^{}]*\}", "", spec)
        star = re.search(r"\*\s+as\s+(\w+)", outer)
        if star:
            modules[star.group(1)] = mod
        else:
            for n in re.findall(r"\w+", outer):
                name(n, mod)
                modules[n] = mod
    for m in _JS_REQUIRE.finditer(prefix) if "js" in on else ():
        mod = _module_path(m.group(2), path)
        if m.group(1).startswith("{"):
            for n in re.findall(r"\w+", m.group(1)):
                name(n, mod)
        else:
            modules[m.group(1)] = mod
    for m in _GO_IMPORT.finditer(prefix) if "go" in on else ():
        pkg = m.group(2)
        alias = (m.group(1) or "").strip() or pkg.rsplit("/", 1)[-1]
        modules[alias] = pkg
    for m in _JVM_IMPORT.finditer(prefix) if "jvm" in on else ():
        full = m.group(1)
        if "." in full:
            mod, _, last = full.rpartition(".")
            name(last, _module_path(full, path))
            name(last, _module_path(mod, path))
    for m in _RUST_USE.finditer(prefix) if "rust" in on else ():
        base = m.group(1).replace("crate::", "").replace("super::", "").replace("self::", "")
        if m.group(2):
            for part in m.group(2).split(","):
                name(part.split(" as ")[0].strip(), _module_path(base, path))
        else:
            mod, _, last = base.rpartition("::")
            name(last, _module_path(mod, path))
    for m in _PHP_USE.finditer(prefix) if "php" in on else ():
        mod, _, last = m.group(1).rpartition("\\")
        name(m.group(2) or last, _module_path(mod, path))
    return names, modules


_RAISE = re.compile(r"(?:^|[^\w.])(?:raise|throw)\s+(?:new\s+)?(?:[^\W\d]\w*\s*(?:\.|::)\s*)*$")
# `\s+` then `\(?\s*`: two runs of the same spaces one after the other, tried at every split (quadratic in
# the spaces after "if" on the cursor's line), hence possessive; only whether it matches is read.
_TEST = re.compile(
    r"(?:(?:^|[^\w.])(?:if|elif|while|and|or|not|assert)\s++|&&\s*+|\|\|\s*+|!)\(?+\s*+(?:[^\W\d]\w*+\s*+(?:\.|::)\s*+)*+$"
)
_EXCEPTION = re.compile(r"(?:Error|Exception|Exit|Abort|Warning|Interrupt|Fault)\b")
_PREDICATE_SIG = re.compile(r"(?:->|:)\s*(?:bool|boolean|TypeGuard\b|TypeIs\b)\b")
_PREDICATE_NAME = re.compile(r"_?(?:is|has|can|should|needs?|supports?|contains|check)(?:_|[A-Z]|$)")
_IMPORT_START = re.compile(r"\s*+(from|import|use|using|#\s*include|require)\b")


def _import_lines(lines: list[str]) -> set[int]:
    """Indexes of the lines that belong to import statements (parenthesised ones included)."""
    out: set[int] = set()
    inside = False
    for i, ln in enumerate(lines):
        if inside or _IMPORT_START.match(ln):
            out.add(i)
            if not inside and "(" in ln and ")" not in ln:
                inside = True
            elif inside and ")" in ln:
                inside = False
    return out


def completion_query(prefix: str, suffix: str, path: str) -> Query:
    """The query for a completion at the end of `prefix` in file `path`."""
    q = Query()
    lines = prefix.split("\n")
    window = lines[-WINDOW_LINES:]
    after = suffix.split("\n")[:SUFFIX_LINES]
    imported, modules = _imports(prefix, path)
    local = set(_DEF.findall(prefix)) | set(_DEF.findall(suffix))

    import_lines = _import_lines(lines)
    used_before: dict[str, int] = {}
    last_used: dict[str, int] = {}  # name -> the last line (0-based) that uses it, imports aside
    for i, ln in enumerate(lines[:-WINDOW_LINES] if len(lines) > WINDOW_LINES else []):
        if i not in import_lines:
            for ident in _IDENT.findall(ln):
                used_before[ident] = used_before.get(ident, 0) + 1
                last_used[ident] = i

    # Identifiers near the cursor, the nearest weighing most: bare names and calls (their definitions
    # tell the model signatures), attributes of unknown receivers barely (`self.x` could be anything).
    n = len(window)
    for i, ln in enumerate(window):
        if i + len(lines) - n in import_lines:
            continue
        rec = 1.0 + 2.0 * (i + 1) / n
        attrs: dict[str, float] = {}
        for chain in _CHAIN.findall(ln):
            parts = re.split(r"\s*(?:\.|::|->)\s*", chain)
            for owner, attr in zip(parts, parts[1:], strict=False):
                q.qualified.setdefault(attr, set()).add(owner)
                if owner in modules:
                    q.hints.setdefault(attr, set()).add(modules[owner])
                    attrs[attr] = 0.3 * rec
                else:
                    attrs.setdefault(attr, 0.05 * rec)
        for ident in _IDENT.findall(ln):
            if ident in modules:
                continue
            q.add(ident, attrs.get(ident, 0.2 * rec))
        for ident in _CALL.findall(ln):
            if ident not in attrs:
                q.add(ident, 0.2 * rec)
    for ln in after:
        for ident in _IDENT.findall(ln):
            if ident not in modules:
                q.add(ident, 0.1)
    for i, ln in enumerate(window, len(lines) - len(window)):
        if i not in import_lines:
            for ident in _IDENT.findall(ln):
                used_before[ident] = used_before.get(ident, 0) + 1
                last_used[ident] = i
    suffix_lines = suffix.split("\n")[:200]
    first_in_suffix: dict[str, int] = {}
    for i, ln in enumerate(suffix_lines):
        for ident in _IDENT.findall(ln):
            first_in_suffix.setdefault(ident, i)
    # Imported names: those not used yet are the likeliest next, then those used in the last lines;
    # either the more so if used soon after the cursor; all carry the module they come from.
    for name, mods in imported.items():
        q.hints.setdefault(name, set()).update(mods)
        w = 3.0 if used_before.get(name, 0) == 0 else 0.5 + 0.25 * math.log1p(used_before[name])
        if name in last_used:
            w += 1.0 / (1.0 + (len(lines) - 1 - last_used[name]) / 10.0)
        if name in first_in_suffix:
            w += 1.0 / (1.0 + first_in_suffix[name] / 20.0)
        q.add(name, w)
    q.expects = "exception" if _RAISE.search(lines[-1]) else "predicate" if _TEST.search(lines[-1]) else None
    q.cursor_words = frozenset(t for ident in _IDENT.findall(lines[-1]) if ident not in modules for t in split_identifier(ident))
    # The cursor right after `owner.`: what comes next is a member of owner.
    m = _OWNER.search(lines[-1])
    if m:
        owner = m.group(1)
        q.owner = owner
        if owner in modules:
            q.owner_module = modules[owner]
        if owner in imported:
            q.owner_hints = set(imported[owner])
        member = re.compile(re.escape(owner) + r"\s*(?:\.|::|->)\s*([^\W\d]\w*)")
        for i, ln in enumerate(suffix_lines):
            for attr in member.findall(ln):
                q.member_weights[attr] = q.member_weights.get(attr, 0.0) + 1.0 / (1.0 + i / 20.0)
        for attr in member.findall(prefix):
            q.member_weights[attr] = q.member_weights.get(attr, 0.0) + 0.5
    for alias, mod in modules.items():
        q.path_hints.add(mod)
    for name in local:
        if name in q.weights:
            q.weights[name] *= 0.2
    q.path_hints.update(m for mods in imported.values() for m in mods)

    # BM25 query: the terms of the window, nearest lines first (RepoCoder/CrossCodeEval's last lines).
    seen: dict[str, None] = {}
    for ln in [*reversed(window), *after]:
        for t in terms(ln):
            seen.setdefault(t, None)
    q.bm25_terms = list(seen)[:MAX_TERMS]
    return q


def chat_query(text: str) -> Query:
    """The query for a question: code-looking words are looked up as symbols, every word feeds BM25."""
    q = Query()
    for ident in re.findall(r"`([^`]+)`", text):
        for part in _IDENT.findall(ident):
            q.add(part, 2.0)
    for ident in _IDENT.findall(text):
        if "_" in ident or re.search(r"[a-z][A-Z]", ident) or (ident[:1].isupper() and len(ident) > 2):
            q.add(ident, 1.0)
    for chain in _CHAIN.findall(text):
        parts = re.split(r"\s*(?:\.|::|->)\s*", chain)
        for owner, attr in zip(parts, parts[1:], strict=False):
            q.qualified.setdefault(attr, set()).add(owner)
            q.add(attr, 1.0)
    seen: dict[str, None] = {}
    for t in terms(text):
        seen.setdefault(t, None)
    q.bm25_terms = list(seen)[:MAX_TERMS]
    return q
