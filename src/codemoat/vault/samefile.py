"""An output path that names one of the command's inputs, refused before any work.

`vendor seal m.gguf --out m.gguf --force` replaced the plaintext model by its sealed form, `vendor unseal
a.moat --out a.moat --force` the sealed file by its plaintext, and `vendor license issue --model s.moat --out
s.moat --force` the sealed model by a license: `--force` replaces an earlier output, never the file being read.
Files are compared by device and inode (`os.path.samefile`), so a symbolic link or a hard link to an input,
or a path spelt another way (`./m.gguf`, `../x/m.gguf`), is that input too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import CodemoatError


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether `a` and `b` name one file (either missing or unreadable: no, nothing there to lose)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_input_as_output(out: str | Path, inputs: Iterable[str | Path], what: str = "input") -> None:
    """The one line "OUT is the WHAT INPUT itself ..." when `out` is one of `inputs`, with or without --force."""
    for src in inputs:
        if same_file(out, src):
            same = "" if Path(out) == Path(src) else f" {src}"
            raise CodemoatError(
                f"{out} is the {what}{same} itself: write the output to another file (--force replaces an earlier output, never an input)"
            )
