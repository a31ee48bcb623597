"""A plain folder's `.gitignore` rules, read and matched as git reads and matches them.

Git matches a rule with its own `wildmatch` (dir.c, wildmatch.c), not a shell glob: in a rule that holds a `/`,
`*`, `?` and `[...]` never match a `/` (only a `**` between slashes does), `\\` escapes any character, a `[` that
is not closed makes the rule match nothing, and it compares bytes, not characters. fnmatch did none of that: `a/*.py`
hid `a/b/c.py` from retrieval, `q\\*.py` did not hide `q*.py` (about half of random rule sets differed from git).
Here each rule becomes one regular expression (bytes) that matches exactly what git's wildmatch matches; the
differential test (tests/index/test_gitignore_differential.py) holds it to the `git` binary.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

#: rules in one compiled regex of a .gitignore's (`Ignore`)
IGNORE_CHUNK = 256

_STAR, _QMARK, _OPEN, _CLOSE, _BSLASH, _SLASH, _COLON = b"*?[]\\/:"
_ASCII = range(128)
_CLASSES = {  # [[:name:]], as git's own ctype has them (ASCII only; `space` without \v and \f)
    b"alnum": {c for c in _ASCII if chr(c).isalnum()},
    b"alpha": {c for c in _ASCII if chr(c).isalpha()},
    b"blank": set(b" \t"),
    b"cntrl": {*range(32), 127},
    b"digit": set(b"0123456789"),
    b"graph": set(range(33, 127)),
    b"lower": set(string.ascii_lowercase.encode()),
    b"print": set(range(32, 127)),
    b"punct": set(string.punctuation.encode()),
    b"space": set(b" \t\n\r"),
    b"upper": set(string.ascii_uppercase.encode()),
    b"xdigit": set(string.hexdigits.encode()),
}


def lines(raw: bytes) -> list[str]:
    """A `.gitignore` file's lines as git splits them: at `\\n` only (a form feed or `\\x85` inside a name is not a
    line break), one `\\r` before it dropped, a UTF-8 byte-order mark at the start skipped, a line cut at a NUL byte;
    bytes that are not UTF-8 kept as surrogates, as the walk keeps them in names, so that a rule still matches the
    name it was written for."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    return [ln.removesuffix(b"\r").split(b"\0", 1)[0].decode("utf-8", "surrogateescape") for ln in raw.split(b"\n")]


def _trim(line: str) -> str:
    """`line` without its trailing spaces, except one escaped by a backslash (`foo\\ `); tabs are kept (git's
    trim_trailing_spaces)."""
    last_space, i = None, 0
    while i < len(line):
        if line[i] == " ":
            last_space = i if last_space is None else last_space
        else:
            if line[i] == "\\":
                i += 1
                if i == len(line):
                    return line
            last_space = None
        i += 1
    return line if last_space is None else line[:last_space]


def _bracket(pat: bytes, i: int) -> tuple[bytes, int] | None:
    """The character class that starts after the `[` at `i - 1`, as a regex, and where the pattern goes on; None
    where git aborts the match (not closed, an unknown `[:name:]`). A faithful walk of wildmatch's loop: the first
    member may be `]`, `-` is a range only between two members, `\\` escapes, `[!`/`[^` negates, never `/`."""
    n = len(pat)
    if i >= n:
        return None
    negated = pat[i] in b"!^"
    if negated:
        i += 1
        if i >= n:
            return None
    members: set[int] = set()
    ch, prev = pat[i], 0
    close = -1  # the first `]` at or after the last `[:` looked at: found once, not again at each `[:` (quadratic)
    while True:
        if ch == _BSLASH:
            i += 1
            if i >= n:
                return None
            ch = pat[i]
            members.add(ch)
        elif ch == ord("-") and prev and i + 1 < n and pat[i + 1] != _CLOSE:
            i += 1
            ch = pat[i]
            if ch == _BSLASH:
                i += 1
                if i >= n:
                    return None
                ch = pat[i]
            members.update(range(prev, ch + 1))  # empty where reversed: git's `[z-a]` matches nothing
            ch = 0
        elif ch == _OPEN and i + 1 < n and pat[i + 1] == _COLON:
            s = i + 2
            if close < s:
                close = pat.find(b"]", s)
            if close < 0:
                return None
            k = close
            if k == s or pat[k - 1] != _COLON:  # no ":]": a plain `[`, read on from the `:`
                members.add(_OPEN)
                ch = _OPEN
            else:
                named = _CLASSES.get(pat[s : k - 1])
                if named is None:
                    return None
                members |= named
                i, ch = k, 0
        else:
            members.add(ch)
        prev = ch
        i += 1
        if i >= n:
            return None
        ch = pat[i]
        if ch == _CLOSE:
            break
    if negated:
        members = set(range(256)) - members
    members.discard(_SLASH)
    if not members:
        return b"(?!)", i + 1
    return b"[" + b"".join(re.escape(bytes([c])) for c in sorted(members)) + b"]", i + 1


