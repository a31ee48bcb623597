"""Collect a code corpus from directories and split it into training and held-out files.

The split is by file (a Python file is a module), chosen by a seeded hash of the relative path,
so the same seed always holds out the same modules and adding files does not reshuffle the rest.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CodemoatError
from ..paths import read_regular

#: source extensions read from a corpus directory
CODE_EXTENSIONS = {
    ".py",
    ".pyi",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".go",
    ".rs",
    ".java",
    ".js",
    ".ts",
    ".tsx",
    ".jsx",
    ".rb",
    ".sh",
    ".sql",
    ".kt",
    ".scala",
    ".cs",
    ".php",
    ".swift",
    ".lua",
}
#: directories never read: tests (a corpus of tests teaches the model test boilerplate and
#: leaks expected outputs), vendored packages, caches, version control
SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "site-packages",
    "dist-packages",
    ".git",
    ".hg",
    ".svn",
    "node_modules",
    ".venv",
    "venv",
    "build",
    "dist",
    "pydoc_data",
    "_bundled",
    ".tox",
    ".mypy_cache",
}
MAX_FILE_BYTES = 200_000  # generated tables (e.g. Unicode data) teach nothing about code
#: generated files (codec tables, parser tables) teach tables, not code
_GENERATED = re.compile(r"gencodec\.py|do not edit|auto-?generated", re.IGNORECASE)


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to its corpus root, with the root's name first ("python3.11/json/decoder.py")
    text: str


def collect(roots: list[Path]) -> list[SourceFile]:
    """Every readable code file under `roots`, sorted by path; raises if there are none."""
    files: list[SourceFile] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise CodemoatError(f"corpus directory not found: {root}")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if p.suffix not in CODE_EXTENSIONS or p.is_symlink():
                    continue
                try:  # a FIFO or device among the files is skipped, not waited on
                    raw = read_regular(p, "code file", MAX_FILE_BYTES).decode("utf-8")
                    text = raw.replace("\r\n", "\n").replace("\r", "\n")  # as read_text's universal newlines
                except (OSError, UnicodeDecodeError, CodemoatError):
                    continue
                if text.strip() and not _GENERATED.search(text[:600]):
                    files.append(SourceFile(f"{root.name}/{p.relative_to(root).as_posix()}", text))
    if not files:
        raise CodemoatError(f"no code files found under {', '.join(map(str, roots))}")
    files.sort(key=lambda f: f.path)
    return files


def split(files: list[SourceFile], heldout_fraction: float, seed: int) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, heldout): a file is held out when a seeded hash of its path falls below the fraction."""
    train, held = [], []
    for f in files:
        h = hashlib.sha256(f"{seed}:{f.path}".encode()).digest()
        (held if int.from_bytes(h[:8], "big") / 2**64 < heldout_fraction else train).append(f)
    if not train:
        raise CodemoatError("the corpus is too small: every file fell into the held-out split")
    return train, held
