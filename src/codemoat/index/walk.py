"""Which files of a repository get indexed, and their text.

`git ls-files` where the folder is a git work tree (tracked files plus untracked ones git does not
ignore), else a walk that honours `.gitignore` files. Skipped, because they are noise in a prompt and
cost memory: vendored and generated folders, binaries, files over `MAX_BYTES`, minified files and
files with very long lines, lock files and generated code, and file types that are neither code
nor prose. Paths are yielded one at a time; text is read one file at a time (bounded memory).

Nothing outside the repository's root is ever read, whatever the listing says (`git ls-files` lists
committed symlinks as files). A path is opened one component at a time from a descriptor of the
root (`openat` with `O_NOFOLLOW`), so a symlink anywhere on the way is refused, not followed — to a
file or a folder, outside the root or inside it (a link that stays inside is skipped: its target
is indexed once, under the target's own path). `..` components, device files, FIFOs and sockets,
folders on another filesystem (a mount inside the repository) and folders of another indexed
repository are refused too. The opened descriptor's device and inode must equal those of the
entry checked just before, so a file swapped for a link between check and open is refused. A hard
link is the file itself by every path, so it cannot be told from a file that belongs here: any
file with more than one link is refused ("hard link"); git never creates hard links in a work tree.
`RepoReader.read` says why it refused; `index add|update` name the refused paths in their summary.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CodemoatError
from .chunk import language_for

MAX_BYTES = 1_000_000
MAX_LINE = 1_000  # a line longer than this means minified or generated content
MAX_MEAN_LINE = 200

SKIP_DIRS = frozenset(
    """
    .git .hg .svn node_modules vendor vendors third_party third-party bower_components __pycache__
    .venv venv .tox .nox .mypy_cache .pytest_cache .ruff_cache dist build target .next .nuxt .idea
    .vscode .gradle site-packages Pods .cache coverage htmlcov .eggs generated __generated__
    """.split()
)
SKIP_NAMES = frozenset(
    "package-lock.json yarn.lock pnpm-lock.yaml Cargo.lock poetry.lock Pipfile.lock composer.lock "
    "go.sum uv.lock Gemfile.lock".split()
)
SKIP_SUFFIXES = (".min.js", ".min.css", ".map", "_pb2.py", "_pb2_grpc.py", ".pb.go", ".pb.cc", ".pb.h", ".designer.cs")
# Text files that are not parsed by tree-sitter but still worth line windows.
TEXT_EXTS = frozenset(
    """
    md rst txt toml yaml yml json cfg ini conf sh bash zsh sql html htm css scss less vue svelte swift
    scala lua r pl pm ex exs erl hs ml mli proto graphql gql gradle xml tf hcl dart jl m mm clj nim zig
    cmake mk properties env
    """.split()
)
TEXT_NAMES = frozenset({"Makefile", "Dockerfile", "Jenkinsfile", "README", "CMakeLists.txt", "Rakefile", "Gemfile"})


def is_indexable_name(rel: str) -> bool:
    """By path alone: a code or text file outside skipped folders."""
    parts = rel.split("/")
    if any(p in SKIP_DIRS for p in parts[:-1]):
        return False
    name = parts[-1]
    if name in SKIP_NAMES or name.endswith(SKIP_SUFFIXES):
        return False
    if language_for(name) is not None or name in TEXT_NAMES:
        return True
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext in TEXT_EXTS


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device file"),
    (stat.S_ISBLK, "a device file"),
)


class Refused(str):
    """Why a path was not read (a symlink, `..`, a device…); it is never opened."""


FOLDER = Refused("a folder")  # a submodule or nested repository listed by git: not a file, not reported
GONE = Refused("no longer there")  # tracked by git but deleted from the work tree: not reported


class TooLarge(Exception):
    pass


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


class RepoReader:
    """Reads files strictly inside one root, from a descriptor of it; use as a context manager.

    `read(rel)` returns the bytes, `None` for a file over MAX_BYTES or gone, or a `Refused` reason."""

    def __init__(self, root: Path, other_roots: Sequence[Path] = ()):
        self.root = Path(root)
        try:
            self._fd = os.open(self.root, _DIR_FLAGS)
        except OSError as e:
            raise CodemoatError(
                f"cannot open repository folder {root}: {e.strerror or e} (a symlinked root is not followed: index its target)"
            ) from None
        self._dev = os.fstat(self._fd).st_dev
        # Only repositories inside this one: their files belong to their own groups, not to ours.
        self._others = [Path(o) for o in other_roots if self.root in Path(o).parents]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RepoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _inside_other(self, rel: str) -> Path | None:
        full = self.root / rel
        return next((o for o in self._others if full == o or o in full.parents), None)

    def _parent(self, parts: list[str]) -> int | Refused:
        """A descriptor of the folder holding the last part (the caller closes it), or why not."""
        fd = os.dup(self._fd)
        for i, part in enumerate(parts[:-1]):
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                os.close(fd)
                where = "/".join(parts[: i + 1])
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    return Refused(f"{where} is a symlink or not a folder (never followed)")
                return GONE if e.errno == errno.ENOENT else Refused(f"{where}: {e.strerror}")
            os.close(fd)
            fd = nfd
            if os.fstat(fd).st_dev != self._dev:
                os.close(fd)
                return Refused(f"{'/'.join(parts[: i + 1])} is another filesystem (a mount inside the repository)")
        return fd

    def check(self, rel: str) -> Refused | None:
        """Why `rel` may not be read (by its path and its entry's type), or None."""
        got = self._lstat(rel)
        return got if isinstance(got, Refused) else None

    def _lstat(self, rel: str) -> tuple[int, os.stat_result] | Refused:
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            return Refused("path has '..', '.' or empty components, or is absolute")
        other = self._inside_other(rel)
        if other is not None:
            return Refused(f"inside another indexed repository ({other})")
        fd = self._parent(parts)
        if isinstance(fd, Refused):
            return fd
        try:
            st = os.lstat(parts[-1], dir_fd=fd)
        except OSError as e:
            os.close(fd)
            return GONE if e.errno == errno.ENOENT else Refused(f"cannot stat: {e.strerror}")
        why = _refuse_entry(self.root, rel, st)
        if why is not None:
            os.close(fd)
            return why
        return fd, st

    def read(self, rel: str) -> bytes | Refused | None:
        got = self._lstat(rel)
        if isinstance(got, Refused):
            return got
        fd, st = got
        try:
            if st.st_size > MAX_BYTES:
                return None
            try:
                ffd = os.open(rel.rsplit("/", 1)[-1], _FILE_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return Refused("became a symlink while being indexed (never followed)")
                return None
        finally:
            os.close(fd)
        try:
            fst = os.fstat(ffd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
                return Refused("was replaced while being indexed")
            if fst.st_nlink > 1:
                return Refused(f"hard link ({fst.st_nlink} links: it may be a file outside the repository)")
            return _read_fd(ffd)
        except TooLarge:
            return None
        finally:
            os.close(ffd)


def _refuse_entry(root: Path, rel: str, st: os.stat_result) -> Refused | None:
    if stat.S_ISLNK(st.st_mode):
        try:
            target = (root / rel).resolve()
        except (OSError, RuntimeError):
            return Refused("symlink (never followed)")
        if target == root or root in target.parents:
            return Refused("symlink inside the repository (never followed; its target is indexed under its own path)")
        return Refused("symlink to outside the repository (never followed)")
    if stat.S_ISDIR(st.st_mode):
        return FOLDER
    if not stat.S_ISREG(st.st_mode):
        return Refused(_kind(st.st_mode))
    if st.st_nlink > 1:
        return Refused(f"hard link ({st.st_nlink} links: it may be a file outside the repository)")
    return None


def _read_fd(fd: int) -> bytes:
    out, size = [], 0
    while True:
        block = os.read(fd, 1 << 20)
        if not block:
            return b"".join(out)
        size += len(block)
        if size > MAX_BYTES:
            raise TooLarge
        out.append(block)


def read_bytes(path: Path) -> bytes | None:
    """The bytes of a regular file no larger than MAX_BYTES, else None (its last component is
    never followed if a symlink; `RepoReader` checks every component against a root)."""
    path = Path(path)
    try:
        with RepoReader(path.parent) as r:
            got = r.read(path.name)
    except (OSError, ValueError, CodemoatError):
        return None
    return None if isinstance(got, Refused) else got


def decode(raw: bytes) -> str | None:
    """The text of a file worth indexing, or None for binaries, minified or generated files."""
    if b"\0" in raw[:8192]:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        if sum(c < 0x09 or 0x0E <= c < 0x20 for c in raw[:4096]) > 8:
            return None
        text = raw.decode("latin-1")
    lines = text.count("\n") + 1
    if len(text) / lines > MAX_MEAN_LINE:
        return None
    head = text[:2000]
    if "@generated" in head or "DO NOT EDIT" in head or "Code generated by" in head:
        return None
    if len(text) > MAX_LINE and max(map(len, text.split("\n"))) > MAX_LINE:
        return None
    return text


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.decode("utf-8", "replace") if out.returncode == 0 else None


def git_remote(root: Path) -> str | None:
    """The `origin` remote URL of a git work tree, if any."""
    url = _git(root, "config", "--get", "remote.origin.url")
    return url.strip() or None if url else None


def is_git_worktree(root: Path) -> bool:
    out = _git(root, "rev-parse", "--show-toplevel")
    return out is not None and Path(out.strip()).resolve() == root.resolve()


class _Ignore:
    """The `.gitignore` rules in force in one folder (a common subset of gitignore(5))."""

    def __init__(self, parent: _Ignore | None, base: str, lines: Sequence[str]):
        self.parent, self.base = parent, base
        self.rules: list[tuple[str, bool, bool, bool]] = []  # pattern, negate, dir_only, anchored
        for line in lines:
            line = line.rstrip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            if neg:
                line = line[1:]
            dir_only = line.endswith("/")
            line = line.strip("/") if dir_only else line
            anchored = "/" in line.lstrip("/") or line.startswith("/")
            self.rules.append((line.lstrip("/"), neg, dir_only, anchored))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        verdict = self.parent.ignored(rel, is_dir) if self.parent else False
        sub = rel[len(self.base) + 1 :] if self.base else rel
        name = sub.rsplit("/", 1)[-1]
        for pat, neg, dir_only, anchored in self.rules:
            if dir_only and not is_dir:
                continue
            target = sub if anchored else name
            if fnmatch.fnmatchcase(target, pat) or (anchored and fnmatch.fnmatchcase(target, pat + "/**")):
                verdict = not neg
        return verdict


def _walk(root: Path) -> Iterator[str]:
    """Paths under `root` that `.gitignore` files do not exclude: files, and every symlink or special
    entry (never entered or followed; yielded so that the reader names them as refused)."""

    def visit(folder: Path, rel: str, rules: _Ignore | None) -> Iterator[str]:
        gi = folder / ".gitignore"
        try:
            if stat.S_ISREG(os.lstat(gi).st_mode):  # a symlinked or special .gitignore is not read
                rules = _Ignore(rules, rel, (read_bytes(gi) or b"").decode("utf-8", "replace").splitlines())
        except OSError:
            pass
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            child = f"{rel}/{e.name}" if rel else e.name
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                if e.name in SKIP_DIRS or (rules and rules.ignored(child, True)):
                    continue
                yield from visit(Path(e.path), child, rules)
            elif not (rules and rules.ignored(child, False)):
                yield child

    yield from visit(root, "", None)


@dataclass
class Listing:
    """What `scan` found: the paths to read, and the paths refused with the reason for each."""

    paths: list[str]
    refused: dict[str, str] = field(default_factory=dict)


def _skipped_folder(rel: str) -> bool:
    return any(p in SKIP_DIRS for p in rel.split("/")[:-1])


def scan(root: Path, include: Sequence[str] = (), exclude: Sequence[str] = (),
         other_roots: Sequence[Path] = ()) -> Listing:  # fmt: skip
    """Repository-relative POSIX paths to index, sorted, and those refused as unsafe (symlinks, `..`,
    special files, hard links, other repositories' folders), each with its reason.

    `include`/`exclude` are shell globs matched against the relative path (`*.py`, `tests/*`).
    Paths are only checked here; `RepoReader.read` checks again as it opens each one."""
    root = root.resolve()
    out: Iterator[str]
    if is_git_worktree(root):
        listed = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
        out = iter(p for p in (listed or "").split("\0") if p)
    else:
        out = _walk(root)
    keep: set[str] = set()
    refused: dict[str, str] = {}
    with RepoReader(root, other_roots) as reader:
        for rel in out:
            if rel.endswith("/") or _skipped_folder(rel):  # "sub/": an untracked nested repository
                continue
            if include and not any(fnmatch.fnmatchcase(rel, g) for g in include):
                continue
            if exclude and any(fnmatch.fnmatchcase(rel, g) for g in exclude):
                continue
            why = reader.check(rel)
            if why is FOLDER or why is GONE:
                continue
            if why is not None:
                # A link or special entry is named whatever its name; a hard-linked non-code file is noise.
                if is_indexable_name(rel) or not why.startswith("hard link"):
                    refused[rel] = str(why)
                continue
            if is_indexable_name(rel):
                keep.add(rel)
    return Listing(sorted(keep), dict(sorted(refused.items())))


def list_files(root: Path, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
    """Repository-relative POSIX paths to index, sorted (paths only: text is read later, one at a time)."""
    return scan(root, include, exclude).paths