_ANY_NAME, _ANY_FOLDERS, _ANYTHING = "*", "**/", "**"  # a `*`; a `**/` between slashes; a trailing `**`
#: bytes a path the walk yields holds at most: a folder it lists by its absolute path, which Linux caps at PATH_MAX
#: (4096, its NUL included), a `/` and a name (NAME_MAX, 255). A rule that needs more matches nothing: translated
#: as such, it costs no regex (a committed 1 MB rule of `**/a/` compiled to some 350 MB, held while the walk is below)
LONGEST_PATH = 4095 + 1 + 255


def translate(pat: bytes, start: int = 0) -> bytes | None:
    """A regex that matches a whole path exactly where git's wildmatch(`pat`, path, WM_PATHNAME) does, or None where
    the rule matches nothing. `start`: where git's match begins after the rule's literal prefix, which it compares
    apart: a `**` there counts as at the start (`a**/b` matches `a/x/b`, as in git). A rule no path of at most
    `LONGEST_PATH` bytes can match (each token not a star is one byte of it) matches nothing."""
    parts: list[bytes | str] = []  # literal runs (a regex each) and the three kinds of star
    i, n, fixed = 0, len(pat), 0
    while i < n:
        c = pat[i]
        if c == _STAR:
            j = i
            while j < n and pat[j] == _STAR:
                j += 1
            star = _ANY_NAME  # `*`, and a `**` not between slashes: never across a `/`
            if j - i > 1 and (i == start or pat[i - 1] == _SLASH) and (j == n or pat[j] == _SLASH or pat[j : j + 2] == b"\\/"):
                star = _ANY_FOLDERS if j < n and pat[j] == _SLASH else _ANYTHING
                j += star == _ANY_FOLDERS
            if not (parts and parts[-1] == _ANY_FOLDERS and star != _ANY_NAME):
                parts.append(star)
            elif star == _ANYTHING:  # `**/**` is `**`; `**/**/` is `**/`
                parts[-1] = star
            i = j
            continue
        if c == _QMARK:
            token = b"[^/]"
            i += 1
        elif c == _OPEN:
            got = _bracket(pat, i + 1)
            if got is None:
                return None
            token, i = got
        elif c == _BSLASH:
            if i + 1 == n:  # a trailing backslash: git's match aborts
                return None
            token = re.escape(pat[i + 1 : i + 2])
            i += 2
        else:
            token = re.escape(bytes([c]))
            i += 1
        fixed += 1
        if fixed > LONGEST_PATH:
            return None
        if parts and isinstance(parts[-1], bytes):
            parts[-1] += token
        else:
            parts.append(token)
    return _regex(parts)


