"""Who may read which indexed repository.

The rule, in one place:
- every repository belongs to one or more groups (`codemoat index add --groups`, default `everyone`);
- every caller is implicitly in the group `everyone`, so a repository in `everyone` is readable by
  every authenticated user of this server;
- a caller may read a repository when they share at least one group with it;
- members of `admin` may read every repository (the people who index them);
- a repository with no groups at all is therefore readable by `admin` only.
Retrieval applies this before any query runs and again on every chunk it returns.
"""

from __future__ import annotations

from collections.abc import Iterable

EVERYONE = "everyone"
ADMIN = "admin"


def effective_groups(groups: Iterable[str]) -> frozenset[str]:
    """The caller's groups plus the implicit `everyone`."""
    return frozenset(groups) | {EVERYONE}


def can_read(repo_groups: Iterable[str], caller_groups: Iterable[str]) -> bool:
    """True when a caller in `caller_groups` may read a repository in `repo_groups`."""
    mine = effective_groups(caller_groups)
    return ADMIN in mine or not mine.isdisjoint(repo_groups)
