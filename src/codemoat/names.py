"""The names people give users, groups and tokens: one rule wherever a group is named, so that a group
`users add --groups` accepts can also be given a repository (`index add --groups`; a directory's `eng@corp` was
refused there, and no repository could ever be readable by it)."""

from __future__ import annotations

import re

#: letters, digits, '.', '_', '@', '-', starting with a letter or digit, at most 128 (fullmatch: `$` would let a
#: final newline through)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
RULE = "use letters, digits, '.', '_', '@', '-' (max 128)"


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME.fullmatch(name) is not None