def _regex(parts: list[bytes | str]) -> bytes:
    """The regex of a rule's parts, with no backtracking that grows as a power of the path's length (a committed
    `*a*a*a*a*a*a*b` or `**/a*/**/a*/**/a*/**/x` would otherwise hold the walk for years).

    Two facts make the first match the only one worth trying, so it is taken in an atomic group: after a `*`, the
    first place its literal run fits (a later place leaves the next `*` only more of one folder's name to cover, or,
    where the run holds a `/`, is no match at all); and before a `**/` or `**`, the earliest end of what follows the
    star before (it ends with a `/`: the next star covers what a later end would have). Only the last run is left
    free to backtrack, as it must end at the path's end."""
    pieces: list[tuple[str | None, list[bytes | str]]] = [(None, [])]  # split at each `**/` and `**`
    for part in parts:
        if part in (_ANY_FOLDERS, _ANYTHING):
            pieces.append((part, []))  # type: ignore[arg-type]
        else:
            pieces[-1][1].append(part)
    out = []
    for at, (lead, body) in enumerate(pieces):
        final = at == len(pieces) - 1
        run = []
        for k, part in enumerate(body):
            if part != _ANY_NAME:
                if not (k and body[k - 1] == _ANY_NAME):
                    run.append(part)
            elif k + 1 == len(body):
                run.append(b"[^/]*")
            elif final and k + 2 == len(body):
                run.append(b"[^/]*" + body[k + 1])  # type: ignore[operator]
            else:
                run.append(b"(?>[^/]*?" + body[k + 1] + b")")  # type: ignore[operator]
        rx = b"".join(run)  # type: ignore[arg-type]
        if lead is None:
            out.append(rx)
        elif final:
            out.append((b"(?:.*/)?" if lead == _ANY_FOLDERS else b".*") + rx)
        else:
            out.append(b"(?>" + (b"(?:.*?/)??" if lead == _ANY_FOLDERS else b".*?") + rx + b")")
    return b"".join(out)


def _literal_prefix(pat: bytes) -> int:
    """How many leading bytes git compares literally before wildmatch (simple_length)."""
    m = re.search(rb"[*?\[\\]", pat)
    return m.start() if m else len(pat)


class TooCostly(Exception):
    """A walk's matching went past its `Meter`'s budget; `base`: the folder of the `.gitignore` that cost the most."""

    def __init__(self, base: str):
        super().__init__(base)
        self.base = base


def rule_cost(pat: bytes) -> int:
    """What matching `pat` may cost for each byte of a path, in `Meter` units: 1, and for each star the fixed part
    of the rule it may try again at each byte (a literal byte 1, a bracket class 8: a class of 240 `[ab]`s after a
    star cost ~170 ms a 250-byte name under 950 such rules, where counting stars alone made it look like ordinary
    rules, a reviewer's finding)."""
    stars = pat.count(b"*")
    if not stars:
        return 1
    fixed, i, n = 0, 0, len(pat)
    while i < n:
        c = pat[i]
        if c == 0x2A:  # *
            i += 1
        elif c == 0x5C:  # an escaped byte
            fixed, i = fixed + 1, i + 2
        elif c == 0x5B and (end := pat.find(b"]", i + 2)) > 0:  # a class: [...]
            fixed, i = fixed + 8, end + 1
        else:
            fixed, i = fixed + 1, i + 1
    return 1 + stars * (1 + fixed)


class Meter:
    """The matching one walk may do, in units of about one byte compared (`rule_cost` a rule and a byte of the path
    it is tried on). What caps the rules compiled does not cap this: 99,000 rules like `**/dN/**/*.py` cost ~2.7 s a
    path 200 folders deep, so a committed tree of such paths held the walk for days (`walk.MAX_IGNORE_WORK`)."""

    def __init__(self, budget: int):
        self.left = budget
        self.spent: dict[str, int] = {}  # by the folder of the .gitignore that cost it

    def spend(self, base: str, units: int) -> None:
        self.spent[base] = self.spent.get(base, 0) + units
        self.left -= units
        if self.left < 0:
            raise TooCostly(max(self.spent, key=self.spent.__getitem__))


class Ignore:
    """The `.gitignore` rules in force in one folder, over those of the folders above it."""

    def __init__(self, parent: Ignore | None, base: str, lines: Sequence[str], meter: Meter | None = None):
        self.parent, self.base = parent, base
        self.meter = meter if meter is not None or parent is None else parent.meter
        self._base = base.encode("utf-8", "surrogateescape")
        self.rules: list[tuple[str, bool, bool, bool]] = []  # pattern, negate, dir_only, anchored
        for line in lines:
            if not line or line.startswith("#"):
                continue
            line = _trim(line)
            neg = line.startswith("!")
            line = line[1:] if neg else line  # `\!` and `\#` need nothing more: a backslash escapes what follows
            dir_only = line.endswith("/")
            line = line[:-1] if dir_only else line  # one `/`, as git: `a//` is the rule `a/`, which matches nothing
            anchored = "/" in line  # else matched against the name, in any folder below
            line = line[1:] if line.startswith("/") else line
            if line:
                self.rules.append((line, neg, dir_only, anchored))
        # Per kind of rule (matched against the path or the name; folders only or not), the rules last first, in
        # regexes of at most `IGNORE_CHUNK` rules, each rule a named group: the first regex that matches holds the
        # last rule of that kind that does (its first alternative that matches), and the latest of the kinds decides
        # (gitignore: the last matching rule wins). A rule at a time through fnmatch's cache (32,768 patterns) took
        # minutes a hundred files once a .gitignore had more; a run of same-signed rules at a time did too when
        # ignores and `!` rules alternated; and one regex of every rule costs, on a path no rule matches, time in
        # its number of groups at each alternative: quadratic (a reviewer: 2.3 s a path at 99,000 rules).
        self._kinds: list[tuple[bool, bool, list[Callable[[bytes], re.Match | None]]]] = []
        self._weights: list[list[int]] = []  # each chunk's units a byte of the path (`Meter`), beside `_kinds`
        for anchored in (False, True):
            for dir_only in (False, True):
                order = [k for k, (_p, _n, d, a) in enumerate(self.rules) if a == anchored and d == dir_only][::-1]
                chunks, weights = [], []
                for at in range(0, len(order), IGNORE_CHUNK):
                    alts, weight = [], 0
                    for k in order[at : at + IGNORE_CHUNK]:
                        pat = self.rules[k][0].encode("utf-8", "surrogateescape")
                        rx = translate(pat, _literal_prefix(pat) if anchored else 0)
                        if rx is not None:
                            alts.append(b"(?P<r%d>%s\\Z)" % (k, rx))
                            weight += rule_cost(pat)
                    if alts:
                        chunks.append(re.compile(b"|".join(alts), re.DOTALL).match)
                        weights.append(weight)
                if chunks:
                    self._kinds.append((anchored, dir_only, chunks))
                    self._weights.append(weights)

    def ignored(self, rel: str, is_dir: bool) -> bool:
        """Whether `rel` (a path from the repository's root, in this folder or below) is ignored: the deepest
        `.gitignore` with a rule that matches decides, by its last such rule. Raises `TooCostly` once the walk's
        `Meter` is spent."""
        chain: list[Ignore] = []  # the outermost folder's rules first, a deeper folder's override them
        node: Ignore | None = self
        while node is not None:  # not by recursion: a .gitignore in each of thousands of nested folders
            chain.append(node)
            node = node.parent
        path = rel.encode("utf-8", "surrogateescape")  # wildmatch compares bytes: `?` is one byte of `é`
        verdict = False
        for node in reversed(chain):
            sub = path[len(node._base) + 1 :] if node._base else path
            name = sub.rsplit(b"/", 1)[-1]
            last, units = -1, 0  # the node's last rule that matches; the work it took
            for (anchored, dir_only, chunks), weights in zip(node._kinds, node._weights):
                if is_dir or not dir_only:
                    target = sub if anchored else name
                    # the latest rules first: the first chunk that matches holds the last one
                    for match, weight in zip(chunks, weights):
                        units += weight * (len(target) + 1)
                        m = match(target)
                        if m is not None:
                            last = max(last, int(m.lastgroup[1:]))  # type: ignore[index]
                            break
            if units and node.meter is not None:
                node.meter.spend(node.base, units)
            if last >= 0:
                verdict = not node.rules[last][1]
        return verdict
